"""Random Hadamard transform (RHT), blockwise along the last dimension.

H_n is the orthonormal Sylvester-Hadamard matrix (entries +-1/sqrt(n), H = H^T, H H^T = I).
The random Hadamard matrix is R = D H with D = diag(s), s in {+-1}^n drawn from a seeded
CPU ``torch.Generator`` (the same signs on every device). The transform maps each length-n
block b of the last dim to b R, i.e. flip signs then Hadamard (as TE's NVFP4 RHT and QuaRot /
Quartet); the inverse is y R^T = (y H) * s. Spreading an outlier over the block shrinks the
block amax, which is why FP4 recipes apply it before quantizing (arXiv 2509.25149 section 4.2).

The transform is defined, bit for bit on every device, as the fast Walsh-Hadamard butterfly
(:func:`fwht`: log2 n stages of float32 a + b, a - b, then one multiply by 1/sqrt(n), exact for
n = 16, 64, 256) applied to the sign-flipped block; a BLAS matmul with R gives the same up to
the order of its sums (the tests check both), which varies between BLAS libraries and devices.
"""

from __future__ import annotations

import functools
import math

import torch

from lowbit.errors import LowbitError

__all__ = [
    "fwht",
    "hadamard_matrix",
    "inverse_rht",
    "random_hadamard",
    "random_signs",
    "rht",
    "rotate_blocks",
    "rotate_columns",
    "unrotate_blocks",
    "unrotate_columns",
]


def _check_size(n: int) -> int:
    if not isinstance(n, int) or n < 1 or n & (n - 1):
        raise LowbitError(f"Hadamard size must be a power of two (16, 32, ..., 256), got {n!r}")
    return n


def hadamard_matrix(
    n: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """Orthonormal Sylvester-Hadamard matrix of size n (a power of two): H_2n = [[H, H], [H, -H]] / sqrt(2)."""
    _check_size(n)
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return (h / math.sqrt(n)).to(dtype=dtype, device=device)


def random_signs(n: int, seed: int, *, device: torch.device | str | None = None) -> torch.Tensor:
    """n random +-1 (float32) from a CPU generator seeded with ``seed`` (device-independent)."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64) * 2 - 1
    return signs.to(dtype=torch.float32, device=device)


def random_hadamard(
    n: int, seed: int = 0, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """R = diag(s) H_n, orthonormal; a row vector b transforms to b @ R."""
    signs = random_signs(n, seed).double()
    return (signs[:, None] * hadamard_matrix(n, dtype=torch.float64)).to(dtype=dtype, device=device)


def _butterfly(lanes: list[torch.Tensor]) -> list[torch.Tensor]:
    """The Walsh-Hadamard butterfly (unnormalized) on n lanes: stage h maps each pair (i, i + h) of
    a group of 2h to (a + b, a - b). Each output is a fixed tree of float32 sums, so the result
    does not depend on how the lanes are laid out."""
    n, h = len(lanes), 1
    while h < n:
        out = list(lanes)
        for start in range(0, n, 2 * h):
            for i in range(start, start + h):
                a, b = lanes[i], lanes[i + h]
                out[i], out[i + h] = a + b, a - b
        lanes, h = out, 2 * h
    return lanes


def _butterfly_by_output(y: torch.Tensor, dim: int) -> torch.Tensor:
    """:func:`_butterfly` of the n lanes along ``dim`` of (M, n) or (G, n, C), written per output lane o:
    the tree that ends in o sums its two halves as a + s b with s = -1 where bit k of o is set
    (a + (-1) b is a - b exactly). One pointwise expression, which a compiled kernel evaluates in
    a single pass; the stacked lanes of ``_butterfly`` make it write 2n intermediate buffers."""
    n = y.shape[dim]
    shape = [1] * y.dim()
    shape[dim] = n
    out_lane = torch.arange(n, device=y.device).view(shape)
    level = [y.narrow(dim, k, 1) for k in range(n)]
    bit = 0
    while len(level) > 1:
        sign = 1.0 - 2.0 * ((out_lane >> bit) & 1).to(y.dtype)
        level = [level[2 * m] + sign * level[2 * m + 1] for m in range(len(level) // 2)]
        bit += 1
    return level[0]


def _hadamard(y: torch.Tensor, dim: int) -> torch.Tensor:
    """Orthonormal Walsh-Hadamard transform of the lanes along ``dim`` (1 or -1), float32 in and out."""
    n = _check_size(y.shape[dim])
    if torch.compiler.is_compiling():
        out = _butterfly_by_output(y, dim)
    else:
        out = torch.stack(_butterfly([y.select(dim, i) for i in range(n)]), dim=dim)
    return out * (1.0 / math.sqrt(n))


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal fast Walsh-Hadamard transform of the last dim (a power of two): x @ H_n."""
    n = _check_size(x.shape[-1])
    return _hadamard(x.reshape(-1, n), -1).view(x.shape)


def _blocks(x: torch.Tensor, size: int) -> torch.Tensor:
    _check_size(size)
    if x.ndim == 0 or x.shape[-1] % size:
        shape = tuple(x.shape)
        raise LowbitError(f"RHT size {size} must divide the last dim of shape {shape}; use a size that divides it")
    return x.reshape(-1, size)


@functools.lru_cache(maxsize=64)
def _shared_signs(n: int, seed: int, device: torch.device) -> torch.Tensor:
    """``random_signs(n, seed)`` on ``device``, built once: quantization applies the same signs to
    every operand of every step. Read only, never handed out."""
    return random_signs(n, seed, device=device)


def rotate_blocks(blocks: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """(M, n) blocks -> blocks @ diag(signs) H_n, float32: flip signs (exact), then the butterfly."""
    return fwht(blocks.float() * signs)


def unrotate_blocks(blocks: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rotate_blocks`: blocks @ H_n diag(signs) (H symmetric, R^T = H D)."""
    return fwht(blocks.float()) * signs


def rotate_columns(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """``rht`` of tᵀ for t = ``x`` (N, C), transposed back, without moving t: every length-n run
    of rows is one block of a column; same bits as ``rht(x.t(), n).t()``. float32 (N, C)."""
    n = signs.numel()
    rows = x.float().view(x.shape[0] // n, n, x.shape[1]) * signs[None, :, None]
    return _hadamard(rows, 1).view(x.shape)


def unrotate_columns(y: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rotate_columns`: ``inverse_rht(y.t(), n).t()``, same bits."""
    n = signs.numel()
    rows = _hadamard(y.float().view(y.shape[0] // n, n, y.shape[1]), 1) * signs[None, :, None]
    return rows.view(y.shape)


def rht(x: torch.Tensor, size: int, seed: int = 0) -> torch.Tensor:
    """Random Hadamard transform of each length-``size`` block of the last dim (float32 result)."""
    blocks = _blocks(x, size)
    return rotate_blocks(blocks, _shared_signs(size, int(seed), x.device)).view(x.shape)


def inverse_rht(y: torch.Tensor, size: int, seed: int = 0) -> torch.Tensor:
    """Inverse of :func:`rht` (its transpose), blockwise."""
    blocks = _blocks(y, size)
    return unrotate_blocks(blocks, _shared_signs(size, int(seed), y.device)).view(y.shape)
