"""Compiled graphs kept on disk (lowbit.numerics._graphs): a graph one process traced is called by the next
without tracing and gives the same bits; its guards still choose (dtypes, static sizes); graphs from other
sources, unreadable files and variants past their limit do not reach a kernel.

Each ``Variant`` here is built from a fresh ``torch.compile`` of its own, as a new process builds it, in a
folder of the test's own."""

import shutil

import pytest
import torch

import lowbit.numerics._fast as fast
from lowbit.numerics import _graphs

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler: nothing compiles")

DYNAMIC = ((0,), ())  # x's rows vary; the scale is 0-d


def _round_scaled(x: torch.Tensor, s: torch.Tensor, *, limit: float) -> torch.Tensor:
    return (x * s).round().clamp(-limit, limit) / s


def _variant(folder, limit: int = 8, **bound) -> _graphs.Variant:
    bound = bound or {"limit": 6.0}
    compiled = fast._compiled(_round_scaled, _graphs.variant_key(_round_scaled, bound), **bound)  # a fresh one
    return _graphs.Variant(compiled, compiled.__wrapped__.__globals__, folder, limit)


def _call(variant: _graphs.Variant, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return variant((x, s), DYNAMIC)


def _inputs(rows: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(rows)
    return torch.randn(rows, 48, generator=g, dtype=dtype) * 4, torch.tensor(1.5, dtype=dtype)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_a_graph_saved_by_one_process_is_called_by_the_next_without_tracing(tmp_path):
    first = _variant(tmp_path)
    x, s = _inputs(64)
    assert _same(_call(first, x, s), _round_scaled(x, s, limit=6.0))
    assert first.traced == 1 and len(list(tmp_path.glob("*.bin"))) == 1
    second = _variant(tmp_path)
    assert len(second.graphs) == 1
    for rows in (64, 100, 7):  # the rows are a symbolic size: one graph serves every count
        x, s = _inputs(rows)
        assert _same(_call(second, x, s), _round_scaled(x, s, limit=6.0))
    assert second.traced == 0


def test_the_guards_of_a_loaded_graph_still_choose(tmp_path):
    _call(_variant(tmp_path), *_inputs(64))
    second = _variant(tmp_path)
    x, s = _inputs(64, torch.float64)  # another dtype: a graph of its own
    assert _same(_call(second, x, s), _round_scaled(x, s, limit=6.0))
    wide = torch.randn(64, 40)  # another static size
    assert _same(_call(second, wide, s.float()), _round_scaled(wide, s.float(), limit=6.0))
    assert second.traced == 2 and len(list(tmp_path.glob("*.bin"))) == 3


def test_a_graph_another_process_saved_since_is_found_before_tracing(tmp_path):
    late = _variant(tmp_path)  # built while the folder is empty
    _call(_variant(tmp_path), *_inputs(64))
    x, s = _inputs(96)
    assert _same(_call(late, x, s), _round_scaled(x, s, limit=6.0))
    assert late.traced == 0


def test_graphs_of_other_sources_or_constants_and_unreadable_files_are_not_used(tmp_path, monkeypatch):
    _call(_variant(tmp_path), *_inputs(64))
    (tmp_path / "garbage.bin").write_bytes(b"not a compiled graph")
    assert len(_variant(tmp_path).graphs) == 1  # the garbage is skipped
    monkeypatch.setattr(_graphs, "_module_source", lambda name: "edited since")
    edited = _variant(tmp_path)
    assert edited.graphs == []
    x, s = _inputs(64)
    assert _same(_call(edited, x, s), _round_scaled(x, s, limit=6.0)) and edited.traced == 1
    key = _graphs.variant_key(_round_scaled, {"limit": 6.0})
    assert key != _graphs.variant_key(_round_scaled, {"limit": 7.0})
    assert _graphs.variant_key(_round_scaled, {"limit": object()}) is None  # no name for an object: not kept


def test_past_its_limit_a_variant_stops_tracing(tmp_path):
    variant = _variant(tmp_path, limit=1)
    _call(variant, *_inputs(64))
    with pytest.raises(_graphs.GraphLimit):
        _call(variant, *_inputs(64, torch.float64))
    assert variant.traced == 1


def test_turned_off_it_is_torch_compiles_own_path(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_GRAPH_CACHE", "0")
    variant = _variant(tmp_path)
    x, s = _inputs(64)
    assert not variant.ahead and _same(_call(variant, x, s), _round_scaled(x, s, limit=6.0))
    assert variant.traced == 0 and list(tmp_path.iterdir()) == []
