"""Element and scale formats: value tables, round trips, bit-exactness against torch's float8 casts."""

import math

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.numerics import (
    E2M1,
    E4M3,
    E5M2,
    E8M0,
    FP32,
    INT4,
    INT8,
    UE5M3,
    ElementFormat,
    format_names,
    get_format,
)
from lowbit.registry import registry

# (max, min normal, min subnormal, number of distinct finite values) from the specs:
# FP8 paper / OFP8 (E4M3, E5M2), OCP MX v1.0 tables 5.2-5.4 (FP6, FP4, E8M0), lowbit's UE5M3.
SPEC_CONSTANTS = {
    "e4m3": (448.0, 2.0**-6, 2.0**-9, 253),
    "e5m2": (57344.0, 2.0**-14, 2.0**-16, 247),
    "e2m3": (7.5, 1.0, 0.125, 63),
    "e3m2": (28.0, 0.25, 0.0625, 63),
    "e2m1": (6.0, 1.0, 0.5, 15),
    "ue5m3": (114688.0, 2.0**-14, 2.0**-17, 255),
    "e8m0": (2.0**127, 2.0**-127, 2.0**-127, 255),
    "int8": (127.0, 1.0, 1.0, 256),
    "int4": (7.0, 1.0, 1.0, 16),
}
SMALL_FORMATS = sorted(SPEC_CONSTANTS)
NATIVE = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def test_registry_lists_every_builtin_format():
    names = format_names()
    assert set(SMALL_FORMATS) | {"fp32", "hif8"} <= set(names)
    for name in names:
        fmt = registry.load("formats", name)
        assert isinstance(fmt, ElementFormat) and fmt.lowbit_plugin_api == 1 and fmt.name == name


def test_unknown_format_is_a_clear_error():
    with pytest.raises(LowbitError, match="unknown formats 'fp5'.*installed: .*e2m1"):
        get_format("fp5")
    with pytest.raises(LowbitError, match="named by a string"):
        get_format(3)


@pytest.mark.parametrize("name", SMALL_FORMATS)
def test_value_table_matches_spec_constants(name):
    fmt = get_format(name)
    max_, min_normal, min_sub, count = SPEC_CONSTANTS[name]
    assert (fmt.max, fmt.min_normal, fmt.min_subnormal) == (max_, min_normal, min_sub)
    values = fmt.values().double()
    assert values.numel() == count
    positive = values[values > 0]
    assert positive.max().item() == max_ and positive.min().item() == min_sub
    assert positive[positive >= min_normal].min().item() == min_normal
    if fmt.signed and not fmt.is_integer:
        assert torch.equal(values, torch.sort(-values).values)  # symmetric about zero
    assert torch.all(values[1:] > values[:-1])  # strictly ordered, no duplicates


