"""HiFloat8 format plugin (arXiv 2409.16626): registry, code table, rounding."""

import math

import pytest
import torch

from lowbit.numerics import QuantSpec, fake_quantize, get_format
from lowbit.registry import registry


@pytest.fixture(scope="module")
def hif8():
    return registry.load("formats", "hif8")


def test_loads_through_the_registry(hif8):
    assert hif8.name == "hif8" and hif8.lowbit_plugin_api == 1 and get_format("hif8") is hif8
    assert registry.infos("formats")["hif8"].status == "ok"


def test_value_table_matches_the_paper(hif8):
    assert (hif8.max, hif8.min_normal, hif8.min_subnormal) == (2.0**15, 2.0**-15, 2.0**-22)
    values = hif8.values()
    positive = values[values > 0].double()
    assert values.numel() == 253  # 256 codes - NaN - two Infs; one zero
    assert positive.max() == 2.0**15 and positive.min() == 2.0**-22
    assert positive[positive >= 2.0**-15].min() == 2.0**-15
    # 38 binades: exponents -22 .. 15 (7 denormal + 31 normal)
    assert sorted(set(torch.floor(torch.log2(positive)).int().tolist())) == list(range(-22, 16))
    # tapered precision: 3 mantissa bits for |E| <= 3, 2 for |E| <= 7, 1 for |E| <= 15
    per_binade = {e: int((torch.floor(torch.log2(positive)) == e).sum()) for e in (0, 3, -3, 4, 7, -7, 8, 15, -15, -16)}
    assert per_binade == {0: 8, 3: 8, -3: 8, 4: 4, 7: 4, -7: 4, 8: 2, 15: 1, -15: 2, -16: 1}


def test_specific_codes(hif8):
    table = {
        0x00: 0.0, 0x08: 1.0, 0x0C: 1.5, 0x10: 2.0, 0x18: 0.5, 0x20: 4.0, 0x30: 0.25, 0x40: 16.0,
        0x60: 256.0, 0x6E: 32768.0, 0x7E: 2.0**-15, 0x01: 2.0**-22, 0x07: 2.0**-16, 0x88: -1.0, 0xEE: -32768.0,
    }  # fmt: skip
    codes = torch.tensor(list(table), dtype=torch.int32).to(torch.uint8)
    assert hif8.decode(codes).tolist() == list(table.values())
    assert hif8.encode(torch.tensor(list(table.values()))).tolist() == list(table)
    special = hif8.decode(torch.tensor([0x6F, 0xEF, 0x80], dtype=torch.uint8))
    assert special[0].item() == math.inf and special[1].item() == -math.inf and math.isnan(special[2].item())


def test_every_code_round_trips(hif8):
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    values = hif8.decode(codes)
    keep = ~torch.isnan(values)
    assert torch.equal(hif8.encode(values, saturate=False)[keep], codes[keep])
    assert torch.equal(hif8.decode(codes).nan_to_num(3.0), hif8.decode_reference(codes).nan_to_num(3.0))
    # saturating mode maps the Inf codes' values to +-max
    assert hif8.encode(torch.tensor([math.inf, -math.inf])).tolist() == [0x6E, 0xEE]


