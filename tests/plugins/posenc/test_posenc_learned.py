"""Learned absolute embeddings: lookup, resampling to longer texts and other grids (vs timm), errors."""

from __future__ import annotations

import math

import pytest
import torch
from timm.layers import resample_abs_pos_embed

from lowbit.errors import LowbitError
from lowbit.nn.posenc import positions_1d, positions_2d
from lowbit.plugins.posenc.learned import LearnedPE
from lowbit.registry import registry


def test_text_lookup_adds_the_table_rows():
    pe = LearnedPE(dim=8, max_len=16)
    x = torch.randn(2, 10, 8)
    torch.testing.assert_close(pe.embed(x, positions_1d(10)), x + pe.table[:10], rtol=0, atol=0)
    assert pe.table.std().item() == pytest.approx(0.02, rel=0.3)


def test_longer_text_interpolates_the_table_linearly():
    torch.manual_seed(0)
    L, T = 5, 8
    pe = LearnedPE(dim=3, max_len=L)
    got = pe.embed(torch.zeros(1, T, 3), positions_1d(T))[0]
    table = pe.table.detach()
    expected = []
    for i in range(T):  # align_corners=False: source coordinate (i + 1/2)·L/T − 1/2
        src = max((i + 0.5) * L / T - 0.5, 0.0)
        i0 = min(math.floor(src), L - 1)
        i1, w = min(i0 + 1, L - 1), src - i0
        expected.append((1 - w) * table[i0] + w * table[i1])
    torch.testing.assert_close(got, torch.stack(expected), rtol=0, atol=1e-6)


@pytest.mark.parametrize("new_grid", [(4, 4), (6, 5), (2, 3)])
def test_other_grids_resample_as_timm(new_grid):
    torch.manual_seed(1)
    pe = LearnedPE(dim=8, grid=(4, 4))
    rows, cols = new_grid
    got = pe.embed(torch.zeros(1, rows * cols, 8), positions_2d(rows, cols))
    expected = resample_abs_pos_embed(
        pe.table.detach().reshape(1, 16, 8), [rows, cols], old_size=[4, 4], num_prefix_tokens=0
    )
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_resize_makes_the_resampling_permanent():
    torch.manual_seed(2)
    pe = LearnedPE(dim=8, grid=(4, 4))
    before = pe.embed(torch.zeros(1, 30, 8), positions_2d(6, 5))
    pe.resize(grid=(6, 5))
    assert pe.table.shape == (6, 5, 8) and pe.grid == (6, 5)
    torch.testing.assert_close(pe.embed(torch.zeros(1, 30, 8), positions_2d(6, 5)), before, rtol=0, atol=0)
    text = LearnedPE(dim=4, max_len=8)
    text.resize(max_len=12)
    assert text.table.shape == (12, 4) and text.max_len == 12


def test_backward_reaches_the_table():
    torch.manual_seed(3)
    pe = LearnedPE(dim=8, grid=(3, 3))
    x = torch.randn(2, 16, 8)
    pe.embed(x, positions_2d(4, 4)).square().sum().backward()
    assert pe.table.grad is not None and pe.table.grad.abs().sum() > 0
    # the same loss through timm's resampling of a copy of the table: the gradient is the resampling's adjoint
    table = pe.table.detach().clone().requires_grad_()
    resampled = resample_abs_pos_embed(table.reshape(1, 9, 8), [4, 4], old_size=[3, 3], num_prefix_tokens=0)
    (x + resampled).square().sum().backward()
    torch.testing.assert_close(pe.table.grad, table.grad, rtol=1e-5, atol=1e-6)


def test_dimensionality_mismatch_is_a_clear_error():
    text = registry.build("posenc", {"name": "learned"}, dim=8, max_len=16, grid=None)
    image = registry.build("posenc", {"name": "learned"}, dim=8, max_len=16, grid=(4, 4))
    assert text.pos_dims == (1,) and image.pos_dims == (2,)
    with pytest.raises(LowbitError, match="takes 1-D positions, got 2-D"):
        text.embed(torch.zeros(1, 16, 8), positions_2d(4, 4))
    with pytest.raises(LowbitError, match="takes 2-D positions, got 1-D"):
        image.embed(torch.zeros(1, 16, 8), positions_1d(16))
    with pytest.raises(LowbitError, match="needs max_len"):
        registry.build("posenc", {"name": "learned"}, dim=8, grid=None)
