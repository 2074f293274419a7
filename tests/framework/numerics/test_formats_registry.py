"""Every installed number format (``lowbit.formats`` entry points, built-in or third-party) against
the ElementFormat contract: codes round-trip, encode is monotone, overflow saturates, midpoints
round to nearest even, NaN follows ``has_nan`` (rules: ``lowbit.numerics.formats`` docstring)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowbit.numerics import ElementFormat
from lowbit.registry import registry

FORMATS = registry.names("formats")
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
INF, NAN = float("inf"), float("nan")
SATURATION_VIOLATIONS = {
    "fp32": "FP32Format.encode ignores saturate: +-Inf stays +-Inf (formats docstring: saturating encode gives +-max)"
}
"""Known contract violations, each a strict xfail: it turns into a failure once the format is fixed."""


def _formats(xfail: dict[str, str]) -> list:
    return [
        pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=xfail[name])) if name in xfail else name
        for name in FORMATS
    ]


def _format(name: str) -> ElementFormat:
    fmt = registry.load("formats", name)
    assert isinstance(fmt, ElementFormat) and fmt.name == name
    return fmt


def _tabulated(fmt: ElementFormat) -> bool:
    """Formats of 8 bits or fewer list every code (``all_codes``) and value (``values``)."""
    return fmt.bits <= 8


def _codes(fmt: ElementFormat) -> torch.Tensor:
    """Every code of a tabulated format; for wider ones (FP32) a seeded sample of codes."""
    if _tabulated(fmt):
        return fmt.all_codes()
    info = torch.iinfo(fmt.code_dtype)
    gen = torch.Generator().manual_seed(0)
    sample = torch.randint(info.min, info.max + 1, (1 << 16,), generator=gen, dtype=torch.int64)
    edges = torch.tensor([0, 1, 2, info.max, info.min, info.min + 1, -1], dtype=torch.int64)
    specials = fmt.encode(_float32([INF, -INF, fmt.max, -fmt.max, fmt.min_subnormal, NAN]), saturate=False)
    return torch.cat([edges.to(fmt.code_dtype), specials, sample.to(fmt.code_dtype)])


def _covers_float32(fmt: ElementFormat) -> bool:
    """Every finite float32 is one of the format's values (no rounding can happen)."""
    return not fmt.is_integer and fmt.signed and fmt.ebits >= 8 and fmt.mbits >= 23


def _lowest(fmt: ElementFormat) -> float:
    """The smallest value: -max for signed floats, qmin for integers, the smallest code's value when unsigned."""
    if _tabulated(fmt):
        return float(fmt.values()[0])
    return -fmt.max if fmt.signed else 0.0


def _float32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).float()


def _past(bound: float) -> torch.Tensor:
    """Finite float32 values beyond ``bound`` (away from zero): one step past it, and well past it."""
    step = torch.nextafter(_float32([bound]), _float32([INF if bound > 0 else -INF]))
    candidates = torch.cat([step, _float32([bound * f for f in (1.25, 2, 16)])])
    return candidates[torch.isfinite(candidates) & (candidates.double().abs() > abs(bound))]


def _beyond_max(fmt: ElementFormat) -> torch.Tensor:
    return _past(fmt.max)


def _below_lowest(fmt: ElementFormat) -> torch.Tensor:
    """Finite float32 values below the smallest value (any negative one for an unsigned format)."""
    return _past(_lowest(fmt)) if fmt.signed else -_past(fmt.max)


