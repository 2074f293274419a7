"""quantize / dequantize / fake_quantize / requantize: API, errors, and properties (hypothesis)."""

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from strategies import matrices

from lowbit.errors import LowbitError
from lowbit.numerics import (
    QTensor,
    QuantSpec,
    dequantize,
    fake_quantize,
    get_format,
    preset_names,
    quantize,
    requantize,
)
from lowbit.numerics.quantize import _quantize
from lowbit.numerics.spec import get_spec

MX_PRESETS = ["mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp4"]


PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("preset", MX_PRESETS)
@PROPERTY
@given(x=matrices())
def test_mx_fake_quantize_is_idempotent(preset, x):
    once = fake_quantize(x, preset)
    assert torch.equal(fake_quantize(once, preset), once)


def _half_ulp(values: torch.Tensor, fmt) -> torch.Tensor:
    """Half the spacing of the format's grid at |values| (float64)."""
    mag = values.abs().double()
    binade = torch.floor(torch.log2(torch.clamp(mag, min=fmt.min_normal)))
    return 0.5 * torch.exp2(binade - fmt.mbits)


@pytest.mark.parametrize("preset", MX_PRESETS + ["nvfp4", "nvfp4_2d", "fp8_e4m3_tensor", "fp8_e5m2_tensor"])
@PROPERTY
@given(x=matrices(cols=64, max_rows=16))
def test_rne_error_is_at_most_half_an_ulp_times_the_scale(preset, x):
    spec = QuantSpec.preset(preset)
    if spec.block == (16, 16):
        x = x.repeat(16 // x.shape[0] + 1, 1)[:16]
    q = quantize(x, spec)
    if q.global_scale is not None:
        # amax below ~2^-115 (NVFP4): the global decode scale 1/g is a float32 subnormal and the
        # element factors overflow to FLT_MAX, so the two-level scale loses the bound (TE's formula too)
        assume(float(q.global_scale) >= 2.0**-126)
    fmt = get_format(spec.element)
    rows, nb = q.codes.shape[0], q.scales.shape[-1]
    scale = q.scales.double()
    if spec.block == (16, 16):
        scale = scale.repeat_interleave(16, dim=0)
    elem_scale = scale.repeat_interleave(64 // nb, dim=-1) if nb > 1 else scale.expand(rows, 64)
    if q.global_scale is not None:
        elem_scale = elem_scale * q.global_scale.double()
    scaled = x.double() / elem_scale
    inside = (scaled.abs() <= fmt.max) & (elem_scale > 0)
    err = (dequantize(q).double() - x.double()).abs()
    bound = _half_ulp(scaled, fmt) * elem_scale
    # 1e-6 relative slack: NVFP4 and FP32 scales multiply by a rounded float32 reciprocal
    assert torch.all(err[inside] <= bound[inside] * (1 + 1e-6) + 1e-45)


@PROPERTY
@given(x=matrices(cols=64, max_rows=16))
def test_nvfp4_is_a_projection_onto_its_own_grid(x):
    """NVFP4 fake-quantization is idempotent only up to float32 rounding (see the next test);
    what holds exactly: re-encoding fq(x) with q's own scales gives q back. Codes can differ only
    in blocks whose E4M3 scale underflowed to 0, where TE's encode factor FLT_MAX saturates the
    codes of non-zero x (they decode to 0 either way)."""
    q = quantize(x, "nvfp4")
    again = requantize(dequantize(q), q)
    live = (q.scales > 0).repeat_interleave(16, dim=-1)
    same = (again.codes == q.codes) | (((again.codes & 7) == 0) & ((q.codes & 7) == 0))  # +-0 alike
    assert torch.all(same[live])
    assert torch.equal(dequantize(again), dequantize(q))


def test_nvfp4_fake_quantize_is_idempotent_only_up_to_rounding():
    # the tensor amax 36.09169 decodes to 6 * 448 * (1/g) = 36.091694 (one float32 ulp up): the
    # second pass has a different global scale, so the other block's values move by an ulp
    x = torch.tensor([[36.09169006347656] + [1.0] * 15, [7.0] * 16])
    once = fake_quantize(x, "nvfp4")
    twice = fake_quantize(once, "nvfp4")
    assert once[0, 0].item() == 36.09169387817383
    assert not torch.equal(twice, once)
    assert torch.allclose(twice, once, rtol=2**-22, atol=0)


@pytest.mark.parametrize("preset", sorted(preset_names()))
def test_every_preset_round_trips_shapes_and_dtypes(preset):
    x = torch.randn(2, 32, 64, generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        q = quantize(x.to(dtype), preset)
        assert isinstance(q, QTensor) and q.codes.shape == x.shape and q.shape == (2, 32, 64) and q.dtype == dtype
        assert q.codes.dtype == (torch.int8 if preset.startswith("int") else torch.uint8)
        y = dequantize(q)
        assert y.dtype == dtype and y.shape == x.shape
        assert torch.equal(q.dequantize(torch.float32), dequantize(q, torch.float32))
    bf16 = x.to(torch.bfloat16)
    assert torch.equal(quantize(bf16, preset).codes, quantize(bf16.float(), preset).codes)  # computed in float32


def test_non_contiguous_input():
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(fake_quantize(x.t(), "mxfp4"), fake_quantize(x.t().contiguous(), "mxfp4"))


def test_stochastic_rounding_in_quantize_is_reproducible():
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    spec = QuantSpec.preset("mxfp4").replace(rounding="sr")
    a, b = quantize(x, spec, seed=1), quantize(x, spec, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.codes, b.codes) and not torch.equal(a.codes, quantize(x, spec, seed=2).codes)
    with pytest.raises(LowbitError, match="either generator or seed"):
        quantize(x, spec, seed=1, generator=torch.Generator())


def test_storage_bits():
    q = quantize(torch.randn(4, 64), "mxfp4")
    assert q.storage_bits() == 256 * 4 + 8 * 8
    assert quantize(torch.randn(4, 64), "nvfp4").storage_bits() == 256 * 4 + 16 * 8 + 32


@pytest.mark.parametrize(
    "x,message",
    [
        (torch.arange(32), "needs a floating-point tensor .* got torch.int64"),
        (torch.ones(32, dtype=torch.bool), "got torch.bool"),
        (torch.ones(32, dtype=torch.complex64), "got torch.complex64"),
        (torch.ones(0, 32), r"needs a non-empty tensor, got shape \(0, 32\)"),
        ([1.0, 2.0], "needs a torch.Tensor, got list"),
    ],
)
def test_bad_inputs_are_clear_errors(x, message):
    with pytest.raises(LowbitError, match=message):
        quantize(x, "mxfp4")


def test_bad_arguments_are_clear_errors():
    x = torch.randn(4, 32)
    with pytest.raises(LowbitError, match="unknown quantization preset 'mxfp3'"):
        quantize(x, "mxfp3")
    with pytest.raises(LowbitError, match="amax/scale overrides need block='tensor' or global_scale"):
        quantize(x, "mxfp4", amax=1.0)
    with pytest.raises(LowbitError, match="scale override needs block='tensor' with scale_format='fp32'"):
        quantize(x, "nvfp4", scale=1.0)
    with pytest.raises(LowbitError, match="dequantize needs a QTensor"):
        dequantize(x)
    with pytest.raises(LowbitError, match=r"requantize needs x of shape \(4, 32\)"):
        requantize(torch.randn(4, 64), quantize(x, "mxfp4"))


def test_zero_dim_tensor_with_tensor_scale():
    q = quantize(torch.tensor(3.0), "fp8_e4m3_tensor")
    assert q.codes.shape == () and dequantize(q).item() == 3.0


def test_nan_and_inf_in_fp8_tensor_scaling():
    x = torch.tensor([[1.0, math.nan, -2.0, math.inf]])
    y = fake_quantize(x, "fp8_e4m3_tensor")
    assert y[0, 0].item() == 1.0 and math.isnan(y[0, 1].item()) and y[0, 2].item() == -2.0
    assert y[0, 3].item() == 448.0  # non-finite amax -> scale 1; Inf saturates


def _codes_for_given_scales(x, decode, qmin, qmax, zero_points=None):
    """The definition of given-scale integer codes: round-half-even(x * (1 / scale)) (+ zero point),
    clamped, the factor clamped to FLT_MAX; block scales repeated over their columns."""
    per_column = lambda t: t.repeat_interleave(x.shape[1] // t.shape[1], dim=1)  # noqa: E731
    factor = torch.clamp(torch.reciprocal(per_column(decode)), max=torch.finfo(torch.float32).max)
    codes = torch.round(x * factor)
    if zero_points is not None:
        codes = codes + per_column(zero_points)
    return torch.clamp(codes, qmin, qmax).to(torch.int8)


@settings(max_examples=40, deadline=None)
@given(x=matrices(cols=64, max_rows=4))
def test_given_scales_quantize_by_their_definition_and_match_the_measured_codes(x):
    for spec in ({"element": "int4", "block": (1, 32)}, {"element": "int8", "block": "row"}, "int8_channel"):
        measured = quantize(x, spec)
        element = get_format(measured.spec.element)
        for scales in (measured.scales, measured.scales / 2):  # the measured scales given back; others
            given = quantize(x, spec, scales=scales)
            assert torch.equal(given.codes, _codes_for_given_scales(x, scales, element.qmin, element.qmax))
            assert torch.equal(given.scales, scales)
            assert torch.equal(dequantize(given), fake_quantize(x, spec, scales=scales))
        # measured codes come from max / amax, given ones from 1 / (amax / max): one ulp apart, so
        # only a tie (x * factor = k + 1/2 exactly) can round the other way
        given = quantize(x, spec, scales=measured.scales)
        assert (given.codes.int() - measured.codes.int()).abs().max() <= 1
    asym = {"element": "int4", "block": (1, 32), "asymmetric": True}
    measured = quantize(x, asym)
    given = quantize(x, asym, scales=measured.scales, zero_points=measured.zero_points)
    assert torch.equal(given.codes, _codes_for_given_scales(x, measured.scales, -8, 7, measured.zero_points))
    assert torch.equal(given.codes, measured.codes)  # both encode with 1 / scale


def test_a_tie_under_the_measured_factor_may_round_the_other_way_under_the_given_scale():
    """amax 2 in INT4: factor 7 / 2 = 3.5 puts x = 1 on the tie 3.5 (even: 4); the decode scale
    2 / 7 given back has the float32 reciprocal 3.4999998, so 3. Found by hypothesis."""
    x = torch.tensor([[1.0] + [2.0] * 31])
    spec = {"element": "int4", "block": (1, 32)}
    measured = quantize(x, spec)
    assert measured.codes[0, 0].item() == 4 and quantize(x, spec, scales=measured.scales).codes[0, 0].item() == 3


def test_a_subnormal_asymmetric_scale_encodes_as_its_given_scales_do():
    """A constant block of 8.4498e-43 (float32 subnormal) has scale 5.6e-44, whose reciprocal
    overflows: the measured path clamps it to FLT_MAX as the given-scales path does (hypothesis
    found them giving codes 7 and -8)."""
    x = torch.full((1, 64), 8.4498e-43)
    asym = {"element": "int4", "block": (1, 32), "asymmetric": True}
    measured = quantize(x, asym)
    given = quantize(x, asym, scales=measured.scales, zero_points=measured.zero_points)
    assert torch.equal(given.codes, measured.codes) and torch.equal(dequantize(given), dequantize(measured))
    general = _quantize(x, get_spec(asym), None, None, None, None, fast=False)
    assert torch.equal(general.codes, measured.codes)


def test_given_scales_must_fit_the_layout_and_the_spec():
    x = torch.randn(4, 64)
    with pytest.raises(LowbitError, match=r"scales= has 4 values; block \(1, 32\) over shape \(4, 64\) needs shape"):
        quantize(x, {"element": "int4", "block": (1, 32)}, scales=torch.ones(4))
    with pytest.raises(LowbitError, match="given scales= are FP32 decode scales"):
        quantize(x, "nvfp4", scales=torch.ones(4, 4))
    with pytest.raises(LowbitError, match="zero_points= need an asymmetric spec"):
        quantize(x, {"element": "int4", "block": (1, 32)}, scales=torch.ones(4, 2), zero_points=torch.zeros(4, 2))