def test_fp4_e2m1_value_table_is_exact():
    assert E2M1.values().tolist() == [-6, -4, -3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert E2M1.decode(torch.arange(16, dtype=torch.uint8)).tolist()[:8] == [0, 0.5, 1, 1.5, 2, 3, 4, 6]


@pytest.mark.parametrize("name", SMALL_FORMATS)
def test_every_code_decodes_and_round_trips(name):
    fmt = get_format(name)
    codes = fmt.all_codes()
    values = fmt.decode(codes)
    assert values.dtype == torch.float32 and values.shape == codes.shape
    assert torch.equal(values.nan_to_num(1.0), fmt.decode_reference(codes).nan_to_num(1.0))  # fast == definition
    again = fmt.encode(values, saturate=False)
    keep = ~torch.isnan(values)
    assert torch.equal(again[keep], codes[keep]), f"{name}: encode(decode(c)) != c"
    assert torch.isnan(values).sum().item() == {"e4m3": 2, "e5m2": 6, "ue5m3": 1, "e8m0": 1}.get(name, 0)


def test_e8m0_codes():
    codes = torch.tensor([0, 1, 127, 254, 255], dtype=torch.uint8)
    assert E8M0.decode(codes).tolist()[:4] == [2.0**-127, 2.0**-126, 1.0, 2.0**127]
    assert math.isnan(E8M0.decode(codes)[4].item())
    # linear rounding to a power of two: the midpoint of 2^k and 2^(k+1) is 1.5 * 2^k, ties up
    x = torch.tensor([0.0, -1.0, 2.0**-130, 1.4, 1.5, 1.6, 2.9, 3.0, 2.0**127 * 1.9, math.inf, math.nan])
    assert E8M0.encode(x).tolist() == [0, 0, 0, 127, 128, 128, 128, 129, 254, 254, 255]
    assert E8M0.encode(x, saturate=False).tolist()[-3:] == [255, 255, 255]


def _fp8_inputs(fmt) -> torch.Tensor:
    """~1.3M adversarial float32 inputs: random bit patterns, scaled normals, ties and their
    neighbours, subnormals, +-0, +-Inf, NaN, values just above max."""
    gen = torch.Generator().manual_seed(1234)
    random_bits = torch.randint(-(2**31), 2**31 - 1, (1 << 19,), generator=gen, dtype=torch.int64).to(torch.int32)
    exponents = torch.randint(-30, 20, (1 << 19,), generator=gen).float()
    scaled = torch.randn(1 << 19, generator=gen) * torch.exp2(exponents)
    values = fmt.values().double()
    mids = ((values[1:] + values[:-1]) / 2).float()  # exact ties (representable in float32)
    ties = torch.cat(
        [mids, torch.nextafter(mids, torch.full_like(mids, math.inf)), torch.nextafter(mids, -mids.abs() - 1)]
    )
    top = torch.tensor([fmt.max, fmt.max * 1.0625, fmt.max * 1.0626, fmt.max * 1.125, fmt.max * 2, 3e38])
    specials = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1e-45, -1e-45, 1.2e-38, fmt.min_subnormal / 2])
    return torch.cat([random_bits.view(torch.float32), scaled, ties, top, -top, specials])


@pytest.mark.parametrize("name", ["e4m3", "e5m2"])
def test_fp8_encode_matches_torch_cast(name):
    fmt = get_format(name)
    x = _fp8_inputs(fmt)
    ours = fmt.encode(x, native=False)  # saturating: clamp, then torch's RNE cast
    ref = torch.clamp(x, -fmt.max, fmt.max).to(NATIVE[name]).view(torch.uint8)
    assert torch.equal(ours, ref)
    assert torch.equal(fmt.encode(x), ref)  # the native fast path
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    ours_dec, ref_dec = fmt.decode_reference(codes), codes.view(NATIVE[name]).float()
    assert torch.equal(ours_dec.nan_to_num(7.0), ref_dec.nan_to_num(7.0))


def test_e5m2_non_saturating_matches_torch_ieee_cast():
    x = _fp8_inputs(E5M2)
    assert torch.equal(E5M2.encode(x, saturate=False, native=False), x.to(torch.float8_e5m2).view(torch.uint8))


def test_non_saturating_overflow_follows_fp8_paper():
    x = torch.tensor([464.0, 464.0001, 480.0, 1e9, math.inf, -math.inf, -500.0])
    # E4M3: 464 is the tie between 448 (even) and the NaN pattern -> 448; beyond -> NaN
    assert E4M3.encode(x, saturate=False).tolist() == [0x7E, 0x7F, 0x7F, 0x7F, 0x7F, 0xFF, 0xFF]
    assert E4M3.encode(x).tolist() == [0x7E, 0x7E, 0x7E, 0x7E, 0x7E, 0xFE, 0xFE]
    y = torch.tensor([61439.0, 61440.0, math.inf, -1e6])  # E5M2: 61440 ties to the Inf code
    assert E5M2.encode(y, saturate=False).tolist() == [0x7B, 0x7C, 0x7C, 0xFC]
    assert E5M2.encode(y).tolist() == [0x7B, 0x7B, 0x7B, 0xFB]


def test_formats_without_nan_saturate_and_map_nan_to_zero():
    x = torch.tensor([7.0, 1e30, math.inf, -math.inf, math.nan, -math.nan])
    for saturate in (True, False):
        assert E2M1.encode(x, saturate=saturate).tolist() == [0x7, 0x7, 0x7, 0xF, 0x0, 0x0]
    assert UE5M3.encode(torch.tensor([-1.0, math.nan, 2e5])).tolist() == [0, 0xFF, 0xFE]


