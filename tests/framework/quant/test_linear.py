"""QuantLinear: each GEMM operand goes through exactly its spec, blocked along the contraction dim."""

import math

import pytest
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.numerics import fake_quantize, rht
from lowbit.quant import GemmRecipe, QuantLinear

NVFP4 = {
    "fprop": {"x": "nvfp4", "w": "nvfp4_2d"},
    "dgrad": {"dy": {"preset": "nvfp4", "rounding": "sr"}, "w": "nvfp4_2d"},
    "wgrad": {"dy": {"preset": "nvfp4", "rounding": "sr"}, "x": "nvfp4", "rht": 16},
}
MXFP4 = {
    "fprop": {"x": "mxfp4", "w": "mxfp4"},
    "dgrad": {"dy": {"preset": "mxfp4", "rounding": "sr", "sr_prescale": 0.75}, "w": "mxfp4", "rht": 32},
    "wgrad": {"dy": {"preset": "mxfp4", "rounding": "sr", "sr_prescale": 0.75}, "x": "mxfp4", "rht": 32},
}
FP8 = {
    "fprop": {"x": "fp8_e4m3_tensor", "w": "fp8_e4m3_tensor"},
    "dgrad": {"dy": "fp8_e5m2_tensor", "w": "fp8_e4m3_tensor"},
    "wgrad": {"dy": "fp8_e5m2_tensor", "x": "fp8_e4m3_tensor"},
}


def _pair(recipe, in_f=64, out_f=96, bias=True, seed=0):
    torch.manual_seed(seed)
    ref = nn.Linear(in_f, out_f, bias=bias)
    layer = QuantLinear.from_linear(nn.Linear(in_f, out_f, bias=bias), GemmRecipe.from_dict(recipe))
    layer.load_state_dict(ref.state_dict())
    return ref, layer


def _quantized(t, spec):
    """An operand as QuantLinear feeds its GEMM: fake-quantized, and with the GEMM's RHT rotated
    and left rotated (both operands are, so the transform cancels in the product)."""
    if spec is None:
        return t
    if spec.rht_size:
        return fake_quantize(rht(t, spec.rht_size, spec.rht_seed), spec.replace(rht_size=0))
    return fake_quantize(t, spec)


def _manual(recipe, x, w, b, dy):
    """The three GEMMs written out from the numerics functions, in QuantLinear's call order."""
    r = GemmRecipe.from_dict(recipe)
    q = lambda t, op: _quantized(t, r.spec_of(op))
    y = q(x, "fprop.x") @ q(w, "fprop.w").t() + b
    dx = q(dy, "dgrad.dy") @ q(w.t().contiguous(), "dgrad.w").t()
    dw = q(dy.t().contiguous(), "wgrad.dy") @ q(x.t().contiguous(), "wgrad.x").t()
    return y, dx, dw


@pytest.mark.parametrize("recipe", [NVFP4, MXFP4, FP8], ids=["nvfp4", "mxfp4", "fp8"])
def test_every_operand_goes_through_its_spec(recipe):
    ref, layer = _pair(recipe)
    x = torch.randn(64, 64) * torch.logspace(-2, 2, 64)  # columns of very different scale
    dy = torch.randn(64, 96) * 1e-3
    xr = x.clone().requires_grad_()
    torch.manual_seed(7)
    y = layer(xr)
    y.backward(dy)
    torch.manual_seed(7)  # the same stochastic-rounding draws, in the same order
    y_ref, dx_ref, dw_ref = _manual(recipe, x, ref.weight.detach(), ref.bias.detach(), dy)
    assert torch.equal(y, y_ref)
    assert torch.equal(xr.grad, dx_ref)
    assert torch.equal(layer.weight.grad, dw_ref)
    assert torch.equal(layer.bias.grad, dy.sum(0))
    # and the quantization is not a no-op: the result differs from the full-precision layer
    assert not torch.allclose(y, ref(x), atol=1e-6)


def test_no_specs_equals_nn_linear_exactly():
    ref, layer = _pair({}, in_f=40, out_f=24)
    x = torch.randn(3, 5, 40)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ref(xa), layer(xb)
    dy = torch.randn_like(ya)
    ya.backward(dy)
    yb.backward(dy)
    assert torch.equal(ya, yb)
    assert torch.equal(xa.grad, xb.grad)
    assert torch.equal(ref.weight.grad, layer.weight.grad)
    assert torch.equal(ref.bias.grad, layer.bias.grad)


