"""Chunked evaluation of elementwise chains on CPU (an implementation detail, not an API).

A format conversion is a chain of ~15 elementwise torch ops. On a 64 MiB tensor each op
allocates a fresh 64 MiB buffer, and on CPU the page faults of those allocations cost more
than the arithmetic. Running the chain on cache-sized chunks and writing each result into
one preallocated output is 10-30x faster and gives identical numbers. A chunk holds 2^17
elements (512 KiB float32) per torch thread: each core's share of a chain's few live
temporaries stays in its L2 (2 MiB here), 1.5-2.5x faster per op than twice that, while
Python's per-op overhead (~2 us) stays small beside the work and the thread pool still gets
whole chunks to split. On GPU the chain runs on the whole tensor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["CHUNK_ELEMENTS", "chunk_elements", "contiguous", "map_elementwise", "row_chunks"]

CHUNK_ELEMENTS = 1 << 17  # per torch thread


def chunk_elements() -> int:
    """Elements per chunk: ``CHUNK_ELEMENTS`` for each of torch's CPU threads."""
    return CHUNK_ELEMENTS * max(1, torch.get_num_threads())


def map_elementwise(
    fn: Callable[..., torch.Tensor], x: torch.Tensor, out_dtype: torch.dtype, offsets: bool = False
) -> torch.Tensor:
    """``fn(x)`` for an elementwise ``fn``, evaluated chunk by chunk on CPU; shape of ``x``.
    ``offsets``: call ``fn(chunk, start)`` with the flat index of the chunk's first element."""
    chunk = chunk_elements()
    call = fn if offsets else lambda c, start: fn(c)
    if x.device.type != "cpu" or x.numel() <= chunk:
        return call(x, 0)
    flat = x.reshape(-1)
    out = torch.empty(flat.numel(), dtype=out_dtype, device=x.device)
    for start in range(0, flat.numel(), chunk):
        out[start : start + chunk] = call(flat[start : start + chunk], start)
    return out.view(x.shape)


def row_chunks(n_rows: int, row_elements: int, device: torch.device) -> list[slice]:
    """Slices of ``n_rows`` rows, each about ``chunk_elements()`` elements (one slice off CPU)."""
    if device.type != "cpu":
        return [slice(0, n_rows)]
    rows = max(1, chunk_elements() // max(1, row_elements))
    return [slice(start, min(start + rows, n_rows)) for start in range(0, n_rows, rows)]


def contiguous(t: torch.Tensor, tile: int = 64) -> torch.Tensor:
    """``t.contiguous()``; a transposed 2-D CPU tensor (dyᵀ, xᵀ of wgrad) is copied 64 rows of the
    source at a time: one plain copy reads a column per output row, 3-4x slower when rows lie a
    power of two apart (cache-set conflicts). Same values, same layout."""
    if t.is_contiguous() or t.dim() != 2 or t.device.type != "cpu" or not t.t().is_contiguous():
        return t.contiguous()
    src = t.t()  # (cols, rows), contiguous
    out = torch.empty(t.shape, dtype=t.dtype)
    for start in range(0, src.shape[0], tile):
        out[:, start : start + tile] = src[start : start + tile].t()
    return out