@pytest.mark.parametrize("name", ["e4m3", "e5m2", "e2m3", "e3m2", "e2m1", "ue5m3"])
def test_rne_ties_go_to_the_even_code(name):
    fmt = get_format(name)
    codes = torch.arange(2 ** (fmt.bits - int(fmt.signed)), dtype=torch.int32).to(torch.uint8)  # magnitudes
    values = fmt.decode(codes).double()
    finite = torch.isfinite(values)
    values, codes = values[finite], codes[finite]
    ties = ((values[1:] + values[:-1]) / 2).float()
    got = fmt.encode(ties, native=False)
    low, high = codes[:-1], codes[1:]
    expected = torch.where(low % 2 == 0, low, high)
    assert torch.equal(got, expected)


def test_subnormals_encode_exactly():
    x = torch.tensor([2.0**-9, 3 * 2.0**-9, 7 * 2.0**-9, 2.0**-10, 2.0**-10 * 1.0001, 2.0**-10 * 0.9999])
    assert E4M3.encode(x, native=False).tolist() == [1, 3, 7, 0, 1, 0]
    assert E2M1.encode(torch.tensor([0.25, 0.2501, 0.75, -0.25])).tolist() == [0, 1, 2, 8]


@pytest.mark.parametrize("name", ["e2m1", "e4m3", "e3m2", "ue5m3"])
def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour(name):
    fmt = get_format(name)
    values = fmt.values().double()
    values = values[values >= 0]
    lo, hi = values[3].item(), values[4].item()  # two neighbours (subnormal or normal)
    for frac in (0.1, 0.5, 0.8):
        x = torch.full((200_000,), lo + frac * (hi - lo), dtype=torch.float32)
        out = fmt.decode(fmt.encode(x, rounding="sr", generator=torch.Generator().manual_seed(0))).double()
        assert set(out.unique().tolist()) <= {lo, hi}
        p = frac
        sigma = math.sqrt(p * (1 - p) / x.numel()) * (hi - lo)
        assert abs(out.mean().item() - x[0].item()) < 5 * sigma


def test_stochastic_rounding_is_reproducible_from_a_generator():
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(3))
    a = E2M1.encode(x, rounding="sr", generator=torch.Generator().manual_seed(7))
    b = E2M1.encode(x, rounding="sr", generator=torch.Generator().manual_seed(7))
    c = E2M1.encode(x, rounding="sr", generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_stochastic_rounding_of_representable_values_is_exact():
    values = E4M3.values()
    out = E4M3.decode(E4M3.encode(values, rounding="sr"))
    assert torch.equal(out, values)


def test_integer_formats():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 200.0, -200.0, math.nan, 6.7])
    assert INT8.encode(x).tolist() == [0, 2, 2, 0, -2, 127, -128, 0, 7]
    assert INT4.encode(x).tolist() == [0, 2, 2, 0, -2, 7, -8, 0, 7]
    assert INT8.encode(x).dtype == torch.int8
    assert INT4.decode(INT4.all_codes()).tolist() == list(range(-8, 8))


def test_fp32_format_is_the_bit_pattern():
    x = torch.tensor([1.0, -2.5, math.inf])
    assert FP32.encode(x).tolist() == x.view(torch.int32).tolist()
    assert torch.equal(FP32.decode(FP32.encode(x)), x)
    assert (FP32.max, FP32.min_normal, FP32.min_subnormal) == (torch.finfo(torch.float32).max, 2.0**-126, 2.0**-149)


def test_encode_accepts_any_float_dtype_and_shape():
    x = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0))
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        xd = x.to(dtype)
        assert torch.equal(E4M3.encode(xd, native=False), E4M3.encode(xd.float(), native=False))
        assert E4M3.encode(xd).shape == (3, 5, 7)


def test_large_tensors_are_chunked_with_identical_results():
    x = torch.randn(1 << 19, generator=torch.Generator().manual_seed(0)) * 4  # > one chunk
    whole = E2M1._encode(x, "rne", True, None)
    assert torch.equal(E2M1.encode(x), whole)
    assert torch.equal(E2M1.decode(whole), E2M1._decode(whole))


def test_unknown_rounding_is_a_clear_error():
    with pytest.raises(LowbitError, match="unknown rounding 'nearest'; valid: rne, ta, sr"):
        E4M3.encode(torch.ones(2), rounding="nearest")