def test_tokens_not_a_multiple_of_the_block_are_zero_padded():
    # wgrad blocks run along the token dim (16 for nvfp4): 37 tokens are padded to 48 with zeros
    ref, layer = _pair(NVFP4, bias=False)
    x = torch.randn(37, 64)
    dy = torch.randn(37, 96)
    xr = x.clone().requires_grad_()
    torch.manual_seed(3)
    layer(xr).backward(dy)
    pad = lambda t: torch.cat([t, t.new_zeros(48 - 37, t.shape[1])])
    torch.manual_seed(3)
    r = GemmRecipe.from_dict(NVFP4)
    w = ref.weight.detach()
    dx = fake_quantize(pad(dy), r.spec_of("dgrad.dy")) @ fake_quantize(w.t().contiguous(), r.spec_of("dgrad.w")).t()
    dw = (
        _quantized(pad(dy).t().contiguous(), r.spec_of("wgrad.dy"))
        @ _quantized(pad(x).t().contiguous(), r.spec_of("wgrad.x")).t()
    )
    assert torch.equal(xr.grad, dx[:37])
    assert torch.equal(layer.weight.grad, dw)


def test_rht_cancels_in_the_product():
    # with lossless-enough operands (FP32-scaled E5M2 would not be), the RHT'd GEMM equals the plain one
    spec = {"element": "e4m3", "block": [1, 16], "scale_format": "fp32"}
    plain = {"wgrad": {"dy": spec, "x": spec}}
    rotated = {"wgrad": {"dy": spec, "x": spec, "rht": 16}}
    x, dy = torch.randn(32, 64), torch.randn(32, 96)
    grads = []
    for recipe in (plain, rotated, {}):
        _, layer = _pair(recipe)
        layer(x).backward(dy)
        grads.append(layer.weight.grad)
    exact = grads[2]
    rel = lambda g: float((g - exact).norm() / exact.norm())
    assert not torch.equal(grads[0], grads[1])  # the transform changed what was quantized...
    assert rel(grads[1]) < 0.05 and rel(grads[0]) < 0.05  # ...but not what was computed


def test_stochastic_rounding_makes_the_weight_gradient_unbiased():
    # wgrad with SR on dy (and the RHT): the mean over draws converges to the exact dW = dyᵀ·Q(x),
    # while RNE keeps a fixed bias. Q(x) is deterministic (RNE), so compare against it.
    sr = {"wgrad": {"dy": {"preset": "nvfp4", "rounding": "sr"}, "x": "nvfp4"}}
    rne = {"wgrad": {"dy": "nvfp4", "x": "nvfp4"}}
    torch.manual_seed(0)
    x, dy = torch.randn(64, 64), torch.randn(64, 96) * torch.rand(64, 1)
    target = dy.t() @ fake_quantize(x.t().contiguous(), "nvfp4").t()
    mean = torch.zeros_like(target)
    n = 200
    for i in range(n):
        _, layer = _pair(sr, seed=i)
        layer(x).backward(dy)
        mean += layer.weight.grad / n
    _, layer = _pair(rne)
    layer(x).backward(dy)
    rne_err = float((layer.weight.grad - target).norm() / target.norm())
    sr_mean_err = float((mean - target).norm() / target.norm())
    assert sr_mean_err < rne_err / 3  # averaging SR draws removes the error, averaging RNE cannot
    assert sr_mean_err < 0.02


def test_saved_for_backward_is_no_larger_than_a_bf16_linear():
    def saved_bytes(module, x):
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            module(x)
        return sum(total)

    ref, layer = _pair(NVFP4)
    x = torch.randn(128, 64, requires_grad=True)
    assert saved_bytes(layer, x) <= saved_bytes(ref, x) + layer.weight.numel() * 4  # + the FP32 master weight itself


