"""quantize_mx equals lowbit.numerics.quantize for MX specs: codes and E8M0 scale codes, bit for bit (RNE).

Rowwise outputs against ``quantize(x, spec)``, colwise against ``quantize(x.t(), spec)``, on adversarial
inputs (zeros, -0, ties, subnormals, saturation, NaN/Inf, all-equal blocks, 2^120 of dynamic range)
in float32, bfloat16 and float16, every element format and scale rule, odd row counts, strided input
and the fused Hadamard transform; stochastic rounding is deterministic, neighbours only, unbiased.
"""

import dataclasses

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.kernels.quantize_mx import quantize_mx
from lowbit.numerics import MX_SCALE_RULES, QuantSpec, dequantize, quantize, unpack_fp4

ELEMENTS = ["e4m3", "e5m2", "e2m1"]


def _spec(element: str, **fields) -> QuantSpec:
    return QuantSpec(element=element, block=(1, 32), scale_format="e8m0", **fields)


def _codes(codes: torch.Tensor, element: str) -> torch.Tensor:
    codes = codes.cpu()
    return unpack_fp4(codes) if element == "e2m1" else codes


def _assert_equal(x, element, out, codes_equal=None, **fields):
    """Rowwise and (when present) colwise outputs equal the numerics' codes and scale codes."""
    codes, scales, codes_t, scales_t = out
    ref = quantize(x.cpu(), _spec(element, **fields))
    if codes_equal is not None:
        codes_equal(_codes(codes, element), ref.codes, x)
        codes_equal(scales, ref.scale_codes, what="scale codes")
    assert torch.equal(_codes(codes, element), ref.codes)
    assert torch.equal(scales.cpu(), ref.scale_codes)
    if codes_t.numel():
        ref_t = quantize(x.cpu().t(), _spec(element, **fields))
        assert torch.equal(_codes(codes_t, element), ref_t.codes)
        assert torch.equal(scales_t.cpu(), ref_t.scale_codes)


@pytest.mark.parametrize("element", ELEMENTS)
@pytest.mark.parametrize("kind", ["float32", "float32_nan_inf", "bfloat16", "float16"])
def test_rne_rowwise_and_colwise_equal_the_numerics(element, kind, adversarial, device, codes_equal):
    x = adversarial(0, 64, 96, specials=kind != "float32")
    if kind != "float32" and kind != "float32_nan_inf":
        x = x.clamp(-6e4, 6e4).to(getattr(torch, kind)) if kind == "float16" else x.to(torch.bfloat16)
    _assert_equal(x, element, quantize_mx(x.to(device), element, colwise=True), codes_equal)


@pytest.mark.parametrize("rule", MX_SCALE_RULES)
def test_every_scale_rule(rule, adversarial, device):
    x = adversarial(1, 64, 64, specials=True)
    for element in ELEMENTS:
        _assert_equal(x, element, quantize_mx(x.to(device), element, scale_rule=rule, colwise=True), scale_rule=rule)


def test_odd_row_counts_and_strided_input(device):
    x = torch.randn(37, 96) * 3
    _assert_equal(x, "e2m1", quantize_mx(x.to(device), "e2m1"))  # 37 rows: rowwise needs only K % 32
    y = torch.randn(64, 96)
    direct = quantize_mx(y.to(device).t(), "e4m3")  # a transposed view, read in place
    both = quantize_mx(y.to(device), "e4m3", colwise=True)
    assert torch.equal(direct[0], both[2]) and torch.equal(direct[1], both[3])


@pytest.mark.parametrize("size", [16, 32, 64, 128])
def test_fused_hadamard_transform(size, device):
    # dyadic inputs make the transform exact for 16 and 64 points (1/sqrt(n) a power of two): bit for bit
    gen = torch.Generator().manual_seed(size)
    x = torch.randint(-1000, 1000, (128, 128), generator=gen).float() / 256
    fields = {"rht_size": size, "rht_seed": 7}
    out = quantize_mx(x.to(device), "e2m1", colwise=True, rht=(size, size), rht_seed=(7, 7))
    if size in (16, 64):
        _assert_equal(x, "e2m1", out, **fields)
        return
    # 32 and 128 points: float32 sums in another order can move a value across a rounding boundary
    for codes, scales, t in ((out[0], out[1], x), (out[2], out[3], x.t())):
        ref = quantize(t, _spec("e2m1", **fields))
        assert (scales.cpu() != ref.scale_codes).float().mean() < 0.01
        got = unpack_fp4(codes.cpu())
        assert (got != ref.codes).float().mean() < 0.01


