"""The compiled CPU path (``fake_quantize(compile=True)``, ``fake_quantize_columns``,
``quantize``/``dequantize(compile=True)``) gives the eager path's bits, and the float-only pieces it
relies on are exact.

Compiled kernels come from inductor's C++ backend; these tests compile a handful of variants
(seconds each, cached on disk afterwards). Bits are compared as integers, so the sign of zero
and NaN payloads count.
"""

import dataclasses
import math
import shutil
import warnings

import pytest
import torch

import lowbit.numerics._fast as fast
from lowbit.numerics import dequantize, get_spec, preset_names, quantize
from lowbit.numerics.blocks import global_encode_scale, lowp_block_scales
from lowbit.numerics.formats import E2M1, E4M3, UE5M3
from lowbit.numerics.hadamard import _butterfly, _butterfly_by_output, random_signs, rht, rotate_columns
from lowbit.numerics.quantize import _fake_quantize, fake_quantize_columns, keep_columns

# Each variant compiles its own kernels (10-40 s on an empty inductor cache). The default run keeps the
# shipped recipes' operand specs and one case of each code path; the other variants are marked slow
# (``make test-all`` runs them).
SLOW = pytest.mark.slow


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a.contiguous()), _bits(b.contiguous()))


def _adversarial(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """Columns spanning 2^-100..2^100, zero and -0 blocks, all-equal blocks, exact FP4 ties after
    scaling, float32 subnormals; finite everywhere (NaN rows take the eager path by design)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, cols, generator=gen) * torch.logspace(-30, 30, cols, base=10.0)[None, :]
    x[:16, :16] = 0.0
    x[16:32, :16] = -0.0
    x[:, 16:48] = 3.0
    x[32:48, 48:64] = torch.tensor([6.0, 5.0, 3.5, 2.5, 1.75, 1.25, 0.75, 0.25] * 2)  # E2M1 ties, amax 6
    x[48:64, :16] = 1e-42
    return x.to(dtype)


def test_pow2_floor_is_the_exponent_of_every_float32_significand():
    significands = ((127 << 23) | torch.arange(0, 1 << 23, dtype=torch.int32)).view(torch.float32)
    for exponent in (-126, -14, -9, 0, 1, 8, 15, 100):
        a = significands * 2.0**exponent
        assert torch.equal(fast.pow2_floor(a), (a.view(torch.int32) & 0x7F800000).view(torch.float32))
    subnormals = torch.arange(0, 1 << 23, 4099, dtype=torch.int32).view(torch.float32)
    assert bool((fast.pow2_floor(subnormals) <= 2.0**-126).all())


@pytest.mark.parametrize("n", [2, 16, 32])
def test_the_butterfly_per_output_lane_has_the_stacked_butterflys_bits(n):
    x = torch.randn(64, n, 24) * torch.logspace(-8, 8, 24)
    stacked = torch.stack(_butterfly([x[:, i] for i in range(n)]), dim=1)
    assert _same(_butterfly_by_output(x, 1), stacked)
    y = x.transpose(1, 2).contiguous()  # lanes along the last dim
    assert _same(_butterfly_by_output(y, -1), torch.stack(_butterfly([y[..., i] for i in range(n)]), dim=-1))


def test_columns_rotation_is_the_rht_of_the_transpose():
    t = torch.randn(256, 40).bfloat16()
    assert _same(rotate_columns(t, random_signs(16, 3)), rht(t.t().contiguous(), 16, 3).t())


@pytest.mark.parametrize(
    ("preset", "changes", "dtype"),
    [
        ("nvfp4", {}, torch.float32),
        pytest.param("nvfp4", {"rounding": "sr"}, torch.bfloat16, marks=SLOW),
        ("nvfp4_2d", {}, torch.bfloat16),
        ("nvfp4", {"rounding": "sr", "rht_size": 16}, torch.float32),
        pytest.param("mxfp4", {"rounding": "sr", "rht_size": 32}, torch.bfloat16, marks=SLOW),
        ("mxfp4", {"rounding": "sr", "sr_prescale": 0.75}, torch.float32),  # the MXFP4 recipe's gradients
        ("mxfp4", {"rounding": "sr", "sr_prescale": 0.75, "rht_size": 32}, torch.bfloat16),
        ("fp8_e5m2_tensor", {}, torch.float32),
        ("int8_channel", {"rounding": "sr"}, torch.float32),
        ("nvfp4", {"scale_format": "ue5m3", "global_scale": False, "rounding": "sr"}, torch.bfloat16),
        pytest.param("nvfp4", {"scale_format": "ue5m3"}, torch.float32, marks=SLOW),  # UE5M3 under an FP32 tensor scale
    ],
)
def test_compiled_fake_quantize_has_the_eager_bits(preset, changes, dtype):
    spec = get_spec(preset).replace(**changes) if changes else get_spec(preset)
    x = _adversarial(512, 256, dtype)
    eager = _fake_quantize(x, spec, torch.Generator().manual_seed(2), None, None, None)
    compiled = _fake_quantize(x, spec, torch.Generator().manual_seed(2), None, None, None, compile=True)
    assert _same(compiled, eager)
    if spec.rht_size:  # the rotated values too (what QuantLinear multiplies)
        eager_rot = _fake_quantize(x, spec, torch.Generator().manual_seed(2), None, None, None, rotated=True)
        compiled_rot = _fake_quantize(
            x, spec, torch.Generator().manual_seed(2), None, None, None, compile=True, rotated=True
        )
        assert _same(compiled_rot, eager_rot)


def test_a_tensor_with_nan_rows_falls_back_and_matches():
    spec = get_spec("nvfp4").replace(rounding="sr")
    x = _adversarial(512, 256, torch.float32)
    x[100, 7], x[300, 200] = math.nan, math.inf
    eager = _fake_quantize(x, spec, torch.Generator().manual_seed(5), None, None, None)
    compiled = _fake_quantize(x, spec, torch.Generator().manual_seed(5), None, None, None, compile=True)
    assert _same(compiled, eager)
    assert torch.isnan(compiled[100]).any()


@pytest.mark.parametrize(
    ("preset", "changes", "dtype"),
    [
        ("nvfp4", {"rounding": "sr", "rht_size": 16}, torch.bfloat16),
        ("nvfp4", {}, torch.float32),
        pytest.param("mxfp4", {"rounding": "sr", "rht_size": 32}, torch.float32, marks=SLOW),
        ("mxfp4", {"rounding": "sr", "sr_prescale": 0.75, "rht_size": 32}, torch.bfloat16),
        pytest.param(
            "nvfp4",
            {"scale_format": "ue5m3", "global_scale": False, "rounding": "sr", "rht_size": 16},
            torch.bfloat16,
            marks=SLOW,
        ),
    ],
)
def test_quantizing_down_the_columns_is_quantizing_the_transpose(preset, changes, dtype):
    spec = get_spec(preset).replace(**changes)
    t = _adversarial(512, 192, dtype)
    reference = _fake_quantize(t.t().contiguous(), spec, torch.Generator().manual_seed(9), None, None, None)
    columns = fake_quantize_columns(t, spec, generator=torch.Generator().manual_seed(9), compile=True)
    assert columns.shape == (192, 512) and columns.stride() == (1, 192)  # a view, nothing transposed
    assert _same(columns, reference)
    rotated = fake_quantize_columns(
        t, spec, generator=torch.Generator().manual_seed(9), compile=True, rotated=True, dtype=torch.bfloat16
    )
    rotated_reference = _fake_quantize(
        t.t().contiguous(), spec, torch.Generator().manual_seed(9), None, None, None, rotated=True
    ).to(torch.bfloat16)
    assert _same(rotated, rotated_reference)


KEPT = [  # (preset, changes, the compute dtype the default run checks it in, None: neither; the others are slow)
    ("nvfp4", {"rht_size": 16}, torch.bfloat16),  # NVFP4's wgrad x: E4M3 scales kept as FP8, FP32 global scale
    ("nvfp4", {}, torch.float32),
    ("mxfp4", {"rht_size": 32}, torch.bfloat16),  # E8M0 scales kept as torch's E8M0
    ("mxfp4", {"sr_prescale": 0.75}, torch.float32),
    ("mxfp8_e4m3", {}, torch.bfloat16),
    ("mxfp8_e5m2", {}, None),
    ("mxfp6_e3m2", {}, None),
    ("int4_group32", {}, torch.float32),
    ("fp8_e4m3_tensor", {}, torch.bfloat16),  # per-tensor: kept from a copy of tᵀ, as the reference quantizes it
    ("fp8_e5m2_tensor", {}, torch.float32),
]


@pytest.mark.parametrize(
    ("preset", "changes", "dtype"),
    [
        pytest.param(preset, changes, dtype, marks=() if dtype is default else SLOW)
        for preset, changes, default in KEPT
        for dtype in (torch.bfloat16, torch.float32)
    ],
)
def test_a_kept_operand_restores_to_the_fake_quantized_bits_and_layout(preset, changes, dtype):
    """``keep_columns`` then ``restore`` is ``fake_quantize_columns(compile=True, rotated=True)``: the same
    bits (ties, zeros of both signs, underflowing blocks, 2^±100 columns) and the same strides (a GEMM
    takes both alike), from one byte per element and 8-bit block scales."""
    spec = get_spec(preset).replace(**changes)
    t = _adversarial(512, 192, dtype)
    if spec.block == "tensor":
        t = t / torch.logspace(-30, 30, 192, base=10.0).to(dtype)  # one scale: a range FP8 can hold
    kept = keep_columns(t, spec, dtype=dtype)
    assert kept is not None and kept.values.element_size() == 1 and kept.values.numel() == t.numel()
    restored = kept.restore()
    expected = fake_quantize_columns(t, spec, compile=True, rotated=True, dtype=dtype)
    assert restored.stride() == expected.stride() and _same(restored, expected)
    if spec.scale_format == "e4m3":
        assert kept.decode.dtype == torch.float8_e4m3fn
    else:  # E8M0 as float32: a float8_e8m0fnu load would make the compiled restore scalar
        assert kept.decode.dtype == torch.float32


def test_nothing_is_kept_where_a_later_quantization_would_differ_or_no_byte_holds_the_values():
    t = _adversarial(512, 192, torch.float32)
    assert keep_columns(t, get_spec("nvfp4").replace(rounding="sr"), dtype=torch.float32) is None  # other draws
    assert (
        keep_columns(t, get_spec("int4_group32").replace(asymmetric=True), dtype=torch.float32) is None
    )  # zero points: not kept
    nan = t.clone()
    nan[7, 3] = float("nan")
    assert keep_columns(nan, get_spec("nvfp4"), dtype=torch.float32) is None  # the eager path's NaN rows
    assert keep_columns(t[:64, :64], get_spec("nvfp4"), dtype=torch.float32) is None  # small: eager


def test_every_element_format_value_fits_its_container_exactly():
    from lowbit.numerics.formats import get_format

    for name, container in [
        ("e2m1", torch.float8_e4m3fn),
        ("e3m2", torch.float8_e4m3fn),
        ("e2m3", torch.float8_e4m3fn),
        ("e4m3", torch.float8_e4m3fn),
        ("e5m2", torch.float8_e5m2),
        ("e8m0", torch.float8_e8m0fnu),
        ("int4", torch.int8),
        ("int8", torch.int8),
    ]:
        assert fast.container(get_format(name)) == container, name


@pytest.mark.parametrize("scale_format", [E4M3, UE5M3], ids=["e4m3", "ue5m3"])
@pytest.mark.parametrize("global_scale", [True, False])
def test_compiled_minifloat_block_scales_are_the_eager_scales(global_scale, scale_format):
    x = _adversarial(256, 256, torch.float32).view(256, 1, 16, 16)
    x[5, 0, 3] = 1e-30  # a block whose scale underflows to 0: factor FLT_MAX
    x[6, 0, 2] = 3e38  # a block whose scale saturates at the format's max
    out = fast.compiled_block_scales(x, E2M1, scale_format, global_scale)
    assert out is not None
    decode, factor, global_encode, codes = out
    assert codes is None  # minifloat codes are encoded from the values where wanted
    amax = x.abs().amax(dim=(1, 3))
    g = global_encode_scale(amax.amax(), E2M1, scale_format) if global_scale else None
    _, decode_ref, factor_ref = lowp_block_scales(amax, E2M1, scale_format, g)
    assert _same(decode, decode_ref) and _same(factor, factor_ref)
    assert (global_encode is None) == (not global_scale) and (g is None or _same(global_encode, g))


@pytest.mark.parametrize("rule", ["floor", "ceil", "even", "nearest"])
@pytest.mark.parametrize(
    "element", ["e2m1", "e4m3", pytest.param("e5m2", marks=SLOW), pytest.param("e3m2", marks=SLOW), "e2m3"]
)
def test_compiled_e8m0_block_scales_are_the_eager_scales(rule, element):
    """MX scales in one compiled graph: the eager ``mx_scale_codes`` codes and ``e8m0_scales`` bits for
    every block amax (0, float32 subnormals, exact powers of two, just below them, the extremes)."""
    from lowbit.numerics import get_format
    from lowbit.numerics.blocks import mx_scale_codes

    fmt, e8m0 = get_format(element), get_format("e8m0")
    x = _adversarial(256, 256, torch.float32).view(256, 8, 32)
    x[0, :, 0] = 2.0**-149  # a block of subnormals
    x[1, :, 0] = 2.0**100  # an exact power of two
    x[2, :, 0] = torch.nextafter(torch.tensor(2.0**100), torch.tensor(0.0))
    x[3, :, 0] = 3.4e38
    out = fast.compiled_block_scales(x, fmt, e8m0, False, rule)
    assert out is not None
    decode, factor, global_encode, codes = out
    expected = mx_scale_codes(x.abs().amax(dim=1), fmt, rule)
    decode_ref, factor_ref = fast.e8m0_scales(expected)
    assert torch.equal(codes, expected) and _same(decode, decode_ref) and _same(factor, factor_ref)
    assert global_encode is None
    assert fast.compiled_block_scales(x, fmt, e8m0, False, "rceil") is None  # its division stays eager


def test_without_a_compiler_it_warns_once_and_gives_the_same_numbers(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(fast, "_compile_failed", [])
    monkeypatch.setattr(fast, "_variant", broken)
    spec = get_spec("nvfp4").replace(rounding="sr")
    x = _adversarial(512, 256, torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = _fake_quantize(x, spec, torch.Generator().manual_seed(1), None, None, None, compile=True)
        _fake_quantize(x, spec, None, None, None, None, compile=True)
    assert _same(compiled, _fake_quantize(x, spec, torch.Generator().manual_seed(1), None, None, None))
    messages = [str(w.message) for w in caught if "torch.compile could not build" in str(w.message)]
    assert len(messages) == 1 and "no C++ compiler" in messages[0]


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler: nothing compiles, so no limit to reach")
def test_a_variant_past_its_recompile_limit_runs_eagerly_and_compiling_stays_on(monkeypatch, tmp_path):
    """Past its limit of graphs a variant runs eagerly (a limit of 0, no graph saved: none is traced), and
    compiling stays on for the others."""
    monkeypatch.setattr(fast, "_RECOMPILE_LIMIT", 0)
    monkeypatch.setattr(fast, "_compile_failed", [])
    monkeypatch.setattr(fast._graphs, "graph_folder", lambda: tmp_path)
    fast._variant.cache_clear()
    traced = _counting_traces(monkeypatch)
    spec = get_spec("nvfp4")
    for rows, dtype in ((512, torch.float32), (512, torch.bfloat16), (1024, torch.float16)):
        x = _adversarial(rows, 256, dtype)
        compiled = _fake_quantize(x, spec, None, None, None, None, compile=True)
        assert _same(compiled, _fake_quantize(x, spec, None, None, None, None))
    assert fast._compile_failed == [] and traced == []
    fast._variant.cache_clear()


def _counting_traces(monkeypatch) -> list[int]:
    """The graphs compiled ahead from here on, one entry each (graphs loaded from disk are not counted)."""
    traced = []
    real = fast._graphs.Variant._trace

    def counting(self, tensors):
        graph = real(self, tensors)
        traced.append(id(graph))
        return graph

    monkeypatch.setattr(fast._graphs.Variant, "_trace", counting)
    return traced


def test_one_compiled_kernel_serves_the_forward_backward_and_evaluation_contexts(monkeypatch):
    """A weight (requires_grad), an activation under autocast and a gradient under no_grad hit one compiled
    graph per spec: each context used to compile the same kernel again (26 graphs per nvfp4 run, now 6)."""
    from lowbit.numerics import fake_quantize

    spec = get_spec("nvfp4").replace(block=(1, 48))  # a block size no other test compiles
    x = torch.randn(512, 480, generator=torch.Generator().manual_seed(3))
    expected = fake_quantize(x, spec, compile=True)  # traced, or loaded as another process saved it
    traced = _counting_traces(monkeypatch)
    weight = x.clone().requires_grad_()
    assert _same(fake_quantize(weight, spec, compile=True), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _same(fake_quantize(x, spec, compile=True), expected)
    with torch.no_grad():
        assert _same(fake_quantize(x, spec, compile=True), expected)
    assert traced == []
    assert _same(expected, fake_quantize(x, spec))  # and the eager reference's bits


def _counting_run_compiled(monkeypatch) -> list[str]:
    calls = []
    real = fast.run_compiled

    def counting(fn, *args, **kwargs):
        calls.append(fn.__name__)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(fast, "run_compiled", counting)
    return calls


@pytest.mark.parametrize(
    ("preset", "changes"),
    [
        ("nvfp4", {"rounding": "sr", "sr_prescale": 0.7}),  # a prescale float32 rounds: folded as the plan folds it
        ("mxfp4", {"rounding": "sr", "sr_prescale": 0.75}),
        pytest.param("nvfp4", {"scale_format": "ue5m3", "global_scale": False}, marks=SLOW),
    ],
)
def test_scales_and_elements_are_one_compiled_call_with_the_eager_bits(monkeypatch, preset, changes):
    """An operand's block scales and element step run as one compiled graph (one call, not two), the
    same bits as the eager reference; with a NaN the fallback draws no second set of SR keys."""
    spec = get_spec(preset).replace(**changes)
    x = _adversarial(512, 256, torch.bfloat16)
    calls = _counting_run_compiled(monkeypatch)
    compiled = _fake_quantize(x, spec, torch.Generator().manual_seed(4), None, None, None, compile=True)
    assert calls == ["_scaled_fake_quantize_whole"]
    assert _same(compiled, _fake_quantize(x, spec, torch.Generator().manual_seed(4), None, None, None))
    t = _adversarial(512, 192, torch.bfloat16)
    calls.clear()
    columns = fake_quantize_columns(t, spec, generator=torch.Generator().manual_seed(6), compile=True)
    assert calls == ["_scaled_fake_quantize_whole"]
    reference = _fake_quantize(t.t().contiguous(), spec, torch.Generator().manual_seed(6), None, None, None)
    assert _same(columns, reference)
    x[3, 3] = math.nan  # the fused graph finds a non-finite block: the step-by-step path, the same keys
    gen, ref_gen = torch.Generator().manual_seed(8), torch.Generator().manual_seed(8)
    assert _same(
        _fake_quantize(x, spec, gen, None, None, None, compile=True), _fake_quantize(x, spec, ref_gen, None, None, None)
    )
    assert torch.equal(gen.get_state(), ref_gen.get_state())


def _same_qtensor(a, b) -> bool:
    same = torch.equal(a.codes, b.codes) and _same(a.scales, b.scales) and torch.equal(a.scale_codes, b.scale_codes)
    globals_ = (a.global_scale is None and b.global_scale is None) or _same(a.global_scale, b.global_scale)
    zero_points = (a.zero_points is None and b.zero_points is None) or torch.equal(a.zero_points, b.zero_points)
    return same and globals_ and zero_points and a.codes.dtype == b.codes.dtype


@pytest.mark.parametrize(
    ("preset", "dtype"),
    [(p, torch.float32) for p in preset_names()]
    + [pytest.param(p, torch.bfloat16, marks=SLOW) for p in ("nvfp4", "mxfp8_e4m3", "fp8_e4m3_row", "int4_group32")],
)
def test_compiled_quantize_and_dequantize_give_the_eager_codes_scales_and_values(preset, dtype):
    x = _adversarial(512, 256, dtype)
    eager = quantize(x, preset)
    compiled = quantize(x, preset, compile=True)
    assert _same_qtensor(compiled, eager)
    assert _same(dequantize(compiled, compile=True), dequantize(eager))
    assert _same(dequantize(compiled, torch.float32, compile=True), dequantize(eager, torch.float32))


@pytest.mark.parametrize(
    ("preset", "changes"),
    [
        pytest.param("nvfp4", {"rounding": "sr"}, marks=SLOW),
        ("nvfp4", {"rounding": "sr", "rht_size": 16}),
        ("mxfp4", {"rounding": "sr", "sr_prescale": 0.75, "rht_size": 32}),
        pytest.param("mxfp8_e5m2", {"rounding": "sr"}, marks=SLOW),
        pytest.param("int8_channel", {"rounding": "sr"}, marks=SLOW),
        pytest.param("int4_group32", {"asymmetric": True}, marks=SLOW),
        ("int4_group32", {"asymmetric": True, "rounding": "sr"}),
        pytest.param("nvfp4", {"scale_format": "ue5m3", "global_scale": False}, marks=SLOW),
        ("mxfp6_e3m2", {"rounding": "ta"}),
        ("fp8_e4m3_row", {"pow2_scale": True}),
        ("fp8_e5m2_tensor", {"block": [1, 64], "amax_target": 240.0}),
        pytest.param("int8_channel", {"rounding": "sr", "pow2_scale": True}, marks=SLOW),
    ],
)
def test_compiled_quantize_takes_the_same_sr_bits_and_variants(preset, changes):
    spec = get_spec(preset).replace(**changes)
    x = _adversarial(512, 256, torch.float32).view(4, 128, 256)  # 3-D: blocks along the last dim
    eager = quantize(x, spec, generator=torch.Generator().manual_seed(7))
    compiled = quantize(x, spec, generator=torch.Generator().manual_seed(7), compile=True)
    assert _same_qtensor(compiled, eager)
    assert _same(dequantize(compiled, compile=True), dequantize(eager))


def test_compiled_codes_are_made_by_one_kernel_and_decoded_by_one(monkeypatch):
    calls = []
    for name in ("compiled_encode", "compiled_decode"):
        original = getattr(fast, name)
        monkeypatch.setattr(fast, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    x = _adversarial(512, 256, torch.float32)
    q = quantize(x, "mxfp4", compile=True)
    dequantize(q, compile=True)
    assert calls == ["compiled_encode", "compiled_decode"]
    calls.clear()
    dequantize(quantize(x, "mxfp4"))  # not asked: eager
    assert calls == []


def test_nan_input_and_special_codes_fall_back_to_the_eager_bits():
    x = _adversarial(512, 256, torch.float32)
    x[100, 7], x[300, 200] = math.nan, math.inf
    for preset in ("nvfp4", "fp8_e4m3_row", "mxfp8_e5m2"):
        eager, compiled = quantize(x, preset), quantize(x, preset, compile=True)
        assert _same_qtensor(compiled, eager)
        assert _same(dequantize(compiled, compile=True), dequantize(eager))
    # codes holding NaN (E4M3 0x7F/0xFF) and Inf/NaN (E5M2): decoded by the format's own decode
    for preset, special in (("fp8_e4m3_tensor", [0x7F, 0xFF]), ("fp8_e5m2_tensor", [0x7C, 0xFC, 0x7E, 0xFD])):
        q = quantize(_adversarial(512, 256, torch.float32), preset)
        codes = q.codes.clone()
        codes.view(-1)[: len(special)] = torch.tensor(special, dtype=torch.uint8)
        q = dataclasses.replace(q, codes=codes)
        out = dequantize(q, compile=True)
        assert _same(out, dequantize(q))
        assert not torch.isfinite(out.view(-1)[: len(special)]).any()


def test_every_code_of_every_format_decodes_as_the_eager_dequantize():
    for preset in ("fp8_e4m3_tensor", "fp8_e5m2_tensor", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp4", "int8_channel"):
        q = quantize(torch.randn(512, 256, generator=torch.Generator().manual_seed(3)), preset)
        element = get_spec(preset).element
        n = 1 << (4 if preset == "mxfp4" else 6 if "mxfp6" in preset else 8)
        codes = torch.arange(q.codes.numel(), dtype=torch.int32) % n
        if element == "e4m3":
            codes = codes[(codes & 0x7F) != 0x7F]  # no NaN: these run the compiled decode
        elif element == "e5m2":
            codes = codes[(codes & 0x7C) != 0x7C]  # no Inf/NaN
        codes = codes.repeat(2)[: q.codes.numel()].to(q.codes.dtype).view(q.codes.shape)
        q = dataclasses.replace(q, codes=codes)
        assert _same(dequantize(q, compile=True), dequantize(q))


@pytest.mark.parametrize(
    ("element", "pow2", "target"), [("e4m3", False, 0.0), ("e5m2", True, 0.0), ("int8", False, 100.0)]
)
def test_compiled_fp32_block_scales_are_the_eager_scales(element, pow2, target):
    from lowbit.numerics.blocks import fp32_scales
    from lowbit.numerics.formats import get_format

    fmt, fp32 = get_format(element), get_format("fp32")
    blocks = _adversarial(512, 256, torch.float32).view(512, 1, 8, 32)
    blocks[0, 0, 0] = 1e-44  # a subnormal amax: the factor overflows and is clamped to FLT_MAX
    out = fast.compiled_block_scales(blocks, fmt, fp32, False, "amax", pow2, target)
    assert out is not None  # the FP32 graph serves them
    decode, factor, global_encode, codes = out
    eager_decode, eager_factor = fp32_scales(blocks.abs().amax(dim=(1, 3)), fmt, pow2, target)
    assert _same(decode, eager_decode) and _same(factor, eager_factor)
    assert global_encode is None and torch.equal(codes, eager_decode.view(torch.int32))


def test_compiled_quantize_with_overrides_and_given_scales_is_the_eager_quantize():
    x = _adversarial(512, 256, torch.float32)
    cases = [
        ("fp8_e4m3_tensor", {"scale": 0.01}),
        ("fp8_e4m3_tensor", {"amax": 5.0}),
        ("nvfp4", {"amax": 3.0}),
        ("fp8_e5m2_tensor", {"scale": math.nan}),  # a factor that is not finite: eager
        ("nvfp4", {"amax": math.inf}),
        ("int8_channel", {"scales": torch.rand(512, 1, generator=torch.Generator().manual_seed(1)) + 0.01}),
    ]
    for preset, kwargs in cases:
        eager, compiled = quantize(x, preset, **kwargs), quantize(x, preset, compile=True, **kwargs)
        assert _same_qtensor(compiled, eager), (preset, kwargs)
        assert _same(dequantize(compiled, compile=True), dequantize(eager)), (preset, kwargs)
    spec = get_spec("int4_group32").replace(asymmetric=True)
    scales = torch.rand(512, 8, generator=torch.Generator().manual_seed(2)) * 1e3
    zero_points = torch.randint(-8, 8, (512, 8), generator=torch.Generator().manual_seed(3), dtype=torch.int32)
    eager = quantize(x, spec, scales=scales, zero_points=zero_points)
    compiled = quantize(x, spec, scales=scales, zero_points=zero_points, compile=True)
    assert _same_qtensor(compiled, eager)
    assert _same(dequantize(compiled, compile=True), dequantize(eager))