def test_autocast_computes_in_bf16():
    _, layer = _pair(NVFP4)
    x = torch.randn(16, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16


def test_from_linear_shares_parameters_and_state_dict_keys():
    linear = nn.Linear(64, 96)
    layer = QuantLinear.from_linear(linear, GemmRecipe.from_dict(NVFP4))
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert list(layer.state_dict()) == list(linear.state_dict())


def test_shapes_that_do_not_fit_the_blocks_are_clear_errors():
    with pytest.raises(LowbitError, match="in_features 40 does not divide by the recipe's block size 16"):
        QuantLinear(40, 32, recipe=GemmRecipe.from_dict(NVFP4))
    with pytest.raises(LowbitError, match="unknown QuantLinear backend 'cuda'"):
        QuantLinear(64, 64, recipe=GemmRecipe.from_dict(NVFP4), backend="cuda")


def test_recording_health_costs_one_quantization_per_operand(monkeypatch):
    # the health callback's cost, structurally: a recording step quantizes each of the six operands
    # once more to measure it (error and scales from one QTensor), and the weight once more because
    # dgrad then quantizes Wᵀ itself instead of reusing fprop's Q(W); nothing else
    import importlib

    error, quantize = (importlib.import_module(f"lowbit.numerics.{m}") for m in ("error", "quantize"))
    measured, quantize_calls = [], []
    plain_quantize = error._quantize

    def counted(*args, **kwargs):
        measured.append(1)
        return plain_quantize(*args, **kwargs)

    monkeypatch.setattr(error, "_quantize", counted)
    monkeypatch.setattr(quantize, "_quantize", counted)  # quantize(), were anything to call it too
    _, layer = _pair(NVFP4)
    backend_quantize = layer._emulator.quantize
    layer._emulator.quantize = lambda lyr, t, op, dtype: (
        quantize_calls.append(op) or backend_quantize(lyr, t, op, dtype)
    )
    x = torch.randn(32, 64, requires_grad=True)
    layer(x).sum().backward()
    plain = sorted(quantize_calls)
    quantize_calls.clear()
    layer.record_health = True
    layer(x).sum().backward()
    assert len(measured) == 6 and set(layer.health) == {
        "fprop.x",
        "fprop.w",
        "dgrad.dy",
        "dgrad.w",
        "wgrad.dy",
        "wgrad.x",
    }
    assert sorted(quantize_calls) == sorted([*plain, "dgrad.w"])


def test_health_records_every_quantized_operand():
    _, layer = _pair(NVFP4)
    layer.record_health = True
    x = torch.randn(32, 64, requires_grad=True)
    layer(x).sum().backward()
    assert set(layer.health) == {"fprop.x", "fprop.w", "dgrad.dy", "dgrad.w", "wgrad.dy", "wgrad.x"}
    h = layer.health["fprop.x"]
    x = x.detach()
    assert h["amax"] == pytest.approx(float(x.abs().max()))
    # SNR and underflow of the operand as fprop quantizes it (x in 1x16 blocks, RNE), from its fake-quantized copy
    q = fake_quantize(x, "nvfp4").double()
    snr_db = 10 * math.log10(float(x.double().square().sum() / (q - x.double()).square().sum()))
    underflow = float(((q == 0) & (x != 0)).sum()) / x.numel()  # every element of a Gaussian draw is nonzero
    assert h["snr_db"] == pytest.approx(snr_db, rel=1e-9) and 10 < snr_db < 30  # FP4 on Gaussians: about 17-20 dB
    assert h["underflow"] == underflow and 0 <= underflow < 0.2
    # NVFP4's two-level scales (NVIDIA 2025) by hand: g = 448·6 / amax, s_b = E4M3(amax_b·g / 6), decode s_b / g;
    # E4M3 rounds s_b to nearest, so a block's largest elements may scale to just above 6 and clip (saturate)
    g = 448 * 6 / x.abs().max()
    block_amax = x.reshape(32, 4, 16).abs().amax(-1, keepdim=True)  # (rows, blocks, 1)
    s = (block_amax * (g * (1 / 6))).to(torch.float8_e4m3fn).float()
    decode = s * torch.reciprocal(g)
    saturated = float((x.reshape(32, 4, 16) * torch.reciprocal(decode)).abs().gt(6).sum()) / x.numel()
    assert h["saturation"] == saturated and 0 < saturated < 0.1  # a few elements per 16-element block at most
    assert h["scale_max"] == pytest.approx(float(decode.max()), rel=1e-6)
    assert h["scale_min"] == pytest.approx(float(decode.min()), rel=1e-6)
    # the largest block decode scale is the largest block's amax / 6, up to E4M3 rounding (2^-4 relative)
    assert h["scale_max"] == pytest.approx(float(x.abs().max()) / 6, rel=2**-4)


def test_backend_auto_on_cpu_compiles_and_matches_the_eager_reference_bit_for_bit():
    # operands of 2^16+ elements take the compiled kernels (and wgrad's dyᵀ, xᵀ the column path);
    # the same seed gives the same SR bits, so the forward and dgrad match exactly. wgrad's quantized
    # operands are the same bits too (test_numerics_compiled: columns and kept values), but they reach its GEMM
    # in other memory layouts (the kept Q(xᵀ), the column path's output), and where the CPU's BF16 GEMM
    # sums in a layout-dependent order (AVX2 without native BF16: 5 of 81,920 elements, 8e-6 apart) dw
    # matches to the FP32 sum's rounding; on AVX-512 machines it is bit-identical as well.
    torch.manual_seed(0)
    base = nn.Linear(256, 320, bias=False)
    x = torch.randn(512, 256) * torch.logspace(-3, 3, 256)
    dy = torch.randn(512, 320) * 1e-2
    results = []
    for backend in ("emulate", "auto"):
        layer = QuantLinear.from_linear(nn.Linear(256, 320, bias=False), GemmRecipe.from_dict(NVFP4), backend=backend)
        layer.load_state_dict(base.state_dict())
        layer.sr_generator = torch.Generator().manual_seed(11)
        xr = x.clone().requires_grad_()
        with torch.autocast("cpu", torch.bfloat16):
            y = layer(xr)
        y.backward(dy.bfloat16())
        results.append((y, xr.grad, layer.weight.grad))
    (y, dx, dw), (y2, dx2, dw2) = results
    assert torch.equal(y.float().view(torch.int32), y2.float().view(torch.int32))
    assert torch.equal(dx.float().view(torch.int32), dx2.float().view(torch.int32))
    assert torch.allclose(dw, dw2, rtol=1e-5, atol=1e-6 * float(dw.abs().max()))
    assert int((dw != dw2).sum()) <= 16


def test_recording_health_leaves_the_global_generator_alone():
    from lowbit.numerics import get_spec
    from lowbit.quant.linear import operand_health

    t = torch.randn(64, 64)
    torch.manual_seed(3)
    before = torch.get_rng_state()
    first = operand_health(t, get_spec("nvfp4").replace(rounding="sr"))
    assert torch.equal(torch.get_rng_state(), before)
    assert operand_health(t, get_spec("nvfp4").replace(rounding="sr")) == first  # and it repeats


MXFP4_W = {"fprop": {"x": "mxfp4", "w": "mxfp4"}, "dgrad": {"dy": "mxfp4", "w": "mxfp4"}}


def _counting(layer):
    """Count the layer's weight quantizations (the emulator's ``fprop.w`` calls)."""
    calls, quantize = [], layer._emulator.quantize

    def counted(lyr, t, operand, dtype):
        calls.append(operand)
        return quantize(lyr, t, operand, dtype)

    layer._emulator.quantize = counted
    return calls


@pytest.mark.parametrize("recipe", [NVFP4, MXFP4_W], ids=["nvfp4", "mxfp4"])
def test_a_forward_without_gradient_quantizes_an_unchanged_weight_once(recipe):
    torch.manual_seed(0)
    layer = QuantLinear(64, 96, recipe=GemmRecipe.from_dict(recipe), backend="emulate")
    x = torch.randn(4, 64)
    calls = _counting(layer)
    with torch.no_grad():
        first = layer(x)
        again = [layer(torch.randn(4, 64)) for _ in range(3)]
    assert calls.count("fprop.w") == 1 and len(again) == 3
    with torch.no_grad():
        assert torch.equal(layer(x), first)
    layer._weight_cache.clear()  # the same bits as quantizing again
    assert torch.equal(layer(x).detach(), first)
    assert calls.count("fprop.w") == 2


def _copy(layer):
    """A fresh layer with ``layer``'s recipe and parameters, its weight cache empty."""
    twin = QuantLinear(layer.in_features, layer.out_features, recipe=layer.recipe, backend=layer.backend)
    twin.load_state_dict(layer.state_dict())
    return twin


@pytest.mark.parametrize("recipe", [NVFP4, MXFP4_W, MXFP4], ids=["nvfp4", "mxfp4-w", "mxfp4"])
def test_gradient_accumulation_quantizes_each_weight_once_per_optimizer_step(recipe):
    """Micro-batches between two optimizer steps share one Q(W) (fprop) and one Q(Wᵀ) (dgrad, where
    it is not Q(W) transposed), and the accumulated gradients are bit for bit those of quantizing the
    weight for every micro-batch (a fresh layer each)."""
    torch.manual_seed(0)
    layer = QuantLinear(64, 96, recipe=GemmRecipe.from_dict(recipe), backend="emulate")
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1, fused=True)  # writes without a version bump
    for _ in range(2):
        calls = _counting(layer)
        grads = []
        for i in range(3):
            x = torch.randn(32, 64, requires_grad=True)
            twin = _copy(layer)
            torch.manual_seed(i)  # the same SR draws for dy
            twin(x).square().sum().backward()
            grads.append((x.grad.clone(), twin.weight.grad))
            x.grad = None
            torch.manual_seed(i)
            layer(x).square().sum().backward()
            assert torch.equal(x.grad, grads[-1][0])
        assert torch.equal(layer.weight.grad, grads[0][1] + grads[1][1] + grads[2][1])
        assert calls.count("fprop.w") == 1
        assert calls.count("dgrad.w") == (0 if layer.weight_quantized_once() is None else 1)
        opt.step()
        opt.zero_grad()
        del layer._emulator.quantize  # the counting wrapper off: the next step counts afresh


