"""FP8 current and delayed scaling (Transformer Engine conventions)."""

import math

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.numerics import (
    DelayedScaling,
    QuantSpec,
    amax_from_history,
    current_scale,
    dequantize,
    quantize,
    roll_amax_history,
    round_scale_to_pow2,
    tensor_amax,
)

FLT_MAX = torch.finfo(torch.float32).max


def test_current_scale_and_special_cases():
    amax = torch.tensor([2.0, 448.0, 0.0, 1e-45, math.inf, math.nan])
    scale = current_scale(amax, 448.0)
    assert scale.tolist()[:3] == [224.0, 1.0, 1.0]  # amax 0 -> scale 1
    assert scale[3].item() == FLT_MAX  # overflowing scale clamps
    assert scale[4].item() == 1.0 and scale[5].item() == 1.0  # non-finite amax -> 1
    assert current_scale(torch.tensor(2.0), 448.0, margin=2).item() == 56.0


def test_pow2_scales_round_down():
    assert round_scale_to_pow2(torch.tensor([1.0, 3.9, 4.0, 224.0, 0.7])).tolist() == [1.0, 2.0, 4.0, 128.0, 0.5]
    assert current_scale(torch.tensor(3.0), 448.0, pow2=True).item() == 128.0  # 149.3 -> 128


def test_tensorwise_fp8_quantize_uses_amax_scale():
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    q = quantize(x, "fp8_e4m3_tensor")
    amax = x.abs().max()
    assert q.scales.shape == (1, 1)
    assert q.scales.item() == torch.reciprocal(torch.tensor(448.0) / amax).item()  # scale_inv as TE
    assert dequantize(q).abs().max().item() == pytest.approx(amax.item(), rel=2**-4)
    fixed = quantize(x, "fp8_e4m3_tensor", scale=torch.tensor(64.0))
    assert fixed.scales.item() == 1 / 64 and torch.equal(
        fixed.codes, quantize(x * 64, "fp8_e4m3_tensor", scale=1.0).codes
    )
    assert quantize(x, "fp8_e4m3_tensor", amax=2 * amax).scales.item() == pytest.approx(2 * q.scales.item())


def test_rowwise_and_pow2_fp8():
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(0)) * torch.arange(1, 9).float()[:, None]
    q = quantize(x, "fp8_e4m3_row")
    assert torch.allclose(q.scales, x.abs().amax(-1, keepdim=True) / 448, rtol=1e-6)
    p = quantize(x, QuantSpec(element="e4m3", block="row", pow2_scale=True))
    log2 = torch.log2(p.scales)
    assert torch.equal(log2, torch.round(log2))  # decode scales are powers of two
    assert torch.all(p.scales >= q.scales)


def test_non_saturating_fp8_tensor_spec():
    x = torch.tensor([[1.0, 2.0, 1000.0]])
    spec = QuantSpec(element="e4m3", saturate=False)
    assert torch.isnan(dequantize(quantize(x, spec, scale=1.0))[0, 2])
    assert dequantize(quantize(x, "fp8_e4m3_tensor", scale=1.0))[0, 2].item() == 448.0


def test_amax_history_and_delayed_scaling():
    history = torch.zeros(3)
    for amax in (1.0, 4.0, 2.0, 0.5):
        history = roll_amax_history(history, amax)
    assert history.tolist() == [0.5, 2.0, 4.0]  # most recent first, oldest dropped
    assert amax_from_history(history, "max").item() == 4.0
    assert amax_from_history(history, "most_recent").item() == 0.5
    with pytest.raises(LowbitError, match="unknown amax_compute 'mean'; valid: max, most_recent"):
        amax_from_history(history, "mean")

    ds = DelayedScaling(448.0, history_len=2, amax_compute="max", margin=1)
    assert ds.update().item() == 1.0  # empty history: keep the initial scale
    ds.observe(7.0)
    assert ds.update().item() == 448.0 / 7.0 / 2
    ds.observe(14.0)
    ds.observe(0.5)
    assert ds.update().item() == 448.0 / 14.0 / 2
    state = ds.state_dict()
    other = DelayedScaling(448.0, history_len=2)
    other.load_state_dict(state)
    assert torch.equal(other.amax_history, ds.amax_history) and torch.equal(other.scale, ds.scale)
    q = quantize(torch.ones(4, 4), "fp8_e4m3_tensor", scale=ds.scale)
    assert q.scales.item() == pytest.approx(ds.scale_inv.item())


def test_tensor_amax():
    assert tensor_amax(torch.tensor([-3.0, 2.0])).item() == 3.0
    assert tensor_amax(torch.tensor([[1.0, -5.0], [2.0, 0.0]]), dim=-1).tolist() == [[5.0], [2.0]]
    assert math.isnan(tensor_amax(torch.tensor([1.0, math.nan])).item())
    # all zeros give +0, whatever their signs (the sign bit is what a -0 would show)
    for zeros in (torch.full((8,), -0.0), torch.tensor([0.0, -0.0]), torch.tensor([-0.0, 0.0])):
        assert tensor_amax(zeros).view(torch.int32).item() == 0
        assert torch.all(tensor_amax(zeros.view(2, -1), dim=-1).view(torch.int32) == 0)
