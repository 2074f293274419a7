"""The kernels' element and scale helpers equal the numerics bit for bit, on every float32 class.

Every other bfloat16 bit pattern (every exponent, both signs), random float32 bit patterns, each
format's values, the midpoints between them (exact ties) and their float32 neighbours, at several
scales; NaN/Inf included. Stochastic rounding: the two neighbours only, unbiased, deterministic.
"""

import pytest
import torch
import triton
import triton.language as tl

from lowbit.kernels._common import decode_float, e8m0_code, e8m0_decode, e8m0_factor, encode_float, sr_bits
from lowbit.numerics import E2M1, E4M3, E5M2, E8M0, MX_SCALE_RULES, UE5M3, mx_scale_codes
from lowbit.numerics.blocks import pow2_from_exponent


@triton.jit
def _encode_kernel(x_ptr, code_ptr, value_ptr, n, seed, FMT: tl.constexpr, SR: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    code = encode_float(x, sr_bits(seed, offs, SR), FMT, SR)
    tl.store(code_ptr + offs, code, mask=mask)
    tl.store(value_ptr + offs, decode_float(code, FMT), mask=mask)


@triton.jit
def _e8m0_kernel(
    a_ptr, code_ptr, factor_ptr, value_ptr, n, RULE: tl.constexpr, ELEM: tl.constexpr, BLOCK: tl.constexpr
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    code = e8m0_code(tl.load(a_ptr + offs, mask=mask), RULE, ELEM)
    tl.store(code_ptr + offs, code, mask=mask)
    tl.store(factor_ptr + offs, e8m0_factor(code), mask=mask)
    tl.store(value_ptr + offs, e8m0_decode(code), mask=mask)


def _encode(x: torch.Tensor, fmt, device, sr=False, seed=0):
    x = x.to(device)
    codes = torch.empty(x.shape, dtype=torch.int32, device=device)
    values = torch.empty_like(x)
    _encode_kernel[(triton.cdiv(x.numel(), 8192),)](x, codes, values, x.numel(), seed, FMT=fmt.name, SR=sr, BLOCK=8192)
    return codes.cpu(), values.cpu()


def _inputs(fmt) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    every_bf16 = (torch.arange(0, 1 << 16, 2, dtype=torch.int32) << 16).view(torch.float32)
    random_f32 = torch.randint(-(2**31), 2**31 - 1, (1 << 14,), generator=gen, dtype=torch.int32).view(torch.float32)
    values = fmt.values().float()
    ties = (values[1:] + values[:-1]) / 2
    ties = torch.cat([ties * 2.0**k for k in (-12, -3, 0, 3)])
    near = torch.cat([torch.nextafter(ties, torch.tensor(0.0)), torch.nextafter(ties, torch.tensor(1e30))])
    edges = torch.tensor(
        [fmt.max, -fmt.max, torch.nextafter(torch.tensor(fmt.max), torch.tensor(1e30)).item(), 0.0, -0.0]
    )
    return torch.cat([every_bf16, random_f32, values, -values, ties, -ties, near, -near, edges])


@pytest.mark.parametrize("fmt", [E4M3, E5M2, E2M1, UE5M3], ids=lambda f: f.name)
def test_encode_and_decode_equal_the_format_bit_for_bit(fmt, device, bits):
    x = _inputs(fmt)
    codes, values = _encode(x, fmt, device)
    assert torch.equal(codes, fmt.encode(x).to(torch.int32))
    assert torch.equal(bits(values), bits(fmt.decode(codes.to(torch.uint8))))


@pytest.mark.parametrize("fmt", [E4M3, E2M1], ids=lambda f: f.name)
def test_stochastic_rounding_picks_a_neighbour_without_bias(fmt, device):
    draws = 4096
    grid = fmt.values()
    targets = torch.tensor(
        [grid[-2] * 0.75 + grid[-1] * 0.25, 0.3 * fmt.min_subnormal, -0.6 * grid[-3] - 0.4 * grid[-4]]
    )
    x = targets.repeat_interleave(draws)
    codes, values = _encode(x, fmt, device, sr=True, seed=123)
    again, _ = _encode(x, fmt, device, sr=True, seed=123)
    other, _ = _encode(x, fmt, device, sr=True, seed=124)
    assert torch.equal(codes, again)  # deterministic for a seed
    assert not torch.equal(codes, other)
    values = values.view(len(targets), draws)
    for target, got in zip(targets, values):
        below = grid[grid <= target].max()
        above = grid[grid >= target].min()
        assert set(got.unique().tolist()) == {below.item(), above.item()}  # both neighbours, nothing else
        sigma = (above - below).item() / 2 / draws**0.5
        assert abs(got.double().mean().item() - target.item()) < 5 * sigma  # unbiased


@pytest.mark.parametrize("rule", MX_SCALE_RULES)
def test_e8m0_scales_equal_mx_scale_codes(rule, device, bits):
    gen = torch.Generator().manual_seed(1)
    amax = torch.randint(0, 0x7F800000, (1 << 13,), generator=gen, dtype=torch.int32).view(torch.float32)
    specials = [
        0.0,
        float("inf"),
        float("nan"),
        1e-45,
        2.0**-127,
        2.0**-126,
        448.0,
        449.0,
        6.0,
        1.5,
        1.4142135,
        1.4142137,
    ]
    amax = torch.cat([amax, torch.tensor(specials), torch.exp2(torch.arange(-149, 128).float())])
    for elem in (E4M3, E5M2, E2M1):
        a = amax.to(device)
        codes = torch.empty(a.shape, dtype=torch.int32, device=device)
        factors, values = torch.empty_like(a), torch.empty_like(a)
        _e8m0_kernel[(triton.cdiv(a.numel(), 8192),)](
            a, codes, factors, values, a.numel(), RULE=rule, ELEM=elem.name, BLOCK=8192
        )
        ref = mx_scale_codes(amax, elem, rule).to(torch.int32)
        assert torch.equal(codes.cpu(), ref), elem.name
        assert torch.equal(bits(factors), bits(pow2_from_exponent(127 - ref))), elem.name
        assert torch.equal(bits(values), bits(E8M0.decode(ref.to(torch.uint8)))), elem.name
