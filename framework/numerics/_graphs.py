"""Compiled quantization kernels kept on disk with their guards: a new process calls them without tracing.

:func:`lowbit.numerics._fast.run_compiled` compiles each variant (a function with its bound constants)
with ``torch.compile``. Inductor caches the kernels it generates on disk, but dynamo traces the Python
function again in every new process before it can look them up: ~0.5-1.5 s a graph, ~5 s of an NVFP4
run's first step with every cache warm. Here each graph is compiled ahead of time instead
(``aot_compile``: the same dynamo trace and inductor kernels, with its guards) and saved
(``save_compiled_function``) in the folder of lowbit's C kernels in inductor's cache directory; a later
process loads it, checks its guards on every call (dtypes, static sizes and strides, symbolic-size
relations, grad mode) and calls its kernels. The folder's key holds torch's version, the CPU's features, lowbit's
numerics sources, the function's name and its bound constants; a graph is also checked against the
current source of every module it traced. Where a graph cannot be compiled ahead, saved or loaded, the
variant falls back to ``torch.compile``'s own path (the same kernels and numbers, traced each process).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import inspect
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from lowbit.numerics import _native

__all__ = ["GraphLimit", "Variant", "graph_folder", "variant_key"]

_log = logging.getLogger("lowbit")
_ATTEMPTS = 3  # traces of one graph when dynamo restarts its analysis


class GraphLimit(Exception):  # noqa: N818 - a limit reached, not an error
    """A variant traced its limit of graphs in this process: its caller runs eagerly."""


def graph_folder() -> Path:
    """Where compiled graphs are kept: beside lowbit's C kernels in inductor's cache directory."""
    return _native._inductor_cache() / "lowbit" / "graphs"


@functools.cache
def _sources_key() -> str:
    """torch's version, the CPU's features (inductor's C++ is written for them) and lowbit's numerics
    sources (what the traced functions are made of)."""
    digest = hashlib.sha256(f"{torch.__version__}\0{_native._cpu_flags()}".encode())
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def variant_key(fn: Callable, bound: dict[str, Any]) -> str | None:
    """The graph folder's name for ``fn`` with its ``bound`` keywords; None where their text does not
    identify them (an object shown by its address)."""
    text = f"{fn.__module__}.{fn.__qualname__}{sorted(bound.items())!r}"
    if " at 0x" in text:
        return None
    return hashlib.sha256(f"{_sources_key()}\0{text}".encode()).hexdigest()[:24]


def _signature(tensors: tuple[torch.Tensor | None, ...], dynamic: tuple[tuple[int, ...], ...]) -> str:
    """A name for the inputs a graph is traced for: one file per dtype, rank, static size and stride order,
    so that processes tracing the same graph write the same file."""
    parts = []
    for t, dims in zip(tensors, dynamic, strict=True):
        if t is None:
            parts.append("-")
            continue
        sizes = ["s" if d in dims and n > 1 else str(n) for d, n in enumerate(t.shape)]
        order = sorted(range(t.dim()), key=lambda d: (-t.stride(d), d))
        parts.append(f"{t.dtype}[{','.join(sizes)}]{order}{t.is_contiguous()}{t.device.type}")
    return hashlib.sha256(";".join(parts).encode()).hexdigest()[:16]


@functools.cache
def _module_source(name: str) -> str | None:
    module = sys.modules.get(name)
    try:
        return None if module is None else inspect.getsource(module)
    except (OSError, TypeError):
        return None


def _current(graph: Any) -> bool:
    """Whether every module the graph traced has the source it was traced from."""
    return all(_module_source(s.module) == s.content for s in graph.source_info().inlined_sources)


@contextlib.contextmanager
def _cache_key_without_backend_name() -> Iterator[None]:
    """AOTAutograd's cache key for a graph compiled ahead holds the graph's backend name, which is random
    (unique across processes), so it never hit: every new trace generated its kernels' code again (~10 s
    a graph) where ``torch.compile``'s own path finds it in the cache. While tracing, the key leaves the
    name out (the cache saves its entries without it, and a hit takes the new trace's name)."""
    try:
        from torch._functorch._aot_autograd.autograd_cache import AOTAutogradCachePickler

        reduce = AOTAutogradCachePickler._reduce_aot_config
    except (ImportError, AttributeError):
        yield
        return

    def without_name(self: Any, aot_config: Any) -> Any:
        return reduce(self, dataclasses.replace(aot_config, precompile_backend_id=None))

    AOTAutogradCachePickler._reduce_aot_config = without_name
    try:
        yield
    finally:
        AOTAutogradCachePickler._reduce_aot_config = reduce


class Variant:
    """The graphs of one compiled variant that this process calls: loaded from ``folder`` or traced here
    (at most ``limit`` here), most recently used first.

    ``compiled``: the variant under ``torch.compile`` (fullgraph); ``namespace``: its function's globals.
    """

    def __init__(self, compiled: Callable, namespace: dict[str, Any], folder: Path | None, limit: int) -> None:
        self.compiled, self.namespace, self.folder, self.limit = compiled, namespace, folder, limit
        # False where turned off or once compiling ahead failed: torch.compile's own path
        self.ahead = os.environ.get("LOWBIT_GRAPH_CACHE", "1") != "0" and hasattr(compiled, "aot_compile")
        self.traced = 0
        self.graphs: list[Any] = []
        self.files: set[tuple[str, int]] = set()  # (name, mtime) of the files looked at
        if self.ahead:
            self._load()

    def _load(self) -> list[Any]:
        """The graphs saved in ``folder`` since the last look (by this process or another), added."""
        if self.folder is None or not self.folder.is_dir():
            return []
        graphs = []
        for path in sorted(self.folder.glob("*.bin")):
            try:
                seen = (path.name, path.stat().st_mtime_ns)
                if seen in self.files:
                    continue
                self.files.add(seen)
                with path.open("rb") as file:
                    graph = torch.compiler.load_compiled_function(file, f_globals=self.namespace)
                if _current(graph):
                    graphs.append(graph)
            except Exception as err:  # noqa: BLE001 - unreadable, or from another build: traced again if needed
                _log.debug("lowbit: compiled graph %s not loaded (%s)", path, err)
        self.graphs.extend(graphs)
        return graphs

    def _match(self, tensors: tuple[torch.Tensor | None, ...], graphs: list[Any]) -> Any:
        for graph in graphs:
            if graph.guard_check(*tensors):
                self.graphs.remove(graph)
                self.graphs.insert(0, graph)
                return graph
        return None

    def __call__(self, tensors: tuple[torch.Tensor | None, ...], dynamic: tuple[tuple[int, ...], ...]) -> Any:
        """The variant on ``tensors`` (``dynamic``: the dims of each that vary), in the graph whose guards
        pass: one loaded, one another process has saved since, or one traced here."""
        graph = self._match(tensors, self.graphs) or (self._match(tensors, self._load()) if self.ahead else None)
        if graph is not None:
            return graph.fn(*tensors)
        # the dims that vary are marked only on the tensors a graph is traced from: a loaded graph's guards
        # reject a marked tensor (its record of the marks is not saved)
        for t, dims in zip(tensors, dynamic, strict=True):
            for dim in dims if t is not None else ():
                if t.dim() > dim:
                    torch._dynamo.maybe_mark_dynamic(t, dim)
        if not self.ahead:
            return self.compiled(*tensors)
        if self.traced >= self.limit:
            raise GraphLimit
        graph = self._trace(tensors)
        if graph is None:
            return self.compiled(*tensors)
        self._save(graph, tensors, dynamic)
        return graph.fn(*tensors)

    def _trace(self, tensors: tuple[torch.Tensor | None, ...]) -> Any:
        """A graph compiled ahead for ``tensors``, added; None where that fails (then torch.compile's path)."""
        restart = getattr(torch._dynamo.exc, "RestartAnalysis", ())
        for _ in range(_ATTEMPTS):
            try:
                # floats (the bound constants) as constants, not symbolic inputs: a symbolic float's guard
                # names the variant's function, which a loaded graph cannot check; only the marked dims vary
                config = torch._dynamo.config.patch(specialize_float=True, automatic_dynamic_shapes=False)
                with _cache_key_without_backend_name(), config:
                    graph = self.compiled.aot_compile((tensors, {}))
            except restart:  # dynamo asks to trace again (its own path retries too)
                continue
            except Exception as err:  # noqa: BLE001 - torch.compile's own path raises where compiling itself fails
                _log.debug("lowbit: compiling ahead failed (%r); tracing in each process instead", err)
                break
            else:
                self.traced += 1
                self.graphs.insert(0, graph)
                return graph
        self.ahead = False
        return None

    def _save(self, graph: Any, tensors: tuple[torch.Tensor | None, ...], dynamic: tuple[tuple[int, ...], ...]) -> None:
        if self.folder is None:
            return
        path = self.folder / f"{_signature(tensors, dynamic)}.bin"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            graph.save_compiled_function(str(path))
            self.files.add((path.name, path.stat().st_mtime_ns))
        except Exception as err:  # noqa: BLE001 - a graph not saved is traced again by the next process
            _log.debug("lowbit: compiled graph not saved (%s)", err)
