"""Byte-level text corpora cached as memory-mapped uint8 arrays.

The default corpus is the Python standard library of the running interpreter: every ``.py``
file under ``sysconfig``'s stdlib path (site-packages excluded), in sorted relative-path order,
each followed by a NUL separator. A file goes to validation when a hash of its relative path
says so, so the split is deterministic and independent of which other files exist.

The cache (``<cache_dir>/<key>/{train,val}.bin`` and ``meta.json`` with sizes and SHA-256)
is rebuilt when missing or when its bytes do not match the recorded checksum (a rebuild of a cache
that was there says so, on the ``lowbit`` logger). ``check_cache_dir`` and ``split_sizes`` let a data
module refuse an unwritable cache or too little text when it is built, before a run starts.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lowbit.errors import LowbitError

__all__ = [
    "Corpus",
    "cache_root",
    "check_cache_dir",
    "corpus_dir",
    "load_corpus",
    "split_sizes",
    "stdlib_files",
    "text_files",
    "unigram_bits_per_byte",
]

log = logging.getLogger("lowbit.data")

_SEPARATOR = b"\0"
_TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".json", ".csv", ".tex", ".html", ".xml", ".yaml", ".yml", ".c", ".h")


@dataclass(frozen=True)
class Corpus:
    """Train and validation bytes (read-only memmaps) and where they live."""

    train: np.ndarray
    val: np.ndarray
    root: Path


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$LOWBIT_CACHE``, else ``~/.cache/lowbit``."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit")).expanduser()


def _cache_variable(cache_dir: str | os.PathLike | None) -> str:
    """What the user changes to move the cache: the option they set, else the environment variable."""
    return "data.cache_dir" if cache_dir else "LOWBIT_CACHE (or data.cache_dir)"


def check_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache root, created if need be; one clear error when it cannot be created or written."""
    root = cache_root(cache_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        problem = None if os.access(root, os.W_OK | os.X_OK) else "permission denied"
    except OSError as err:
        problem = err.strerror or type(err).__name__
    if problem:
        raise LowbitError(
            f"the corpus cache folder {root} is not writable ({problem}); "
            f"set {_cache_variable(cache_dir)} to a writable folder"
        )
    return root


@functools.lru_cache(maxsize=1)
def _stdlib_listing() -> tuple[Path, tuple[Path, ...]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        p for p in root.rglob("*.py") if "site-packages" not in p.parts and "__pycache__" not in p.parts and p.is_file()
    ]
    return root, tuple(sorted(files, key=lambda p: p.relative_to(root).as_posix()))


def stdlib_files() -> tuple[Path, list[Path]]:
    """The stdlib's ``.py`` files, sorted by relative path (site-packages and caches excluded)."""
    root, files = _stdlib_listing()  # listed once per process: the interpreter's stdlib does not change
    return root, list(files)


def text_files(path: str | os.PathLike) -> tuple[Path, list[Path]]:
    """One text file, or every text file under a folder, sorted by relative path."""
    p = Path(path).expanduser()
    if not p.exists():
        raise LowbitError(f"data.path '{path}' does not exist; give a text file or a folder of text files")
    if p.is_file():
        return p.parent, [p]
    files = sorted(
        (f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in _TEXT_SUFFIXES),
        key=lambda f: f.relative_to(p).as_posix(),
    )
    if not files:
        raise LowbitError(f"data.path '{path}' holds no text files (suffixes {', '.join(_TEXT_SUFFIXES)})")
    return p, files


def check_readable(path: str | os.PathLike, files: list[Path]) -> None:
    """Every file opens for reading and there is at least one byte of text; one clear error otherwise."""
    total = 0
    for f in files:
        try:
            with open(f, "rb"):
                total += f.stat().st_size
        except OSError as err:
            raise LowbitError(f"data.path '{path}': cannot read {f} ({err.strerror or err})") from err
    if total == 0:
        what = "is an empty file" if len(files) == 1 and Path(path).expanduser().is_file() else "holds only empty files"
        raise LowbitError(f"data.path '{path}' {what} (0 bytes); give a text file or a folder of text files")


def _is_val(rel: str, val_fraction: float) -> bool:
    # a stable hash of the path decides the split, so adding a file never reshuffles the others
    h = int.from_bytes(hashlib.sha1(rel.encode()).digest()[:8], "little")
    return (h % 1_000_000) < val_fraction * 1_000_000


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _cache_key(root: Path, files: list[Path], val_fraction: float) -> str:
    listing = hashlib.sha1()
    listing.update(f"{root}|{val_fraction}".encode())
    for f in files:
        st = f.stat()
        listing.update(f"{f.relative_to(root).as_posix()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return listing.hexdigest()[:16]


def split_sizes(root: Path, files: list[Path], val_fraction: float) -> dict[str, int]:
    """Bytes of the train and val splits ``_build`` makes of ``files``, from their sizes alone (nothing is read)."""
    if len(files) == 1:  # as _build: the file and its separator, cut at 1 - val_fraction
        n = files[0].stat().st_size + len(_SEPARATOR)
        cut = int(n * (1 - val_fraction))
        return {"train": cut, "val": n - cut}
    sizes = {"train": 0, "val": 0}
    for f in files:
        sizes["val" if _is_val(f.relative_to(root).as_posix(), val_fraction) else "train"] += f.stat().st_size + 1
    return sizes


def corpus_dir(root: Path, files: list[Path], val_fraction: float, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder of this corpus: ``<cache root>/corpus/<key of the file listing>``."""
    return cache_root(cache_dir) / "corpus" / _cache_key(root, files, val_fraction)


def _cache_problem(folder: Path) -> str | None:
    """Why the cache in ``folder`` cannot be used (``missing``, ``stale or corrupt (...)``), None when it can."""
    if not (folder / "meta.json").exists():
        return "missing"
    try:
        meta = json.loads((folder / "meta.json").read_text())
        for split in ("train", "val"):
            path = folder / f"{split}.bin"
            if not path.exists():
                return f"stale or corrupt ({split}.bin missing)"
            if path.stat().st_size != meta[split]["bytes"]:
                return f"stale or corrupt ({split}.bin size mismatch)"
            if _sha256(path) != meta[split]["sha256"]:
                return f"stale or corrupt ({split}.bin sha256 mismatch)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"stale or corrupt (meta.json unreadable: {type(err).__name__})"
    return None


def _build(folder: Path, root: Path, files: list[Path], val_fraction: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    parts: dict[str, list[bytes]] = {"train": [], "val": []}
    for f in files:
        rel = f.relative_to(root).as_posix()
        split = "val" if len(files) > 1 and _is_val(rel, val_fraction) else "train"
        parts[split].append(f.read_bytes() + _SEPARATOR)
    if len(files) == 1:  # a single file: the last val_fraction of its bytes is validation
        data = parts["train"][0]
        cut = int(len(data) * (1 - val_fraction))
        parts = {"train": [data[:cut]], "val": [data[cut:]]}
    meta = {"root": str(root), "files": len(files)}
    for split, chunks in parts.items():
        _write_atomic(folder / f"{split}.bin", b"".join(chunks))
        meta[split] = {"bytes": (folder / f"{split}.bin").stat().st_size, "sha256": _sha256(folder / f"{split}.bin")}
    _write_atomic(folder / "meta.json", json.dumps(meta, indent=1).encode())


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` through a temporary file of this process, then rename: a crash never leaves a half
    file, and processes building the same cache at once (parallel runs or test workers) never share a
    temporary file (each writes the same bytes; the last rename wins)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def load_corpus(
    root: Path, files: list[Path], val_fraction: float = 0.05, cache_dir: str | os.PathLike | None = None
) -> Corpus:
    """Memory-map the cached corpus for these files, building or repairing the cache first."""
    if not 0 < val_fraction < 1:
        raise LowbitError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
    folder = corpus_dir(root, files, val_fraction, cache_dir)
    problem = _cache_problem(folder)
    if problem is not None:
        try:
            _build(folder, root, files, val_fraction)
        except OSError as err:
            raise LowbitError(
                f"cannot build the corpus cache at {folder}: {err.strerror or err} ({err.filename}); "
                f"set {_cache_variable(cache_dir)} to a writable folder"
            ) from err
        if problem != "missing":
            log.warning(f"notice: corpus cache at {folder} was {problem}; rebuilt")
    train = np.memmap(folder / "train.bin", dtype=np.uint8, mode="r")
    val = np.memmap(folder / "val.bin", dtype=np.uint8, mode="r")
    return Corpus(train=train, val=val, root=folder)


def unigram_bits_per_byte(train: np.ndarray, val: np.ndarray) -> float:
    """Cross-entropy of val under train's byte frequencies (add-one smoothed), in bits per byte."""
    counts = np.bincount(np.asarray(train), minlength=256).astype(np.float64) + 1.0
    log_p = np.log2(counts / counts.sum())
    val_counts = np.bincount(np.asarray(val), minlength=256).astype(np.float64)
    return float(-(val_counts * log_p).sum() / val_counts.sum())
