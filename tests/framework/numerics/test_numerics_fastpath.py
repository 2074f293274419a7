"""The arithmetic-only CPU path (``lowbit.numerics._fast``) gives the general path's bits, bit for bit.

Element level: every finite input class (every other bfloat16 bit pattern, random float32 bit patterns,
exact ties of every format at several scales and their float32 neighbours, +-max and the float
just above it, float32 subnormals, +-0) in every rounding. Whole path: every preset and more
specs, on inputs with zeros, subnormals, ties, saturation, NaN/Inf, all-equal blocks and a huge
dynamic range, in float32, bfloat16 and float16, with chunks small enough that NaN rows and
finite rows take different paths within one tensor. Bits are compared as integers, so NaN
payloads and the sign of zero count.
"""

import math

import pytest
import torch

import lowbit.numerics._chunks as chunks
from lowbit.numerics import (
    E2M1,
    E2M3,
    E3M2,
    E4M3,
    E5M2,
    E8M0,
    INT4,
    INT8,
    UE5M3,
    QuantSpec,
    RandomBits,
    _fast,
    _native,
    preset_names,
    round_to_integer,
)
from lowbit.numerics.formats import FloatFormat
from lowbit.numerics.quantize import _dequantize, _fake_quantize, _quantize, _requantize, dequantize, fake_quantize

FORMATS = [E4M3, E5M2, E2M3, E3M2, E2M1, INT8, INT4]
E3M4 = FloatFormat("e3m4", ebits=3, mbits=4, bias=3)  # not built in: any signed minifloat is covered


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bit pattern of a float tensor as integers (NaN payloads and -0 compare exactly)."""
    if t.dtype == torch.float32:
        return t.view(torch.int32)
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16)
    return t


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _finite_inputs(fmt) -> torch.Tensor:
    """Finite float32 values of every class, around the format's grid."""
    gen = torch.Generator().manual_seed(0)
    every_bf16 = (torch.arange(0, 1 << 16, 2, dtype=torch.int32) << 16).view(
        torch.float32
    )  # every exponent, both signs
    random_f32 = torch.randint(-(2**31), 2**31 - 1, (1 << 14,), generator=gen, dtype=torch.int32).view(torch.float32)
    values = fmt.values().float()
    ties = (values[1:] + values[:-1]) / 2  # exact midpoints: round-half-even decides them
    grid = torch.cat([values, ties])
    grid = torch.cat([grid * s for s in (1.0, 2.0**-9, 2.0**-3, 2.0**5)])  # other binades and the subnormal range
    neighbours = torch.cat([grid.nextafter(torch.tensor(math.inf)), grid.nextafter(torch.tensor(-math.inf))])
    edges = torch.tensor(
        [fmt.max, torch.tensor(fmt.max).nextafter(torch.tensor(math.inf)).item(), 3e38, 1e-45, 1e-40, 0.0, -0.0]
    )
    near_grid = torch.cat([grid, neighbours, edges])
    x = torch.cat([every_bf16, random_f32, near_grid, -near_grid])  # every_bf16 holds both signs already
    return x[torch.isfinite(x)]


@pytest.mark.parametrize("native", [True, False], ids=["c", "tensor-ops"])
@pytest.mark.parametrize("fmt", [*FORMATS, E3M4], ids=lambda f: f.name)
@pytest.mark.parametrize("rounding", ["rne", "ta", "sr"])
def test_element_encode_and_round_match_the_general_path(fmt, rounding, native, monkeypatch):
    if not native:
        monkeypatch.setattr(_native, "encode_float", lambda *args: None)
    x = _finite_inputs(fmt)
    assert _fast.supported(fmt, saturate=True)
    general = fmt.encode(x, rounding=rounding, saturate=True, generator=torch.Generator().manual_seed(1))
    fast = _fast.encode(fmt, x, rounding, torch.Generator().manual_seed(1))
    assert _same(fast, general)
    values = fmt.decode(general)
    rounded = _fast.round_to_format(fmt, x, rounding, torch.Generator().manual_seed(1))
    assert _same(rounded, values)