def test_a_training_forward_after_a_fused_optimizer_step_or_a_load_sees_the_new_weight():
    """The cache would serve a stale weight if keyed by the version counter alone: a fused AdamW step
    writes the parameters without bumping it. Each forward equals a fresh layer's (no cache)."""
    torch.manual_seed(0)
    layer = QuantLinear(64, 96, recipe=GemmRecipe.from_dict(MXFP4_W), backend="emulate")
    saved = {k: v.clone() for k, v in layer.state_dict().items()}
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1, fused=True)
    x = torch.randn(32, 64)
    first = layer(x)
    first.square().sum().backward()
    version = layer.weight._version
    opt.step()
    assert layer.weight._version == version  # what the optimizer-step count is there for
    after = layer(x)
    assert not torch.equal(after, first) and torch.equal(after, _copy(layer)(x))
    layer.load_state_dict(saved)
    assert torch.equal(layer(x), first)


def test_the_cached_weight_follows_an_optimizer_step_and_a_checkpoint_load():
    torch.manual_seed(0)
    layer = QuantLinear(64, 96, recipe=GemmRecipe.from_dict(NVFP4), backend="emulate")
    x = torch.randn(4, 64)

    def fresh():  # no cache: a forward with gradient quantizes the weight as it is now
        return layer(x).detach()

    with torch.no_grad():
        before = layer(x)
    saved = {k: v.clone() for k, v in layer.state_dict().items()}
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer(x).square().sum().backward()
    opt.step()
    with torch.no_grad():
        after_step = layer(x)
    assert not torch.equal(after_step, before) and torch.equal(after_step, fresh())  # no stale weight
    with torch.no_grad():
        layer(x)  # cache filled with the stepped weight
    layer.load_state_dict(saved)
    with torch.no_grad():
        assert torch.equal(layer(x), before)
    with torch.no_grad():  # an in-place write of any kind (an EMA swap) also bumps the version
        layer.weight.mul_(2.0)
        assert torch.equal(layer(x), fresh())


