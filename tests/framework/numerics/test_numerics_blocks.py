"""Block scales: MX (OCP MX v1.0 section 6.3), NVFP4 (Transformer Engine's reference), integers."""

import math
import warnings

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.numerics import (
    E2M1,
    E4M3,
    QuantSpec,
    block_layout,
    dequantize,
    fake_quantize,
    mx_scale_codes,
    quantize,
)

FLT_MAX = torch.finfo(torch.float32).max
MX_ELEMENTS = ["e4m3", "e5m2", "e2m3", "e3m2", "e2m1"]


def _adversarial(rows=64, cols=256, seed=0) -> torch.Tensor:
    """Rows of very different magnitudes, zero blocks, outliers, powers of two, subnormals."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen) * torch.exp2(torch.randint(-12, 12, (rows, 1), generator=gen).float())
    x[0, :32] = 0.0  # all-zero block
    x[1, 3] = 1e4  # outlier
    x[2, :32] = torch.exp2(torch.arange(32).float() - 16)  # powers of two, amax exactly 2^15
    x[3, :32] = 1e-40  # float32 subnormals
    x[4, :16] = 448.0 * 6
    return x


# ---- MX ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("element", MX_ELEMENTS)
def test_mx_floor_scale_is_spec_formula(element):
    x = _adversarial()
    q = quantize(x, QuantSpec(element=element, block=(1, 32), scale_format="e8m0"))
    amax = x.view(64, 8, 32).abs().amax(-1).double()
    emax = {"e4m3": 8, "e5m2": 15, "e2m3": 2, "e3m2": 4, "e2m1": 2}[element]  # OCP MX table 5.2
    nonzero = amax > 0
    expected = torch.clamp(torch.floor(torch.log2(amax[nonzero])) - emax, -127, 127) + 127
    assert torch.equal(q.scale_codes[nonzero].double(), expected)
    assert torch.all(q.scale_codes[~nonzero] == 0)
    assert torch.equal(q.scales, torch.exp2(q.scale_codes.double() - 127).float())


def test_mx_all_zero_block():
    x = torch.zeros(2, 64)
    x[1, 40] = 3.0
    q = quantize(x, "mxfp4")
    assert q.scale_codes.tolist() == [[0, 0], [0, 126]]  # zero block: 2^-127 (code 0); 3.0: 2^(1-2)
    assert torch.all(q.codes[0] == 0)
    assert torch.equal(dequantize(q), x)


def test_mx_outlier_block():
    x = torch.ones(1, 32)
    x[0, 5] = 1e4
    q = quantize(x, "mxfp4")
    # floor(log2(1e4)) = 13, emax(E2M1) = 2 -> X = 2^11; 1e4 / 2048 = 4.88 -> 4; ones underflow to 0
    assert q.scales.item() == 2.0**11
    y = dequantize(q)
    assert y[0, 5].item() == 4 * 2048.0 and torch.all(y[0, torch.arange(32) != 5] == 0)


def test_mx_nan_block_decodes_to_nan():
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    x[0, 7] = math.nan
    q = quantize(x, "mxfp8_e4m3")
    assert q.scale_codes[0, 0].item() == 255 and math.isnan(q.scales[0, 0].item())
    y = dequantize(q)
    assert (
        torch.all(torch.isnan(y[0, :32])) and not torch.any(torch.isnan(y[0, 32:])) and not torch.any(torch.isnan(y[1]))
    )


@pytest.mark.parametrize("element", MX_ELEMENTS)
def test_mx_amax_exactly_a_power_of_two(element):
    fmt_emax = {"e4m3": 8, "e5m2": 15, "e2m3": 2, "e3m2": 4, "e2m1": 2}[element]
    x = torch.zeros(1, 32)
    x[0, 0] = 2.0**fmt_emax * 8  # amax = 2^(emax+3): X = 2^3, element = 2^emax exactly
    x[0, 1] = -(2.0**fmt_emax) * 8
    q = quantize(x, QuantSpec(element=element, block=(1, 32), scale_format="e8m0"))
    assert q.scales.item() == 8.0
    assert torch.equal(dequantize(q), x)


def test_mx_floor_saturates_and_rceil_does_not():
    x = torch.tensor([[7.9] + [0.0] * 31])  # floor: X = 1, 7.9 -> 6 (saturated)
    assert dequantize(quantize(x, "mxfp4"))[0, 0].item() == 6.0
    rceil = QuantSpec(element="e2m1", block=(1, 32), scale_format="e8m0", scale_rule="rceil")
    q = quantize(x, rceil)
    assert q.scales.item() == 2.0  # 2^ceil(log2(7.9 / 6)) = 2
    assert dequantize(q)[0, 0].item() == 8.0  # 7.9 / 2 = 3.95 -> 4


def test_mx_scale_rules_on_one_amax():
    amax = torch.tensor([5.0, 6.0, 4.0, 7.9, 0.0, math.nan, 1e-40, 3e38])
    codes = {rule: mx_scale_codes(amax, E2M1, rule).tolist() for rule in ("floor", "ceil", "even", "nearest", "rceil")}
    assert codes["floor"] == [127, 127, 127, 127, 0, 255, 0, 252]
    assert codes["ceil"] == [128, 128, 127, 128, 0, 255, 0, 253]
    assert codes["even"] == [127, 127, 127, 128, 0, 255, 0, 253]  # 7.9, 3e38 round up at 1 mantissa bit; 5, 6 stay
    assert codes["nearest"] == [127, 128, 127, 128, 0, 255, 0, 253]  # log2(5) = 2.32 -> 2, log2(6) = 2.58 -> 3
    assert codes["rceil"] == [127, 127, 127, 128, 0, 255, 0, 253]


@pytest.mark.parametrize("element", MX_ELEMENTS)
@pytest.mark.parametrize("rule", ["floor", "ceil", "even", "rceil"])
def test_mx_matches_torchao_bit_exactly(element, rule):
    mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
    warnings.filterwarnings("ignore")
    x = _adversarial(seed=1)
    x[3, :32] = 1e-3  # torchao divides by max(X, 2^-126) where X = 2^-127; keep blocks above that
    dtypes = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2, "e2m1": torch.float4_e2m1fn_x2}
    scale, data = mx.to_mx(x, dtypes.get(element, f"fp6_{element}"), 32, getattr(mx.ScaleCalculationMode, rule.upper()))
    q = quantize(x, QuantSpec(element=element, block=(1, 32), scale_format="e8m0", scale_rule=rule))
    assert torch.equal(scale.view(torch.uint8).reshape(q.scale_codes.shape), q.scale_codes)
    codes = data.view(torch.uint8)
    if element == "e2m1":  # packed: element 2i low nibble
        codes = torch.stack((codes & 0xF, codes >> 4), dim=-1)
    assert torch.equal(codes.reshape(x.shape), q.codes)


def test_mx_tseng_prescale_never_clips_under_sr():
    x = torch.randn(128, 64, generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(element="e2m1", block=(1, 32), scale_format="e8m0", rounding="sr", sr_prescale=0.75)
    q = quantize(x, spec, seed=0)
    blocks = x.view(128, 2, 32)
    scaled = (blocks * 0.75 / q.scales[..., None]).abs()
    assert scaled.max().item() <= 6.0  # 3/4 of (< 2 * 2^emax) = 6: SR never needs to clip
    # unbiased: averaging many SR draws converges to x
    mean = torch.stack([fake_quantize(x, spec, seed=s) for s in range(200)]).mean(0)
    assert (mean - x).abs().mean().item() < 0.02


# ---- NVFP4 -------------------------------------------------------------------------------------
_FP4_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _fp4_rne_codes(v: torch.Tensor) -> torch.Tensor:
    """E2M1 codes of values in [-6, 6], RNE by brute force on the grid (ties to the even code)."""
    mag = v.abs().unsqueeze(-1)
    dist = (mag - _FP4_GRID).abs()
    best = dist.min(-1, keepdim=True).values
    candidates = dist == best  # one or two (a tie) neighbours
    index = torch.arange(8).expand_as(candidates)
    even = torch.where(candidates & (index % 2 == 0), index, 99).min(-1).values
    code = torch.where(candidates.sum(-1) > 1, even, torch.where(candidates, index, 99).min(-1).values)
    return (code | ((v < 0) | ((v == 0) & (torch.signbit(v)))).to(torch.int64) << 3).to(torch.uint8)


def _te_nvfp4_reference(x: torch.Tensor, tile_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A transcription of TE's NVFP4QuantizerRef formulas (quantization_nvfp4.py), for testing."""
    m, n = x.shape
    fp4_max, fp8_max = torch.tensor(6.0), torch.tensor(448.0)
    global_amax = x.abs().max()
    ges = torch.minimum(fp8_max * fp4_max / global_amax, torch.tensor(FLT_MAX))
    ges = torch.where(ges == 0, torch.ones_like(ges), ges)
    gds = 1.0 / ges
    if tile_rows == 1:
        vec_max = x.view(m, n // 16, 16).abs().amax(-1, keepdim=True)
    else:
        block_amax = x.view(m // 16, 16, n // 16, 16).abs().amax(dim=(1, 3))
        vec_max = block_amax.repeat_interleave(16, dim=0).unsqueeze(-1)
    decode_scale = torch.minimum(vec_max * (ges * torch.reciprocal(fp4_max)), torch.tensor(FLT_MAX))
    decode_scale = torch.clamp(decode_scale, -fp8_max, fp8_max).to(torch.float8_e4m3fn)
    encode_scale = torch.minimum(1.0 / (decode_scale.float() * gds), torch.tensor(FLT_MAX))
    scaled = torch.clamp(x.view(m, n // 16, 16) * encode_scale, -fp4_max, fp4_max)
    return _fp4_rne_codes(scaled.view(m, n)), decode_scale.view(torch.uint8).squeeze(-1), gds


@pytest.mark.parametrize("preset,tile_rows", [("nvfp4", 1), ("nvfp4_2d", 16)])
def test_nvfp4_matches_transformer_engine_reference(preset, tile_rows):
    for seed in range(3):
        x = _adversarial(seed=seed)
        x[5, 16:32] = 1e-6  # a block far below the tensor amax: its E4M3 scale underflows to 0
        codes, scale_codes, gds = _te_nvfp4_reference(x, tile_rows)
        q = quantize(x, preset)
        assert torch.equal(q.codes, codes)
        ours = q.scale_codes if tile_rows == 1 else q.scale_codes.repeat_interleave(16, dim=0)
        assert torch.equal(ours, scale_codes)
        assert q.global_scale.item() == gds.item()


def test_nvfp4_scale_formulas():
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    q = quantize(x, "nvfp4")
    amax = x.abs().max()
    assert q.global_scale.item() == pytest.approx(amax.item() / (448 * 6), rel=1e-6)  # decode direction
    block_amax = x.view(32, 4, 16).abs().amax(-1)
    target = block_amax / 6 / q.global_scale
    assert (
        torch.equal(q.scale_codes, E4M3.encode(target))
        or (q.scales - E4M3.decode(E4M3.encode(target))).abs().max() < 1e-6
    )
    assert q.scales.max().item() == 448.0  # the block holding the tensor amax uses the full E4M3 range
    y = dequantize(q)
    assert torch.all(y.abs().view(32, 4, 16) <= 6 * q.scales[..., None] * q.global_scale * (1 + 1e-6))


def test_nvfp4_2d_weight_and_its_transpose_quantize_identically():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)) * 3
    q, qt = quantize(w, "nvfp4_2d"), quantize(w.t().contiguous(), "nvfp4_2d")
    assert torch.equal(q.codes.t(), qt.codes)
    assert torch.equal(q.scales.t(), qt.scales)
    assert torch.equal(dequantize(q).t(), dequantize(qt))
    # 1x16 blocks do not have this property
    assert not torch.equal(fake_quantize(w, "nvfp4").t(), fake_quantize(w.t().contiguous(), "nvfp4"))


def test_nvfp4_zero_tensor_and_nan():
    q = quantize(torch.zeros(4, 32), "nvfp4")
    assert q.global_scale.item() == torch.reciprocal(torch.tensor(FLT_MAX)).item() and torch.all(dequantize(q) == 0)
    negative_zeros = quantize(torch.full((4, 32), -0.0), "nvfp4")  # once NaN: the amax was -0, g = -Inf
    assert negative_zeros.global_scale.item() == q.global_scale.item() and torch.all(dequantize(negative_zeros) == 0)
    x = torch.ones(4, 32)
    x[2, 3] = math.nan
    assert torch.all(torch.isnan(fake_quantize(x, "nvfp4")))  # the tensor amax is NaN (as TE)


def test_nvfp4_tiny_block_underflows_to_zero():
    x = torch.ones(1, 32) * 1e-9
    x[0, 0] = 1000.0
    q = quantize(x, "nvfp4")
    assert q.scale_codes[0, 1].item() == 0  # 1e-9 / 6 * 2688 / 1000 << E4M3 min subnormal: no clamp (TE)
    assert torch.all(dequantize(q)[0, 16:] == 0)


def test_nvfp4_sr_is_unbiased():
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    spec = QuantSpec.preset("nvfp4").replace(rounding="sr")
    mean = torch.stack([fake_quantize(x, spec, seed=s) for s in range(300)]).mean(0)
    rne_err = (fake_quantize(x, "nvfp4") - x).abs().mean()
    assert (mean - x).abs().mean() < 0.25 * rne_err


# ---- integers ----------------------------------------------------------------------------------
def test_int8_per_channel_symmetric():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    q = quantize(w, "int8_channel")
    amax = w.abs().amax(-1, keepdim=True)
    assert q.codes.dtype == torch.int8 and q.scales.shape == (16, 1)
    assert torch.allclose(q.scales, amax / 127, rtol=1e-6)
    assert torch.equal(q.codes.abs().amax(-1), torch.full((16,), 127, dtype=torch.int8))
    assert torch.all((dequantize(q) - w).abs() <= q.scales / 2 * (1 + 1e-5))


def test_int4_group32_and_zero_group():
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    x[1, :32] = 0
    q = quantize(x, "int4_group32")
    assert q.scales.shape == (4, 2) and q.codes.min() >= -7 and q.codes.max() <= 7
    assert q.scales[1, 0].item() == 1.0 and torch.all(dequantize(q)[1, :32] == 0)
    assert torch.all((dequantize(q) - x).abs() <= q.scales.repeat_interleave(32, -1) / 2 * (1 + 1e-5))


def test_int_asymmetric():
    x = torch.rand(8, 32, generator=torch.Generator().manual_seed(0)) * 5 + 1  # all positive
    spec = QuantSpec(element="int8", block=(1, 32), asymmetric=True)
    q = quantize(x, spec)
    assert q.zero_points.shape == (8, 1) and torch.all(q.zero_points == -128)  # the range starts at 0
    assert torch.all(q.codes.amax(-1) == 127)
    assert torch.all((dequantize(q) - x).abs() <= q.scales / 2 * (1 + 1e-5))
    y = torch.tensor([[-1.0, 0.0, 3.0, 2.0]])
    q = quantize(y, QuantSpec(element="int4", block="row", asymmetric=True))
    assert dequantize(q)[0, 1].item() == 0.0  # zero is exact
    assert q.codes.min().item() == -8 and q.codes.max().item() == 7


# ---- layout errors -----------------------------------------------------------------------------
def test_shapes_not_divisible_by_the_block_are_clear_errors():
    with pytest.raises(
        LowbitError, match=r"shape \(4, 40\) is not divisible by block \(1, 32\); need the last dim a multiple of 32"
    ):
        quantize(torch.randn(4, 40), "mxfp4")
    with pytest.raises(
        LowbitError, match=r"shape \(24, 32\) is not divisible by block \(16, 16\).*second-to-last a multiple of 16"
    ):
        quantize(torch.randn(24, 32), "nvfp4_2d")
    with pytest.raises(LowbitError, match="needs a tensor with at least 2 dimensions"):
        quantize(torch.randn(32), "nvfp4_2d")
    with pytest.raises(LowbitError, match="0-d tensor"):
        block_layout((), (1, 32))


def test_layout_scale_shapes():
    assert block_layout((2, 3, 64), (1, 32)).scale_shape == (2, 3, 2)
    assert block_layout((2, 32, 64), (16, 16)).scale_shape == (2, 2, 4)
    assert block_layout((5, 7), "row").scale_shape == (5, 1)
    assert block_layout((5, 7), "tensor").scale_shape == (1, 1)
    q = quantize(torch.randn(3, 32, 64), "nvfp4_2d")
    assert q.scales.shape == (3, 2, 4) and q.codes.shape == (3, 32, 64)