def _nearest_ties_away(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Brute force: the nearest grid value, ties away from zero (test reference only)."""
    mag = x.abs().double()[:, None]
    grid = values[values >= 0].double()
    dist = (mag - grid).abs()
    best = dist.min(-1, keepdim=True).values
    pick = torch.where(dist == best, grid, -1.0).max(-1).values  # largest on a tie = away
    return torch.where(x < 0, -pick, pick)


def test_ta_rounding_matches_brute_force(hif8):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40_000, generator=gen) * torch.exp2(torch.randint(-26, 16, (40_000,), generator=gen).float())
    values = hif8.values()
    positive = values[values >= 0].double()
    mids = ((positive[1:] + positive[:-1]) / 2).float()
    x = torch.cat([x, mids, -mids, torch.nextafter(mids, torch.zeros_like(mids))])
    x = x[x.abs() < 2.0**15]
    assert torch.equal(hif8.decode(hif8.encode(x)).double(), _nearest_ties_away(x, values))


def test_rounding_modes_and_overflow(hif8):
    x = torch.tensor([1.0625, -1.0625, 1.5 * 2.0**-20, 2.0**-23, 2.0**-23 * 0.999, 40959.0, 40960.0, -0.0])
    assert hif8.encode(x, saturate=False).tolist() == [0x09, 0x89, 0x04, 0x01, 0x00, 0x6E, 0x6F, 0x00]
    assert hif8.encode(x, rounding="rne").tolist()[:2] == [0x08, 0x88]  # ties to even instead
    assert hif8.encode(x).tolist()[6] == 0x6E  # saturating
    assert hif8.encode(torch.tensor([math.nan])).tolist() == [0x80]


def test_stochastic_rounding_is_unbiased(hif8):
    x = torch.full((200_000,), 1.03)
    out = hif8.decode(hif8.encode(x, rounding="sr", generator=torch.Generator().manual_seed(0))).double()
    assert set(out.unique().tolist()) == {1.0, 1.125}
    assert abs(out.mean().item() - 1.03) < 5 * math.sqrt(0.24 * 0.76 / 200_000) * 0.125


def test_usable_in_a_quant_spec(hif8):
    # HiF8 is most precise near 1 (3 mantissa bits for |E| <= 3), so use it unscaled (scale=1)
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    y = fake_quantize(x, QuantSpec(element="hif8", block="tensor", rounding="ta"), scale=1.0)
    near_one = (x.abs() >= 0.125) & (x.abs() < 16)
    assert torch.all(((y - x).abs() / x.abs())[near_one] <= 2**-4)
    assert torch.equal(y, hif8.decode(hif8.encode(x)))


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))


def _near_the_grid(hif8) -> torch.Tensor:
    """Every HiF8 value, every midpoint (the ties) and their float32 neighbours, both signs, in every
    binade the 38 cover and past them; 2^18 random float32 bit patterns; zeros, the saturation edge,
    float32 subnormals."""
    values = hif8.values()
    mids = (values[1:] + values[:-1]) / 2
    grid = torch.cat([values, mids])
    grid = torch.cat([grid, grid.nextafter(torch.tensor(math.inf)), grid.nextafter(torch.tensor(-math.inf))])
    gen = torch.Generator().manual_seed(7)
    random = torch.randint(-(2**31), 2**31 - 1, (1 << 18,), generator=gen, dtype=torch.int32).view(torch.float32)
    edges = torch.tensor([0.0, -0.0, 32768.0, 36864.0, 40960.0, 3e38, 1e-45, 1e-40, 2.0**-23, 2.0**-23 * 1.0000001])
    x = torch.cat([grid, -grid, random, edges, -edges])
    return x[torch.isfinite(x)]


@pytest.mark.parametrize("rounding", ["ta", "rne", "sr"])
def test_arithmetic_rounding_is_the_codes_values_bit_for_bit(hif8, rounding):
    """``grid_spacing`` lets quantization round finite input to HiF8 values without building codes
    (about 10x faster on CPU): the same values as decode(encode(x)), ties, denormals and SR included."""
    from lowbit.numerics import _fast

    assert _fast.supported(hif8, saturate=True) and not _fast.supported(hif8, saturate=False)
    x = _near_the_grid(hif8)
    codes = hif8.encode(x, rounding=rounding, saturate=True, generator=torch.Generator().manual_seed(1))
    rounded = _fast.round_to_format(hif8, x, rounding, torch.Generator().manual_seed(1))
    assert _same_bits(rounded, hif8.decode(codes))
    assert torch.equal(_fast.encode(hif8, x, rounding, torch.Generator().manual_seed(1)), codes)


HIF8_SPECS = {
    "acts": QuantSpec(element="hif8", rounding="ta", pow2_scale=True, amax_target=15.0),
    "grads": QuantSpec(element="hif8", rounding="ta", pow2_scale=True, amax_target=224.0),
    "row_sr": QuantSpec(element="hif8", block="row", rounding="sr"),
    "block_rne": QuantSpec(element="hif8", block=(1, 32), rounding="rne"),
}


@pytest.mark.parametrize(
    ("spec", "compile"),
    [
        # every spec eagerly; compiled (10-50 s each on an empty inductor cache) the recipe's activations
        # in the default run, the others in the slow one
        pytest.param(spec, compile, id=f"{'compiled' if compile else 'eager'}-{name}", marks=slow)
        for name, spec in HIF8_SPECS.items()
        for compile, slow in ((False, ()), (True, () if name == "acts" else pytest.mark.slow))
    ],
)
def test_fake_quantize_takes_the_arithmetic_path_with_the_general_paths_bits(spec, compile):
    from lowbit.numerics.quantize import _dequantize, _fake_quantize, _quantize

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(512, 256, generator=gen) * torch.exp2(torch.randint(-30, 20, (512, 1), generator=gen).float())
    x[0, :7] = torch.tensor([0.0, -0.0, 1e-45, -3e38, 7.5, -7.5, 1.5])
    x_nan = x.clone()
    x_nan[5, 3] = math.nan
    for t in (x, x_nan, x.bfloat16()):
        general = _dequantize(_quantize(t, spec, None, 5, None, None, fast=False), fast=False)
        fast = _fake_quantize(t, spec, None, 5, None, None, compile=compile)
        assert _same_bits(fast.float(), general.float())