def test_stochastic_rounding_rounds_up_below_the_threshold():
    """SR rounds y up exactly where its 31 random bits are below floor(frac * 2^31): fractions at,
    just below and just above each element's bits / 2^31, 0, 2^-31, 2^-32 and 1 - 2^-24."""
    n = 1 << 12
    rng = RandomBits.draw(torch.Generator().manual_seed(3), "cpu")
    bits = rng.bits((n,))
    at = bits.double() / 2**31  # exact in float64; float32 rounds it, so take the exact float32 neighbours
    frac32 = at.float()
    edges = torch.tensor([0.0, 2.0**-31, 2.0**-32, 1.0 - 2.0**-24])
    for frac in [
        frac32,
        frac32.nextafter(torch.tensor(1.0)),
        frac32.nextafter(torch.tensor(0.0)),
        edges.repeat(n // 4),
    ]:
        frac = frac.clamp(0.0, 1.0 - 2.0**-24)
        y = frac + torch.arange(n).remainder(7).float()  # integer parts 0..6
        up = bits.double() < torch.floor((y - torch.floor(y)).double() * 2**31)
        expected = torch.floor(y) + up.float()
        assert _same(round_to_integer(y, "sr", rng), expected)
        assert _same(_fast.round_to_format(INT8, y, "sr", rng), expected.clamp(-128, 127))


def test_random_bits_depend_only_on_keys_and_index():
    """The bits of element i are hash(i, keys): a chunk's view gives the slice of the whole; the
    same generator seed gives the same bits; the bits are uniform (mean and each bit's rate)."""
    rng = RandomBits.draw(torch.Generator().manual_seed(5), "cpu")
    whole = rng.bits((1 << 16,))
    assert torch.equal(rng.at(1000).bits((24, 10)).flatten(), whole[1000:1240])
    assert torch.equal(RandomBits.draw(torch.Generator().manual_seed(5), "cpu").bits((1 << 16,)), whole)
    assert not torch.equal(RandomBits.draw(torch.Generator().manual_seed(6), "cpu").bits((1 << 16,)), whole)
    assert int(whole.min()) >= 0
    u = whole.double() / 2**31
    assert abs(float(u.mean()) - 0.5) < 4 * (1 / 12 / u.numel()) ** 0.5
    rates = torch.stack([(whole >> b) & 1 for b in range(31)]).double().mean(1)
    assert float((rates - 0.5).abs().max()) < 4 * (0.25 / u.numel()) ** 0.5
    assert float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1].abs()) < 4 / u.numel() ** 0.5  # neighbours


@pytest.mark.parametrize("native", [True, False], ids=["c-table", "tensor-ops"])
@pytest.mark.parametrize("fmt", [*FORMATS, E3M4], ids=lambda f: f.name)
def test_element_decode_matches_the_general_path(fmt, native, monkeypatch):
    if not native:
        monkeypatch.setattr(_native, "decode_float", lambda *args: None)
    codes = fmt.all_codes()
    special = torch.isnan(fmt.decode(codes)) | torch.isinf(fmt.decode(codes))
    finite_codes = codes[~special]
    assert _same(_fast.decode(fmt, finite_codes), fmt.decode(finite_codes))
    if native or fmt is E5M2:  # the C kernel and torch's E5M2 cast decode every code, Inf and NaN too
        assert _same(_fast.decode(fmt, codes), fmt.decode(codes))
    else:  # Inf/NaN codes are the general path's: decode says so and quantize falls back
        assert (_fast.decode(fmt, codes) is None) == bool(special.any())


def test_what_the_fast_path_covers():
    assert all(_fast.supported(f, saturate=True) for f in FORMATS)
    assert _fast.supported(E2M1, saturate=False) and _fast.supported(INT8, saturate=False)  # always saturate
    assert not _fast.supported(E4M3, saturate=False) and not _fast.supported(E5M2, saturate=False)  # NaN / Inf overflow
    assert not _fast.supported(UE5M3, saturate=True)  # unsigned
    assert not _fast.supported(E8M0, saturate=True)
    plugin = type("PluginE4M3", (FloatFormat,), {})(name="plugin_e4m3", ebits=4, mbits=3, bias=7, special="fn")
    assert not _fast.supported(plugin, saturate=True)  # a plugin format keeps its own encode...
    # ...unless it describes its grid (HiF8's grid_spacing: tests/plugins/formats/test_hif8.py)


