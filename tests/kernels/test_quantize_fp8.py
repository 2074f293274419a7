"""quantize_fp8 equals lowbit.numerics.quantize for FP8 specs with FP32 scales: codes and decode scales
bit for bit (RNE), per tensor (amax included, or a given scale) and per row, rowwise and colwise."""

import math

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.kernels.quantize_fp8 import quantize_fp8
from lowbit.numerics import QuantSpec, current_scale, dequantize, quantize, tensor_amax


def _assert_equal(x, out, bits, codes_equal=None, **fields):
    spec = QuantSpec(**fields)
    for codes, scales, t in ((out[0], out[1], x.cpu()), (out[2], out[3], x.cpu().t())):
        if not codes.numel():
            continue
        ref = quantize(t, spec)
        if codes_equal is not None:
            codes_equal(codes, ref.codes, t)
        assert torch.equal(codes.cpu(), ref.codes)
        assert torch.equal(bits(scales), bits(ref.scales))


@pytest.mark.parametrize("element", ["e4m3", "e5m2"])
@pytest.mark.parametrize("block", ["tensor", "row"])
@pytest.mark.parametrize("pow2", [False, True], ids=["amax", "pow2"])
def test_rne_rowwise_and_colwise_equal_the_numerics(element, block, pow2, adversarial, device, bits):
    x = adversarial(0, 48, 64)
    out = quantize_fp8(x.to(device), element, block=block, pow2=pow2, colwise=True)
    _assert_equal(x, out, bits, element=element, block=block, pow2_scale=pow2)


@pytest.mark.parametrize("kind", ["nan_inf", "bfloat16", "zeros", "odd"])
def test_special_tensors(kind, adversarial, device, bits, codes_equal):
    x = {
        "nan_inf": lambda: adversarial(1, 48, 64, specials=True),  # NaN/Inf amax: scale 1 (TE)
        "bfloat16": lambda: adversarial(2, 48, 64, specials=True).bfloat16(),
        "zeros": lambda: torch.zeros(32, 64),
        "odd": lambda: torch.randn(37, 53) * 1e-3,
    }[kind]()
    for block in ("tensor", "row"):
        out = quantize_fp8(x.to(device), "e4m3", block=block, colwise=True)
        _assert_equal(x, out, bits, codes_equal, element="e4m3", block=block)
    if not x.isnan().any():  # (a NaN amax keeps its payload or not, as the hardware does)
        assert torch.equal(bits(quantize_fp8(x.to(device))[4]), bits(tensor_amax(x).float()))


def test_given_scale_is_delayed_scaling(device, bits):
    x = torch.randn(48, 64) * 100
    scale = current_scale(torch.tensor(20.0), 448.0)  # from an earlier, smaller amax: saturates
    out = quantize_fp8(x.to(device), scale=scale.to(device), colwise=True)
    ref = quantize(x, "fp8_e4m3_tensor", scale=scale)
    assert torch.equal(out[0].cpu(), ref.codes) and torch.equal(bits(out[1]), bits(ref.scales))
    assert torch.equal(out[2].cpu(), ref.codes.t())
    assert out[4].item() == pytest.approx(x.abs().max().item())  # the amax to record


def test_stochastic_rounding_is_deterministic_and_unbiased(device):
    gen = torch.Generator().manual_seed(5)
    pattern = torch.randn(1, 64, generator=gen)
    x = pattern.expand(512, 64).contiguous()
    seed = torch.tensor([9], device=device)
    codes, scales, codes_t, _, _ = quantize_fp8(x.to(device), "e5m2", colwise=True, sr=(True, True), seed=seed)
    assert torch.equal(codes, quantize_fp8(x.to(device), "e5m2", sr=(True, False), seed=seed)[0])
    assert not torch.equal(codes.t(), codes_t)  # the two directions draw separate streams
    spec = QuantSpec(element="e5m2", block="tensor", rounding="sr")
    ref = quantize(x, spec.replace(rounding="rne"))
    ref.codes = codes.cpu()
    values = dequantize(ref, torch.float32)
    rel_step = 2.0**-2  # E5M2: 2 mantissa bits
    assert ((values - x).abs() <= rel_step * x.abs() + 1e-30).all()
    mean = values.double().mean(0)
    sigma = rel_step * pattern[0].double().abs() / 2 / math.sqrt(512)
    assert ((mean - pattern[0].double()).abs() <= 5 * sigma + 1e-12).all()


def test_bad_inputs_are_clear_errors(device):
    x = torch.randn(32, 64, device=device)
    with pytest.raises(LowbitError, match="unknown element format 'e2m1'"):
        quantize_fp8(x, "e2m1")
    with pytest.raises(LowbitError, match="block must be 'tensor' or 'row', got"):
        quantize_fp8(x, block=(1, 32))
    with pytest.raises(LowbitError, match="a given scale .delayed scaling. needs block='tensor'"):
        quantize_fp8(x, block="row", scale=torch.tensor(1.0))


def test_fake_implementation_gives_the_output_shapes(device):
    x = torch.randn(48, 64, device=device)
    seed = torch.zeros(1, dtype=torch.int64, device=device)
    for block, shapes in (
        ("tensor", [(48, 64), (1, 1), (64, 48), (1, 1), ()]),
        ("row", [(48, 64), (48, 1), (64, 48), (64, 1), (0,)]),
    ):
        args = (x, seed, None, "e4m3", block, False, True, True, False, False, 1.0, 1.0)
        torch.library.opcheck(torch.ops.lowbit.quantize_fp8.default, args)
        with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
            out = torch.ops.lowbit.quantize_fp8(mode.from_tensor(x), mode.from_tensor(seed), *args[2:])
        assert [tuple(t.shape) for t in out] == shapes
