"""The C kernels (``lowbit.numerics._native``): the butterfly gives the reference RHT's bits for every
layout, size, dtype and direction, on adversarial inputs, and None (the compiled path) wherever it does
not apply; the SR hash gives ``hash_bits``' bits for any offset and keys; the error sums give the tensor
ops' counts and max exactly and their sums to the last digits, independent of the thread count; the
minifloat encode gives the format's codes (RNE and SR) and the decode table every code's value; the block
kernels (extrema, quantize, dequantize) give the formats' own codes, scales and values for every preset."""

import dataclasses
import math
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.numerics import (
    E2M1,
    E2M3,
    E3M2,
    E4M3,
    E5M2,
    INT4,
    INT8,
    _fast,
    _native,
    dequantize,
    fake_quantize,
    get_format,
    get_spec,
    preset_names,
    quantize,
)
from lowbit.numerics.blocks import block_layout, fp32_scales, lowp_block_scales, mx_scale_codes
from lowbit.numerics.error import _error_sums, quant_error, quant_error_and_scales
from lowbit.numerics.formats import IntFormat
from lowbit.numerics.hadamard import (
    inverse_rht,
    random_signs,
    rht,
    rotate_blocks,
    rotate_columns,
    unrotate_blocks,
    unrotate_columns,
)
from lowbit.numerics.quantize import _dequantize, _fake_quantize, _quantize, _rht
from lowbit.numerics.rounding import RandomBits, hash_bits