def test_no_cache_where_reuse_would_change_a_number():
    sr = {"fprop": {"x": "nvfp4", "w": {"preset": "nvfp4_2d", "rounding": "sr"}}}
    layer = QuantLinear(64, 96, recipe=GemmRecipe.from_dict(sr), backend="emulate")
    with torch.no_grad():
        layer(torch.randn(4, 64))
    assert not layer._weight_cache  # SR weights draw anew every forward
    layer = QuantLinear(64, 96, recipe=GemmRecipe.from_dict(NVFP4), backend="emulate")
    layer.record_health, layer.sharded = True, False
    with torch.no_grad():
        layer(torch.randn(4, 64))
    assert not layer._weight_cache and "fprop.w" in layer.health
    layer.record_health, layer.sharded = False, True  # FSDP2 re-gathers into the same storage
    with torch.no_grad():
        layer(torch.randn(4, 64))
    assert not layer._weight_cache


@pytest.mark.parametrize("recipe", [NVFP4, MXFP4, FP8], ids=["nvfp4", "mxfp4", "fp8"])
def test_a_health_step_adds_one_compiled_quantization_per_operand_and_none_otherwise(recipe, monkeypatch):
    """What recording health costs, counted: each of the six operands is quantized once more for its
    statistics (``quant_error_and_scales``: compiled, no codes written), and a step without recording
    adds nothing."""
    from lowbit.quant import linear

    calls = []
    measure = linear.quant_error_and_scales

    def counted(t, spec, **kwargs):
        calls.append(kwargs)
        return measure(t, spec, **kwargs)

    monkeypatch.setattr(linear, "quant_error_and_scales", counted)
    _, layer = _pair(recipe)
    x = torch.randn(64, 64, requires_grad=True)
    layer(x).sum().backward()
    assert calls == []
    layer.record_health = True
    layer(x).sum().backward()
    assert len(calls) == 6 and all(kw == {"seed": 0} for kw in calls)
    assert sorted(layer.health) == sorted(f"{g}.{o}" for g, ops in linear.OPERANDS.items() for o in ops)