def _adversarial(seed: int) -> torch.Tensor:
    """(48, 128): a huge dynamic range across rows, and one special block pattern per row."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(48, 128, generator=gen) * torch.exp2(torch.randint(-60, 60, (48, 1), generator=gen).float())
    x[0] = 0.0  # all-zero blocks
    x[1] = -0.0
    x[2, :64] = 2.5  # all-equal blocks, each value an exact tie in several formats
    x[3, :32] = torch.exp2(torch.arange(32).float() - 16)  # powers of two
    x[4, :32] = 1e-40  # float32 subnormals
    x[4, 32:64] = 1e-45
    x[5, 3] = 3e38  # near FLT_MAX
    x[6, :16] = 448.0 * 6  # saturates E4M3 / E2M1 at tensor scale
    x[7, :16] = 1e30  # an NVFP4 block next to blocks whose E4M3 scale underflows to 0
    x[7, 16:48] = 1e-30
    x[8] = torch.arange(128).float() * 0.25 - 16  # ties of every FP4/FP6 step
    x[9, 1] = 1e4  # an outlier that flushes its block
    return x


def _with_specials(x: torch.Tensor) -> torch.Tensor:
    y = x.clone()
    y[20, 5] = math.nan
    y[21, 7] = math.inf
    y[22, 9] = -math.inf
    y[23, 0] = torch.tensor(0x7F800001, dtype=torch.int32).view(torch.float32)  # a signalling NaN payload
    y[24, 100] = torch.tensor(-0x3FFF_FEDD, dtype=torch.int32).view(torch.float32)  # a negative NaN with payload
    return y


def _specs() -> list[QuantSpec]:
    presets = [QuantSpec.preset(p) for p in preset_names()]
    return [
        *presets,
        *(s.replace(rounding="sr") for s in presets),
        QuantSpec.preset("mxfp6_e3m2").replace(rounding="ta"),  # ta shares sr's code; its elements are tested above
        QuantSpec.preset("int4_group32").replace(rounding="ta"),
        QuantSpec.preset("mxfp4").replace(rounding="sr", rht_size=16, sr_prescale=0.75),
        QuantSpec.preset("nvfp4").replace(rht_size=16),
        QuantSpec.preset("mxfp8_e4m3").replace(scale_rule="rceil"),
        QuantSpec(element="int8", block=(1, 32), asymmetric=True),
        QuantSpec(element="int4", block="tensor", asymmetric=True),
        QuantSpec(element="e4m3", block="tensor", saturate=False),
        QuantSpec(element="e5m2", block="row", saturate=False),
        QuantSpec(element="e2m1", block=(1, 32), scale_format="ue5m3"),
        QuantSpec(element="e4m3", block="tensor", pow2_scale=True),
    ]


SPECS = _specs()
INPUTS = {
    "float32": _adversarial(0),
    "float32_nan_inf": _with_specials(_adversarial(1)),
    "bfloat16": _with_specials(_adversarial(2)).bfloat16(),
    "float16": _adversarial(3).clamp(-6e4, 6e4).half(),
}


@pytest.fixture(params=[1 << 17, 640], ids=["default_chunks", "small_chunks"])
def chunk_elements(request, monkeypatch):
    """Small chunks put NaN rows and finite rows of one tensor in different chunks (paths)."""
    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", request.param)
    return request.param


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.element}-{s.block}-{s.scale_format}-{s.rounding}")
def test_quantize_dequantize_and_fake_quantize_match_the_general_path(spec, chunk_elements):
    for name, x in INPUTS.items():
        general = _quantize(x, spec, None, 5, None, None, fast=False)
        fast = _quantize(x, spec, None, 5, None, None)
        assert _same(fast.codes, general.codes), name
        assert _same(fast.scales, general.scales) and _same(fast.scale_codes, general.scale_codes), name
        reference = _dequantize(general, fast=False)
        assert _same(dequantize(general), reference), name
        assert _same(_dequantize(general, torch.float32), _dequantize(general, torch.float32, fast=False)), name
        assert _same(fake_quantize(x, spec, seed=5), reference), name
        assert _same(_fake_quantize(x, spec, None, 5, None, None, fast=False), reference), name
        again = _requantize(reference, general, None, 6, fast=False)
        assert _same(_requantize(reference, general, None, 6).codes, again.codes), name


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.element}-{s.block}-{s.scale_format}-{s.rounding}")
@pytest.mark.parametrize("fill", [0.0, -0.0, 1e-45, 3.0], ids=["zeros", "negative_zeros", "min_subnormal", "all_equal"])
def test_constant_tensors_match_the_general_path(spec, fill):
    """Constant tensors; all -0 once made NVFP4's global scale -Inf (factors not finite)."""
    x = torch.full((32, 64), fill)
    general = _quantize(x, spec, None, 5, None, None, fast=False)
    reference = _dequantize(general, fast=False)
    assert _same(fake_quantize(x, spec, seed=5), reference)
    assert _same(_quantize(x, spec, None, 5, None, None).codes, general.codes)
    assert _same(dequantize(general), reference)


def test_overrides_match_the_general_path():
    x = _with_specials(_adversarial(4))
    overrides = [
        ("fp8_e4m3_tensor", {"scale": 0.01}),
        ("fp8_e4m3_tensor", {"amax": 5.0}),
        ("nvfp4", {"amax": 3.0}),
        ("fp8_e4m3_tensor", {"scale": math.inf}),  # factors that are not finite: the general path
        ("fp8_e5m2_tensor", {"scale": math.nan}),
        ("nvfp4", {"amax": 0.0}),
        ("nvfp4", {"amax": -0.0}),
        ("nvfp4", {"amax": math.inf}),
    ]
    for spec, kwargs in overrides:
        spec = QuantSpec.preset(spec)
        for data in (x, _adversarial(4)):
            amax, scale = kwargs.get("amax"), kwargs.get("scale")
            general = _dequantize(_quantize(data, spec, None, None, amax, scale, fast=False), fast=False)
            assert _same(fake_quantize(data, spec, **kwargs), general)
            assert _same(dequantize(_quantize(data, spec, None, None, amax, scale)), general)