def _rne_choice(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Of two adjacent values, the even one: the one that is an even multiple of their gap hi - lo
    (the mantissa LSB is 0 in minifloats, the even integer in INT, the upper power of two in E8M0)."""
    gap = hi - lo
    steps = lo / gap
    assert torch.equal(steps, steps.round()), "adjacent values off a common grid"
    return torch.where(torch.remainder(steps, 2) == 0, lo, hi)


# ---- codes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FORMATS)
def test_every_code_decodes_to_a_value_that_encodes_back_to_it(name):
    fmt = _format(name)
    codes = _codes(fmt)
    values = fmt.decode(codes)
    assert values.dtype == torch.float32
    finite, inf, nan = torch.isfinite(values), torch.isinf(values), torch.isnan(values)
    assert int(finite.sum()) > 0
    for rounding in fmt.roundings:  # an exact value needs no rounding, stochastic included
        encoded = fmt.encode(values[finite], rounding=rounding)
        assert encoded.dtype == codes.dtype and torch.equal(encoded, codes[finite]), rounding
    assert torch.equal(fmt.encode(values[inf], saturate=False), codes[inf])  # saturating: see below
    # NaN codes by their own rule: whatever NaN code encode picks, it decodes to NaN
    for saturate in (True, False):
        assert torch.isnan(fmt.decode(fmt.encode(values[nan], saturate=saturate))).all()
    if _tabulated(fmt):  # the declared specials are the ones the code table holds
        assert bool(nan.any()) == fmt.has_nan and bool(inf.any()) == fmt.has_inf
        assert float(values[finite].max()) == fmt.max
        if fmt.signed and not fmt.is_integer:
            assert float(values[finite].min()) == -fmt.max


@pytest.mark.parametrize("name", FORMATS)
def test_negative_zero_encodes_to_its_own_code_where_the_format_has_one(name):
    fmt = _format(name)
    values = fmt.decode(_codes(fmt))
    has_negative_zero = bool(((values == 0) & torch.signbit(values)).any())
    minus, plus = fmt.encode(_float32([-0.0, 0.0]))
    decoded = fmt.decode(minus.reshape(1))
    if has_negative_zero:
        assert minus != plus and float(decoded) == 0.0 and bool(torch.signbit(decoded))
    else:
        assert minus == plus  # -0 is +0 (or the smallest code of an unsigned format)


# ---- order and overflow --------------------------------------------------------------------------


def _probe_values(fmt: ElementFormat) -> torch.Tensor:
    """Sorted float32 probes: every value, the points between adjacent values, beyond ±max, ±Inf."""
    gen = torch.Generator().manual_seed(1)
    if _tabulated(fmt):
        v = fmt.values().double()
        between = [v[:-1] + (v[1:] - v[:-1]) * f for f in (0.25, 0.5, 0.75)]
        grid = torch.cat([v, *between]).float()
    else:
        magnitudes = torch.exp2(torch.empty(4096, dtype=torch.float64).uniform_(-149, 127, generator=gen))
        grid = torch.cat([magnitudes, -magnitudes]).float()
    probes = torch.cat([grid, _beyond_max(fmt), _below_lowest(fmt), _float32([INF, -INF, 0.0])])
    return probes.sort().values


@pytest.mark.parametrize("name", FORMATS)
def test_encode_is_monotone_in_the_value(name):
    fmt = _format(name)
    x = _probe_values(fmt)
    for rounding in (r for r in fmt.roundings if r != "sr"):
        y = fmt.decode(fmt.encode(x, rounding=rounding))
        assert not torch.isnan(y).any()
        assert bool((y[1:] >= y[:-1]).all()), f"{rounding}: decode(encode(x)) decreases somewhere"


@pytest.mark.parametrize("name", _formats(xfail=SATURATION_VIOLATIONS))
def test_values_beyond_max_saturate(name):
    fmt = _format(name)
    beyond = torch.cat([_beyond_max(fmt), _float32([INF])])
    assert torch.equal(fmt.decode(fmt.encode(beyond)), torch.full_like(beyond, fmt.max))
    # below the lowest: -max for signed floats, qmin for integers, the smallest code's value when unsigned
    below = torch.cat([_below_lowest(fmt), _float32([-INF])])
    assert torch.equal(fmt.decode(fmt.encode(below)), torch.full_like(below, _lowest(fmt)))


@pytest.mark.parametrize("name", FORMATS)
def test_non_saturating_overflow_is_inf_else_nan_else_max(name):
    """FP8 paper: overflow is Inf where the format has one (E5M2), else NaN (E4M3), else max (FP6, FP4, INT)."""
    fmt = _format(name)
    far = _float32([2 * fmt.max])  # Inf in float32 when 2·max overflows it
    y = fmt.decode(fmt.encode(torch.cat([far, -far]), saturate=False))
    if not fmt.signed:  # negative input to an unsigned format: its smallest code
        assert float(y[1]) == _lowest(fmt)
    if fmt.has_inf:
        assert float(y[0]) == INF and (float(y[1]) == -INF or not fmt.signed)
    elif fmt.has_nan:
        assert torch.isnan(y[0]) and (torch.isnan(y[1]) or not fmt.signed)
    else:
        assert y.tolist() == [fmt.max, _lowest(fmt)]


# ---- rounding ------------------------------------------------------------------------------------


def _adjacent_pairs(fmt: ElementFormat) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lo, hi, midpoint) in float64 for adjacent values whose midpoint is a float32."""
    v = fmt.values().double()
    lo, hi = v[:-1], v[1:]
    mid = (lo + hi) / 2
    exact = mid.float().double() == mid
    return lo[exact], hi[exact], mid[exact]


@pytest.mark.parametrize("rounding", ("rne", "ta"))
@pytest.mark.parametrize("name", FORMATS)
def test_midpoints_round_to_even_or_away_and_off_midpoints_to_nearest(name, rounding):
    fmt = _format(name)
    if rounding not in fmt.roundings:
        pytest.skip(f"{name} has no {rounding} rounding")
    if not _tabulated(fmt):
        pytest.skip(f"{name} covers float32: no float32 lies between two of its values")
    lo, hi, mid = _adjacent_pairs(fmt)
    assert len(mid) >= len(fmt.values()) // 2  # nearly every gap has a float32 midpoint
    assert bool((mid < 0).any()) == fmt.signed  # ties on both sides of zero
    tie = _rne_choice(lo, hi) if rounding == "rne" else torch.where(mid > 0, hi, lo)  # ta: away from zero
    got = fmt.decode(fmt.encode(mid.float(), rounding=rounding)).double()
    assert torch.equal(got, tie)
    # one float32 step off the midpoint is no tie: the nearer value, in both directions
    below = torch.nextafter(mid.float(), torch.tensor(-INF))
    above = torch.nextafter(mid.float(), torch.tensor(INF))
    assert torch.equal(fmt.decode(fmt.encode(below, rounding=rounding)).double(), lo)
    assert torch.equal(fmt.decode(fmt.encode(above, rounding=rounding)).double(), hi)


def _nearest(fmt: ElementFormat, x: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest-even onto the value table, by search (float64); x within [lowest, max]."""
    v = fmt.values().double()
    x = x.double()
    i = torch.searchsorted(v, x).clamp(1, len(v) - 1)  # v[i-1] <= x <= v[i]
    lo, hi = v[i - 1], v[i]
    d_lo, d_hi = x - lo, hi - x
    return torch.where(d_lo < d_hi, lo, torch.where(d_hi < d_lo, hi, _rne_choice(lo, hi)))


@pytest.mark.parametrize("name", FORMATS)
def test_encode_picks_the_nearer_neighbour_ties_to_even_property(name):
    fmt = _format(name)
    if "rne" not in fmt.roundings:
        pytest.skip(f"{name} has no rne rounding")
    if not _tabulated(fmt) and not _covers_float32(fmt):
        pytest.skip(f"{name} has no code table to find neighbours in")
    floats = st.floats(min_value=_lowest(fmt), max_value=fmt.max, width=32, allow_nan=False, allow_infinity=False)

    @PROPERTY
    @given(st.lists(floats, min_size=1, max_size=64))
    def check(xs):
        x = torch.tensor(xs, dtype=torch.float32)
        y = fmt.decode(fmt.encode(x, rounding="rne"))
        if not _tabulated(fmt):
            assert torch.equal(y, x)
            return
        assert torch.isin(y.double(), fmt.values().double()).all()  # always a value of the format
        expected = _nearest(fmt, x)
        assert torch.equal(y.double(), expected), (x, y, expected)

    check()


# ---- NaN -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FORMATS)
def test_nan_is_nan_where_the_format_has_one_else_plus_zero(name):
    fmt = _format(name)
    nans = torch.tensor([NAN, -NAN], dtype=torch.float32)
    for saturate in (True, False):
        for rounding in fmt.roundings:
            codes = fmt.encode(nans, saturate=saturate, rounding=rounding)
            y = fmt.decode(codes)
            if fmt.has_nan:
                assert torch.isnan(y).all(), (saturate, rounding)
            else:  # no NaN code: +0 (formats docstring), which decodes to zero with no sign
                plus_zero = fmt.encode(_float32([0.0]))
                assert torch.equal(codes, plus_zero.expand(2)), (saturate, rounding)
                assert y.tolist() == [0.0, 0.0] and not torch.signbit(y).any()