def _saved_bytes_and_grads(layer, x, dy, dtype):
    """(bytes the forward saves for backward, parameters excluded; dx, dW, db) of one step."""
    params = {p.data_ptr() for p in layer.parameters()}
    saved = []

    def pack(t):
        if t.data_ptr() not in params:
            saved.append(t.numel() * t.element_size())
        return t

    x = x.detach().requires_grad_()
    torch.manual_seed(1)  # the gradients' SR draws
    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", dtype, enabled=dtype != torch.float32),
    ):
        y = layer(x)
    y.backward(dy.to(y.dtype))
    grads = (x.grad, layer.weight.grad, layer.bias.grad)
    layer.zero_grad()
    return sum(saved), grads


_MXFP8_ALL = {
    "fprop": {"x": "mxfp8_e4m3", "w": "mxfp8_e4m3"},
    "dgrad": {"dy": "mxfp8_e4m3", "w": "mxfp8_e4m3"},
    "wgrad": {"dy": "mxfp8_e4m3", "x": "mxfp8_e4m3"},
}


KEPT_INPUT = [  # name, recipe, scale bytes, the dtypes the default run checks (each compiles its kernels)
    ("nvfp4", NVFP4, lambda n: n // 16 + 4, ("bf16", "fp32")),  # E4M3 block scales, an FP32 global scale
    ("mxfp4", MXFP4, lambda n: n // 32 * 4, ("bf16",)),  # E8M0 block scales, held as float32 (a vectorized restore)
    ("mxfp8", _MXFP8_ALL, lambda n: n // 32 * 4, ()),
    ("fp8", FP8, lambda n: 4, ("fp32",)),  # one FP32 tensor scale; kept from a copy of xᵀ (the reference's layout)
]


@pytest.mark.parametrize(
    ("recipe", "scale_bytes", "dtype"),
    [
        pytest.param(
            recipe,
            scale_bytes,
            dtype,
            id=f"{name}-{dtype_name}",
            marks=() if dtype_name in default else pytest.mark.slow,
        )
        for name, recipe, scale_bytes, default in KEPT_INPUT
        for dtype_name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))
    ],
)
def test_the_input_kept_as_element_values_gives_bit_identical_gradients_from_half_the_bytes(recipe, scale_bytes, dtype):
    """wgrad's Q(xᵀ) quantized in the forward and kept as FP8-held element values and 8-bit scales
    (``Kept``) instead of x in the compute dtype: dx, dW and db bit for bit those of quantizing x in
    the backward, and the forward saves one byte per element of x (and its scales) instead of two (four)."""
    torch.manual_seed(0)
    layer = QuantLinear(192, 256, recipe=GemmRecipe.from_dict(recipe))  # backend auto: compiled on CPU
    reference = _copy(layer)
    reference._keep_wgrad_x = lambda x, dtype: None  # the path before: x saved, quantized in the backward
    x = torch.randn(4, 128, 192) * 3
    dy = torch.randn(4, 128, 256)
    kept_bytes, grads = _saved_bytes_and_grads(layer, x, dy, dtype)
    full_bytes, expected = _saved_bytes_and_grads(reference, x, dy, dtype)
    for got, want in zip(grads, expected, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert full_bytes - kept_bytes == x.numel() * dtype.itemsize - x.numel() - scale_bytes(x.numel())


def test_a_forward_without_gradient_keeps_nothing(monkeypatch):
    """Evaluation under ``no_grad`` makes no wgrad operand (``needs_input_grad`` still says the weight
    needs one there): one quantization per layer, as before keeping existed."""
    import lowbit.quant.linear as linear

    calls = []
    monkeypatch.setattr(linear, "keep_columns", lambda *a, **k: calls.append(1))
    layer = QuantLinear(192, 256, recipe=GemmRecipe.from_dict(NVFP4))
    x = torch.randn(4, 128, 192)
    with torch.no_grad():
        layer(x)
    assert calls == []
    layer(x).sum().backward()
    assert calls == [1]