def test_stochastic_rounding_is_deterministic_neighbours_only_and_unbiased(device):
    gen = torch.Generator().manual_seed(3)
    pattern = torch.randn(1, 64, generator=gen)
    x = pattern.expand(512, 64).contiguous()  # 512 draws of every element
    seed = torch.tensor([11], device=device)
    args = {"sr": (True, False), "prescale": (0.75, 1.0), "seed": seed}
    codes, scales, _, _ = quantize_mx(x.to(device), "e2m1", **args)
    again = quantize_mx(x.to(device), "e2m1", **args)
    other = quantize_mx(x.to(device), "e2m1", **{**args, "seed": seed + 1})
    assert torch.equal(codes, again[0]) and not torch.equal(codes, other[0])  # deterministic for a seed
    spec = _spec("e2m1", rounding="sr", sr_prescale=0.75)
    rne = quantize(x, spec.replace(rounding="rne"))
    assert torch.equal(scales.cpu(), rne.scale_codes)  # scales do not depend on the rounding
    drawn = dataclasses.replace(rne, codes=unpack_fp4(codes.cpu()), spec=spec)
    values = dequantize(drawn, torch.float32).t()  # (64 elements, 512 draws), prescale divided out
    # every draw is one of the two grid points around its element (E2M1 steps at most 2 * scale)
    below = values.min(1).values
    above = values.max(1).values
    assert all(len(v.unique()) <= 2 for v in values)
    assert (below <= pattern[0]).all() and (above >= pattern[0]).all()
    step = 2 * rne.scales[0].repeat_interleave(32) / 0.75
    assert (above - below <= step).all()
    sigma = step.double() / 2 / 512**0.5
    assert ((values.double().mean(1) - pattern[0].double()).abs() <= 5 * sigma).all()  # unbiased


def test_bad_inputs_are_clear_errors(device):
    x = torch.randn(64, 48, device=device)
    with pytest.raises(LowbitError, match="rowwise MX blocks need K divisible by 32"):
        quantize_mx(x)
    with pytest.raises(LowbitError, match="colwise MX blocks need M divisible by 32"):
        quantize_mx(torch.randn(40, 64, device=device), colwise=True)
    with pytest.raises(LowbitError, match="unknown element format 'e3m2'"):
        quantize_mx(torch.randn(32, 64, device=device), "e3m2")
    with pytest.raises(LowbitError, match="unknown scale_rule 'up'"):
        quantize_mx(torch.randn(32, 64, device=device), scale_rule="up")
    with pytest.raises(LowbitError, match="needs a non-empty 2-D tensor"):
        quantize_mx(torch.randn(2, 32, 64, device=device))
    with pytest.raises(LowbitError, match="Hadamard sizes are 16, 32, 64 or 128"):
        quantize_mx(torch.randn(32, 64, device=device), rht=(8, 0))


def test_fake_implementation_gives_the_output_shapes(device):
    x = torch.randn(64, 96, device=device)
    seed = torch.zeros(1, dtype=torch.int64, device=device)
    args = (x, seed, "e2m1", "floor", True, True, 0, 0, 32, 1, False, True, 1.0, 0.75)
    torch.library.opcheck(torch.ops.lowbit.quantize_mx.default, args)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        out = torch.ops.lowbit.quantize_mx(mode.from_tensor(x), mode.from_tensor(seed), *args[2:])
    assert [tuple(t.shape) for t in out] == [(64, 48), (64, 3), (96, 32), (96, 2)]
    assert all(t.dtype == torch.uint8 for t in out)