pytestmark = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler: the kernel is never used"
)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _adversarial(rows: int, cols: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Rows and columns spanning 2^-100..2^100, ±0 runs, equal runs, float32 subnormals, values whose
    sums cancel, and a column count that is not a multiple of the kernel's 64-wide tile."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen) * torch.logspace(-30, 30, cols, base=10.0)[None, :]
    x = x * torch.logspace(-8, 8, rows, base=10.0)[:, None]
    x[:16, :5] = 0.0
    x[16:32, :5] = -0.0
    x[:, 5:9] = 3.0
    x[32:64, 9:11] = 1e-42
    x[64:96, 11] = torch.tensor([1.0, -1.0] * 16) * 3.4e38  # near FLT_MAX: sums overflow to ±Inf
    x[96:128, 12] = torch.tensor([1.0, 1e-8] * 16)  # cancellation: order-sensitive sums
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n", [16, 32, 64, 256])
def test_columns_are_the_reference_bits(n, dtype):
    x = _adversarial(512, 3 * 64 + 13, dtype)
    signs = random_signs(n, 7)
    forward = _native.rotate_columns(x, signs)
    inverse = _native.rotate_columns(x, signs, inverse=True)
    assert forward is not None and inverse is not None
    assert _same(forward, rotate_columns(x, signs))
    assert _same(inverse, unrotate_columns(x, signs))
    assert bool(torch.isinf(forward).any())  # the near-FLT_MAX column did overflow, as the reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n", [32, 64, 256])
def test_blocks_are_the_reference_bits(n, dtype):
    x = _adversarial(256, 512, dtype).reshape(-1, n)[:-3]  # a block count that is not a multiple of 64
    x = x.contiguous()
    signs = random_signs(n, 3)
    assert _same(_native.rotate_blocks(x, signs), rotate_blocks(x, signs))
    assert _same(_native.rotate_blocks(x, signs, inverse=True), unrotate_blocks(x, signs))


@settings(max_examples=25, deadline=None)
@given(
    log_n=st.integers(4, 8),
    groups=st.integers(1, 6),
    cols=st.integers(1, 150),
    seed=st.integers(0, 2**16),
    exponent=st.integers(-120, 120),
)
def test_any_shape_and_scale_gives_the_reference_bits(log_n, groups, cols, seed, exponent):
    n = 1 << log_n
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(groups * n, cols, generator=gen) * 2.0**exponent
    signs = random_signs(n, seed)
    assert _same(_native.rotate_columns(x, signs), rotate_columns(x, signs))
    blocks = x.reshape(-1, n)
    got = _native.rotate_blocks(blocks, signs)
    if n >= 32:
        assert _same(got, rotate_blocks(blocks, signs))
    else:
        assert got is None  # 16 lanes along rows: the compiled kernel is the faster
    assert _same(_native.rotate_blocks(blocks, signs, narrow=True), rotate_blocks(blocks, signs))  # any width


def test_where_it_does_not_apply_it_returns_none():
    signs = random_signs(16, 0)
    assert _native.rotate_columns(torch.randn(64, 8, dtype=torch.float16), signs) is None
    assert _native.rotate_columns(torch.randn(8, 64).t(), signs) is None  # not contiguous
    assert _native.rotate_columns(torch.randn(40, 8), signs) is None  # 16 does not divide the rows
    assert _native.rotate_blocks(torch.randn(8, 64), random_signs(32, 0)) is None  # not 32-lane blocks


def test_without_a_compiler_or_when_turned_off_the_callers_take_the_compiled_path(monkeypatch):
    signs = random_signs(16, 0)
    x = torch.randn(64, 8)
    _native._library.cache_clear()
    try:
        monkeypatch.setattr(_native.shutil, "which", lambda name: None)
        assert _native.rotate_columns(x, signs) is None
        _native._library.cache_clear()
        monkeypatch.undo()
        monkeypatch.setenv("LOWBIT_NATIVE", "0")
        assert _native.rotate_columns(x, signs) is None
    finally:
        _native._library.cache_clear()
    monkeypatch.delenv("LOWBIT_NATIVE")
    assert _same(_native.rotate_columns(x, signs), rotate_columns(x, signs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_eager_quantization_rotates_by_the_c_kernel_with_the_reference_bits(monkeypatch, dtype):
    x = _adversarial(256, 512, dtype)
    calls = []
    original = _native.rotate_blocks
    monkeypatch.setattr(_native, "rotate_blocks", lambda *a, **k: calls.append(a[0].shape) or original(*a, **k))
    for size in (16, 32):
        assert _same(_rht(x, size, 5, compile=False), rht(x, size, 5))
        assert _same(_rht(x, size, 5, compile=False, inverse=True), inverse_rht(x, size, 5))
    assert len(calls) == 4  # not the eager butterfly
    spec = get_spec("nvfp4").replace(rht_size=16, rounding="sr")  # eager quantization, the reference's RHT
    monkeypatch.setenv("LOWBIT_NATIVE", "0")
    _native._library.cache_clear()
    try:
        reference = _fake_quantize(x, spec, torch.Generator().manual_seed(1), None, None, None)
    finally:
        _native._library.cache_clear()
    monkeypatch.delenv("LOWBIT_NATIVE")
    assert _same(_fake_quantize(x, spec, torch.Generator().manual_seed(1), None, None, None), reference)


@settings(max_examples=40, deadline=None)
@given(
    offset=st.sampled_from([0, 1, 2**31 - 5, 2**31, 2**32 - 3, 2**32, 7 * 2**32 + 11]) | st.integers(0, 2**40),
    n=st.integers(1, 3000),
    k0=st.integers(-(2**31), 2**31 - 1),
    k1=st.integers(-(2**31), 2**31 - 1),
)
def test_sr_bits_are_the_hash_of_each_index(offset, n, k0, k1):
    keys = torch.tensor([k0, k1], dtype=torch.int32)
    index = torch.arange(offset, offset + n, dtype=torch.int64).to(torch.int32)  # wraps mod 2^32, as the kernel
    assert torch.equal(_native.sr_bits(offset, n, keys), hash_bits(index, keys))


def test_random_bits_take_the_c_hash_and_fall_back_to_the_same_bits(monkeypatch):
    bits = RandomBits(torch.tensor([12345, -678], dtype=torch.int32), offset=2**32 - 100)
    calls = []
    original = _native.sr_bits
    monkeypatch.setattr(_native, "sr_bits", lambda *a: calls.append(a[:2]) or original(*a))
    got = bits.bits((40, 50))
    assert calls == [(2**32 - 100, 2000)]
    monkeypatch.undo()
    monkeypatch.setenv("LOWBIT_NATIVE", "0")
    _native._library.cache_clear()
    try:
        assert _native.sr_bits(0, 10, bits.keys) is None
        assert torch.equal(bits.bits((40, 50)), got)  # the tensor ops' bits
    finally:
        _native._library.cache_clear()


def _error_case(n: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x over 2^-100..2^100 with zeros, subnormals and Inf; q: x with some elements zeroed (underflow),
    perturbed, and a NaN where the sums must show it."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen) * torch.logspace(-30, 30, n, base=10.0)[torch.randperm(n, generator=gen)]
    x[::11] = 0.0
    x[1::13] = 1e-42
    x = x.to(dtype)
    q = x.float().clone()
    q[2::7] = 0.0
    q[3::5] *= 1.0 + 2.0**-10
    return x, q


@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 100_000), seed=st.integers(0, 2**16), bf16=st.booleans())
def test_error_sums_are_the_tensor_ops_sums(n, seed, bf16):
    x, q = _error_case(n, torch.bfloat16 if bf16 else torch.float32, seed)
    signal, noise, underflowed, nonzero, max_abs = _native.error_sums(x, q)
    ref = [float(t) for t in _error_sums(x, q)] if n else [0.0, 0.0, 0, 0, 0.0]
    assert (underflowed, nonzero, max_abs) == (ref[2], ref[3], ref[4])  # counts and max: exact
    assert signal == pytest.approx(ref[0], rel=1e-12) and noise == pytest.approx(ref[1], rel=1e-12)


def test_error_sums_show_nan_and_inf_as_the_tensor_ops_do():
    x, q = _error_case(5000, torch.float32, 0)
    q[4321] = float("nan")
    got = _native.error_sums(x, q)
    assert math.isnan(got[1]) and math.isnan(got[4]) and got[2:4] == tuple(int(t) for t in _error_sums(x, q)[2:4])
    x[17], q[17] = float("inf"), float("inf")  # inf - inf: a NaN difference, as in float64 tensors
    assert math.isnan(_native.error_sums(x, torch.where(torch.isnan(q), 0.0, q))[4])
    x2, q2 = _error_case(5000, torch.float32, 1)
    q2[9] = float("inf")
    assert _native.error_sums(x2, q2)[1] == math.inf == _native.error_sums(x2, q2)[4]


def test_error_sums_do_not_depend_on_the_thread_count():
    x, q = _error_case(300_000, torch.float32, 3)
    threads = torch.get_num_threads()
    try:
        results = set()
        for n in (1, 2):
            torch.set_num_threads(n)
            results.add(_native.error_sums(x, q))
    finally:
        torch.set_num_threads(threads)
    assert len(results) == 1


def test_error_sums_decline_what_they_do_not_cover():
    x = torch.randn(64)
    assert _native.error_sums(x.half(), x) is None
    assert _native.error_sums(x, x.double()) is None
    assert _native.error_sums(x.reshape(8, 8), x.reshape(8, 8)) is None  # flat inputs only
    assert _native.error_sums(x[::2], x[::2]) is None  # not contiguous


def test_quantization_error_takes_the_c_sums_and_falls_back_to_the_same_numbers(monkeypatch):
    x = _adversarial(256, 512, torch.bfloat16)
    x[64:96, 11] = 1.0  # a finite signal sum, so the SNR is a number
    calls = []
    original = _native.error_sums
    monkeypatch.setattr(_native, "error_sums", lambda *a: calls.append(a[0].shape) or original(*a))
    eager, compiled = quant_error(x, "nvfp4"), quant_error_and_scales(x, "nvfp4", seed=0)[0]
    assert calls == [(256 * 512,)] * 2
    monkeypatch.undo()
    monkeypatch.setenv("LOWBIT_NATIVE", "0")
    _native._library.cache_clear()
    try:
        reference = quant_error(x, "nvfp4")  # the tensor ops
    finally:
        _native._library.cache_clear()
    for got in (eager, compiled):
        assert (got.underflow, got.saturation, got.max_abs_error) == (
            reference.underflow,
            reference.saturation,
            reference.max_abs_error,
        )
        assert got.snr_db == pytest.approx(reference.snr_db, rel=1e-12)


@pytest.mark.parametrize("fmt", [E2M1, E2M3, E3M2, E4M3, E5M2], ids=lambda f: f.name)
def test_eager_codes_come_from_the_c_kernels_with_the_reference_bits(fmt):
    gen = torch.Generator().manual_seed(0)
    values = fmt.values().float()
    x = torch.cat([values, (values[1:] + values[:-1]) / 2, torch.randn(5000, generator=gen) * fmt.max / 4])
    x = torch.cat([x, -x, x * 2.0**-7, torch.tensor([fmt.max * 3, 0.0, -0.0, 1e-45])])
    rne = _native.encode_float(x, fmt.bits, fmt.mbits, fmt.emin, float(fmt.max), None)
    assert torch.equal(rne, fmt.encode(x, rounding="rne", saturate=True))
    bits = RandomBits(torch.tensor([7, -9], dtype=torch.int32))
    sr = _native.encode_float(x, fmt.bits, fmt.mbits, fmt.emin, float(fmt.max), bits.bits(x.shape))
    assert torch.equal(sr, fmt.encode(x, rounding="sr", saturate=True, generator=bits))
    c = _fast._code_constants(fmt)
    for codes in (fmt.all_codes(), fmt.all_codes()[torch.randint(0, 2**fmt.bits, (10_000,), generator=gen)]):
        values = _native.decode_float(codes, c.bits, c.mbits, c.bias, c.first_special, _fast._code_table(fmt))
        assert _same(values, fmt.decode(codes).float())  # every code, Inf and NaN bits too
        finite = codes[torch.isfinite(fmt.decode(codes))]
        values = _native.decode_float(finite, c.bits, c.mbits, c.bias, c.first_special, torch.full((256,), 7.0))
        assert _same(values, fmt.decode(finite).float())  # finite codes by the fields' arithmetic, not the table


def _block_input(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Blocks whose magnitudes span 2^-60..2^60, all-zero and signed-zero blocks, runs of equal values,
    float32 subnormals, and values at and between a grid's points (multiples of 1/8)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * torch.logspace(-18, 18, shape[-1], base=10.0)
    flat = x.view(-1, shape[-1])
    flat[:2, :64] = 0.0
    flat[2:4, :64] = -0.0
    flat[4:6, :48] = 3.0
    flat[6:8, 64:96] = 1e-42
    flat[8:12] = torch.randint(-48, 49, flat[8:12].shape, generator=gen) / 8.0
    return x.to(dtype)


def _count_c_calls(monkeypatch) -> dict[str, int]:
    """Count the block kernels' calls that ran (returned a result)."""
    calls = {"block_extrema": 0, "quantize_blocks": 0, "quantize_fused": 0, "decode_blocks": 0}
    for name in calls:
        original = getattr(_native, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            out = _original(*args, **kwargs)
            calls[_name] += out is not None
            return out

        monkeypatch.setattr(_native, name, counted)
    return calls


_BLOCK_SPECS = [
    *[(name, rounding) for name in preset_names() for rounding in ("rne", "sr")],
    ("mxfp4", {"rounding": "sr", "sr_prescale": 0.75}),
    ("mxfp6_e2m3", {"rounding": "sr", "sr_prescale": 0.7}),  # not a float32: rounded as torch rounds it
    ("fp8_e4m3_row", {"block": (1, 4096)}),  # the widest block the fused kernel takes
    ("int4_group32", {"scale_format": "e4m3"}),  # minifloat block scales without a global scale
    ("int4_group32", {"asymmetric": True}),
    ("int8_channel", {"asymmetric": True, "rounding": "sr"}),
    ("nvfp4", {"rht_size": 16}),
    ("mxfp8_e4m3", {"scale_rule": "rceil"}),
    ("fp8_e4m3_tensor", {"pow2_scale": True}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name, options", _BLOCK_SPECS, ids=lambda v: v if isinstance(v, str) else str(v))
def test_block_kernels_give_the_reference_codes_scales_and_values(monkeypatch, name, options, dtype):
    spec = get_spec(name).replace(**({"rounding": options} if isinstance(options, str) else options))
    width = 4096 if spec.block == (1, 4096) else 320
    x = _block_input((3, 48, width), dtype, seed=len(name))  # 46,080 elements: tiles of 4,096 do not divide it
    calls = _count_c_calls(monkeypatch)
    q, values = quantize(x, spec, seed=11), fake_quantize(x, spec, seed=11)
    out = dequantize(q)
    layout = block_layout(x.shape, spec.block)
    fused = not (layout.per_tensor or layout.rows > 1 or spec.rht_size or spec.asymmetric)
    assert calls["quantize_fused"] == fused and calls["quantize_blocks"] == 2 - fused  # quantize, fake_quantize
    assert calls["decode_blocks"] == 1 and calls["block_extrema"] == (0 if layout.per_tensor else 2 - fused)
    monkeypatch.undo()
    reference = _quantize(x, spec, None, 11, None, None, fast=False)  # the formats' own encode and decode
    assert torch.equal(q.codes, reference.codes) and _same(q.scales, reference.scales)
    assert torch.equal(q.scale_codes, reference.scale_codes)
    assert q.zero_points is None or torch.equal(q.zero_points, reference.zero_points)
    expected = _dequantize(reference, fast=False)
    assert _same(out.float(), expected.float()) and out.dtype == dtype
    assert _same(values.float(), _fake_quantize(x, spec, None, 11, None, None, fast=False).float())
    assert values.dtype == dtype


@pytest.mark.parametrize(
    "name, options",
    [("mxfp8_e4m3", {}), ("mxfp8_e5m2", {}), ("fp8_e5m2_tensor", {}), ("mxfp6_e3m2", {}), ("nvfp4", {}),
     ("mxfp4", {"rounding": "sr", "sr_prescale": 0.75}), ("int4_group32", {"asymmetric": True}), ("int8_channel", {})],
)  # fmt: skip
def test_dequantize_gives_every_code_its_formats_value_unscaled(monkeypatch, name, options):
    """Every code of the format (Inf and NaN codes too) in every block position: the C decode's value of each
    with the zero point, scale, global scale and prescale applied in the reference's order, bit for bit."""
    spec = get_spec(name).replace(**options)
    q = quantize(_block_input((40, 320), torch.float32, seed=5), spec, seed=3)
    fmt = get_format(spec.element)
    bits = 8 if isinstance(fmt, IntFormat) else fmt.bits  # an integer's every byte: its two's complement values
    codes = torch.arange(q.codes.numel(), dtype=torch.int64).mul_(7).remainder_(1 << bits).to(torch.uint8)
    q = dataclasses.replace(q, codes=codes.view(q.codes.dtype).view(q.codes.shape))
    calls = _count_c_calls(monkeypatch)
    out = dequantize(q)
    assert calls["decode_blocks"] == 1
    assert _same(out, _dequantize(q, fast=False))


def test_block_kernels_leave_non_finite_blocks_and_scales_to_the_tensor_ops(monkeypatch):
    x = _block_input((64, 256), torch.float32, seed=1)
    x[5, 7], x[9, 100], x[20, 3] = float("nan"), float("inf"), -float("inf")
    calls = _count_c_calls(monkeypatch)
    for name in ("mxfp4", "nvfp4", "int4_group32", "fp8_e4m3_row"):
        q = quantize(x, name)
        reference = _quantize(x, get_spec(name), None, None, None, None, fast=False)
        assert torch.equal(q.codes, reference.codes) and _same(q.scales, reference.scales)
        assert _same(dequantize(q), _dequantize(reference, fast=False))
    assert calls["block_extrema"] + calls["quantize_blocks"] + calls["quantize_fused"] == 0  # the general path
    spec = get_spec("mxfp4").replace(rounding="sr")
    gen, reference_gen = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    q = quantize(x, spec, generator=gen)  # the fused kernel declines: the plan takes the bits it drew
    reference = _quantize(x, spec, reference_gen, None, None, None, fast=False)
    assert torch.equal(q.codes, reference.codes) and torch.equal(gen.get_state(), reference_gen.get_state())
    assert _native.block_extrema(x.view(64, 1, 256), 32) is None


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 6),
    r=st.sampled_from([1, 2, 16]),
    nb=st.integers(1, 9),
    c=st.sampled_from([1, 3, 16, 32, 200]),
    bf16=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_block_extrema_are_the_blocks_max_abs_min_and_max(rows, r, nb, c, bf16, seed):
    x = _block_input((rows * r, nb * c), torch.bfloat16 if bf16 else torch.float32, seed)
    blocks = x.float().view(rows, r, nb, c)
    (absmax,) = _native.block_extrema(x.view(rows, r, nb * c), c)
    low, high = _native.block_extrema(x.view(rows, r, nb * c), c, signed=True)
    assert torch.equal(absmax, blocks.abs().amax(dim=(1, 3)))
    assert torch.equal(low, blocks.amin(dim=(1, 3))) and torch.equal(high, blocks.amax(dim=(1, 3)))


@settings(max_examples=30, deadline=None)
@given(
    fmt=st.sampled_from([E2M1, E2M3, E3M2, E4M3, E5M2, INT4, INT8]),
    shape=st.tuples(st.integers(1, 40), st.sampled_from([16, 32, 96, 4100])),
    cols=st.sampled_from([16, 32, None]),
    sr=st.booleans(),
    offset=st.integers(0, 2**33),
    seed=st.integers(0, 2**16),
)
def test_quantize_blocks_are_the_scaled_elements_codes(fmt, shape, cols, sr, offset, seed):
    """Any factor per block (or one), zero points for integers, any SR offset: the codes of the scaled
    elements by the format's encode, and their values unscaled as ``_fast.unscale`` does."""
    cols = cols if cols and shape[1] % cols == 0 else shape[1]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * 2.0 ** torch.randint(-20, 20, shape, generator=gen)
    rows = x.view(shape[0], 1, shape[1])
    factor = 2.0 ** torch.randint(-20, 20, (shape[0], shape[1] // cols), generator=gen).float()
    factor = factor * torch.rand(factor.shape, generator=gen).add(0.5)
    decode = torch.rand(factor.shape, generator=gen) + 0.25
    integer = isinstance(fmt, IntFormat)
    zero_point = torch.randint(fmt.qmin, fmt.qmax + 1, factor.shape, dtype=torch.int32) if integer else None
    bits = RandomBits(torch.randint(-(2**31), 2**31, (2,), generator=gen, dtype=torch.int32), offset) if sr else None
    rounding = "sr" if sr else "rne"
    unscale = (decode, torch.tensor(0.375), 0.75)
    codes, values = _fast.quantize_blocks(fmt, rows, cols, factor, zero_point, rounding, bits, unscale=unscale)
    scaled = _fast._scaled(rows.view(shape[0], 1, -1, cols), factor, zero_point)
    expected = fmt.encode(scaled, rounding=rounding, saturate=True, generator=bits)
    assert torch.equal(codes.view(expected.shape), expected)
    unscaled = _fast.unscale(fmt.decode(expected).float(), decode, zero_point, torch.tensor(0.375), 0.75)
    assert _same(values.view(unscaled.shape), unscaled)


def _amax_values(seed: int) -> torch.Tensor:
    """Block amax: 0, float32 subnormals, powers of two and their neighbours, the sqrt(2) mantissa edge of
    the ``nearest`` rule, FLT_MAX, and random magnitudes over the whole float32 range."""
    gen = torch.Generator().manual_seed(seed)
    powers = 2.0 ** torch.arange(-149, 128, dtype=torch.float64)
    edges = torch.tensor([0.0, 1e-45, 1e-40, 2.0**-127, 2.0**-126, 3.4028234663852886e38, 1.4142135, 1.4142137])
    bits = powers.float().view(torch.int32)
    neighbours = torch.cat([(bits[1:] - 1).view(torch.float32), (bits + 1).view(torch.float32)])
    random = (torch.rand(5000, generator=gen) * 2.0 ** torch.randint(-140, 127, (5000,), generator=gen)).float()
    return torch.cat([powers.float(), edges, neighbours, random]).contiguous()


@pytest.mark.parametrize("rule", ["floor", "ceil", "even", "nearest", "rceil"])
@pytest.mark.parametrize("element", [E2M1, E2M3, E3M2, E4M3, E5M2, INT8], ids=lambda f: f.name)
def test_e8m0_block_scales_are_the_reference(rule, element):
    amax = _amax_values(1)
    got = _fast.block_scales(amax, element, get_format("e8m0"), rule, False, 0.0, None)
    if rule == "even" and isinstance(element, IntFormat):
        assert got is None  # integers have no mantissa to round amax to: the tensor ops
        return
    codes = mx_scale_codes(amax, element, rule)
    decode, factor = _fast.e8m0_scales(codes)
    assert torch.equal(got[2], codes) and _same(got[0], decode) and _same(got[1], factor)


@pytest.mark.parametrize("element", [E2M1, E4M3, E5M2, INT4], ids=lambda f: f.name)
@pytest.mark.parametrize("global_scale", [None, 2688.0 / 7.5, 1e30, 2688.0 / 3.4e38], ids=str)
def test_minifloat_block_scales_are_the_reference(element, global_scale):
    amax = _amax_values(2)
    g = None if global_scale is None else torch.tensor(global_scale, dtype=torch.float32)
    got = _fast.block_scales(amax, element, E4M3, "floor", False, 0.0, g)
    codes, decode, factor = lowp_block_scales(amax, element, E4M3, g)
    assert torch.equal(got[2], codes) and _same(got[0], decode) and _same(got[1], factor)
    assert _fast.block_scales(amax, element, E4M3, "floor", False, 0.0, torch.tensor(-math.inf)) is None


@pytest.mark.parametrize("element", [E4M3, E5M2, INT4, INT8], ids=lambda f: f.name)
@pytest.mark.parametrize("pow2, target", [(False, 0.0), (True, 0.0), (False, 1000.0), (True, 3.3)], ids=str)
def test_fp32_block_scales_are_the_reference(element, pow2, target):
    amax = _amax_values(3)
    decode, factor, codes = _fast.block_scales(amax, element, get_format("fp32"), "floor", pow2, target, None)
    expected_decode, expected_factor = fp32_scales(amax, element, pow2, target)
    assert codes is None and _same(decode, expected_decode) and _same(factor, expected_factor)


def test_large_outputs_ask_for_huge_pages_inside_their_own_memory(monkeypatch):
    calls = []
    monkeypatch.setattr(
        _native, "_madvise", lambda: lambda start, length, advice: calls.append((start, length, advice))
    )
    small = _native._empty((1000,), torch.float32)
    large = _native._empty((4096, 1024), torch.float32)  # 16 MiB
    assert small.shape == (1000,) and large.shape == (4096, 1024) and large.dtype == torch.float32
    assert len(calls) == 1  # the small one asks nothing
    start, length, advice = calls[0]
    assert advice == 14 and start % (2 << 20) == 0 and length % (2 << 20) == 0 and length >= 14 << 20
    assert large.data_ptr() <= start and start + length <= large.data_ptr() + large.numel() * 4
    monkeypatch.setattr(_native, "_madvise", lambda: None)
    assert _native._empty((4096, 1024), torch.uint8).dtype == torch.uint8
