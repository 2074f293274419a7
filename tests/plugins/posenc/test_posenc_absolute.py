"""Additive encodings: sinusoidal (paper formula, 2-D vs timm) and Fourier features (Li et al., Tancik et al.)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed

from lowbit.errors import LowbitError
from lowbit.nn.posenc import positions_1d, positions_2d
from lowbit.plugins.posenc.fourier import FourierPE
from lowbit.plugins.posenc.sinusoidal import SinusoidalPE
from lowbit.registry import registry

# ---- sinusoidal --------------------------------------------------------------------------------


def test_sinusoidal_1d_is_the_paper_formula():
    d = 16
    pe = SinusoidalPE(dim=d)
    table = pe.table(positions_1d(300))
    for n in (0, 1, 17, 299):
        for i in range(d // 2):
            angle = n / 10000 ** (2 * i / d)
            assert table[n, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[n, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_sinusoidal_2d_equals_timm_up_to_channel_order():
    # timm orders [sin_row, sin_col, cos_row, cos_col] (dim/4 each); we order [row: sin0 cos0 sin1 cos1 ..., col: ...]
    d, rows, cols = 32, 5, 3
    ours = SinusoidalPE(dim=d).table(positions_2d(rows, cols))
    timm = build_sincos2d_pos_embed([rows, cols], dim=d)
    q = d // 4
    perm = [(c % 2) * 2 * q + (c // (d // 2)) * q + (c % (d // 2)) // 2 for c in range(d)]
    torch.testing.assert_close(ours, timm[:, perm], rtol=0, atol=1e-6)


@pytest.mark.parametrize("rms", [0.02, 2**-0.5])
def test_sinusoidal_embed_adds_the_table_at_the_chosen_rms(rms):
    d, pos = 64, positions_1d(50)
    pe = SinusoidalPE(dim=d, rms=rms)
    x = torch.randn(2, 50, d)
    added = pe.embed(x, pos) - x  # (B, T, d)
    assert added.pow(2).mean(-1).sqrt().sub(rms).abs().max() < 1e-6  # every position vector has RMS rms
    # (x + t) - x rounds at ulp(x)
    torch.testing.assert_close(added[0], pe.table(pos) * rms * 2**0.5, rtol=0, atol=5e-7)
    with pytest.raises(LowbitError, match="sinusoidal rms must be positive"):
        SinusoidalPE(dim=d, rms=0.0)


def test_sinusoidal_is_fixed_and_checks_widths():
    assert list(SinusoidalPE(dim=8).parameters()) == [] and SinusoidalPE(dim=8).state_dict() == {}
    with pytest.raises(LowbitError, match="needs an even width, got dim=7"):
        registry.build("posenc", {"name": "sinusoidal"}, dim=7)
    with pytest.raises(LowbitError, match="dim=6 must divide by 4"):
        SinusoidalPE(dim=6).embed(torch.zeros(1, 4, 6), positions_2d(2, 2))


# ---- Fourier -----------------------------------------------------------------------------------


def test_fourier_encoding_is_mlp_of_scaled_fourier_features():
    torch.manual_seed(0)
    pe = FourierPE(dim=16, grid=(4, 8), fourier_dim=10, hidden_dim=12)
    pos = positions_2d(6, 8)  # a larger grid than trained: rows continue past 1
    coords = torch.stack([pos[:, 0] / 4, pos[:, 1] / 8], dim=-1).float()  # (T, 2), [0, 1) on the training grid
    angles = 2 * math.pi * coords @ pe.freqs.T  # (T, 5)
    features = torch.cat([angles.cos(), angles.sin()], dim=-1) / math.sqrt(10)
    expected = pe.mlp(features)
    x = torch.randn(2, 48, 16)
    torch.testing.assert_close(pe.embed(x, pos), x + expected, rtol=0, atol=1e-6)


def test_fourier_random_features_are_fixed_gaussian():
    torch.manual_seed(1)
    learn = FourierPE(dim=8, max_len=64, fourier_dim=2000, sigma=3.0)
    fixed = FourierPE(dim=8, max_len=64, fourier_dim=2000, sigma=3.0, learnable=False)
    assert "freqs" in dict(learn.named_parameters()) and "freqs" not in dict(fixed.named_parameters())
    assert "freqs" in fixed.state_dict()  # the random draw is saved with the model
    assert fixed.freqs.std().item() == pytest.approx(3.0, rel=0.1)
    mlp = copy.deepcopy(fixed.mlp)  # before backward: the reference starts without gradients
    fixed.embed(torch.randn(1, 10, 8), positions_1d(10)).sum().backward()
    assert fixed.mlp[0].weight.grad is not None
    # the MLP's gradient is that of Σ MLP(features), the features written out for text positions n / max_len
    angles = 2 * math.pi * (torch.arange(10.0)[:, None] / 64) @ fixed.freqs.T  # (T, 1000)
    mlp(torch.cat([angles.cos(), angles.sin()], dim=-1) / math.sqrt(2000)).sum().backward()
    for got, want in zip(fixed.mlp.parameters(), mlp.parameters(), strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-6)


def test_fourier_dimensionality_is_fixed_at_build():
    text = registry.build("posenc", {"name": "fourier"}, dim=8, max_len=16, grid=None)
    with pytest.raises(LowbitError, match="takes 1-D positions, got 2-D"):
        text.embed(torch.zeros(1, 4, 8), positions_2d(2, 2))
    with pytest.raises(LowbitError, match="must be even"):
        registry.build("posenc", {"name": "fourier", "fourier_dim": 5}, dim=8, max_len=16)
    with pytest.raises(LowbitError, match="needs max_len"):
        registry.build("posenc", {"name": "fourier"}, dim=8)
