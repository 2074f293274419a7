"""dispatch: which specs the kernels cover, KernelQTensor == the numerics' QTensor for every covered
preset, one-read rowwise+colwise pairs, and QuantLinear's triton path: the same numbers as emulate
(up to FP32 accumulation order) through the custom ops, run here under the interpreter."""

import dataclasses

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lowbit.quant.backends as quant_backends
from lowbit.errors import LowbitError
from lowbit.kernels import dispatch
from lowbit.numerics import QuantSpec, dequantize, quantize
from lowbit.quant import GemmRecipe, QuantLinear

COVERED = [
    "fp8_e4m3_tensor",
    "fp8_e4m3_row",
    "fp8_e5m2_tensor",
    "mxfp8_e4m3",
    "mxfp8_e5m2",
    "mxfp4",
    "nvfp4",
    "nvfp4_2d",
]


def test_supported_specs_and_the_reasons_for_the_others():
    for name in COVERED:
        assert dispatch.supports(QuantSpec.preset(name)) is None, name
    assert dispatch.supports(QuantSpec.preset("mxfp4").replace(rounding="sr", rht_size=32, sr_prescale=0.75)) is None
    assert dispatch.supports(QuantSpec(element="e2m1", block=(1, 32), scale_format="ue5m3")) is None
    uncovered = {
        "int8_channel": "int8 elements",
        "mxfp6_e2m3": "e2m3 elements",
        "int4_group32": "int4 elements",
    }
    for name, reason in uncovered.items():
        assert dispatch.supports(QuantSpec.preset(name)) == reason
    assert dispatch.supports(None) == "a high-precision operand"
    assert dispatch.supports(QuantSpec(element="e4m3", saturate=False)) == "non-saturating FP8"
    assert dispatch.supports(QuantSpec(element="e4m3", block=(1, 32))) == "FP32 scales on (1, 32) blocks"
    assert dispatch.supports(QuantSpec.preset("nvfp4").replace(rht_size=256)) == "a 256-point Hadamard transform"
    assert dispatch.supports(QuantSpec(element="e4m3", rounding="ta")) == "rounding 'ta'"


@pytest.mark.parametrize("name", COVERED)
def test_kernel_qtensor_is_the_numerics_qtensor(name, device, bits):
    spec = QuantSpec.preset(name)
    x = torch.randn(48, 64) * torch.logspace(-4, 4, 64)
    got = dispatch.quantize(x.to(device), spec).to_qtensor()
    ref = quantize(x, spec)
    assert torch.equal(got.codes.cpu(), ref.codes)
    assert torch.equal(got.scale_codes.cpu(), ref.scale_codes)
    assert torch.equal(bits(got.scales), bits(ref.scales))
    if ref.global_scale is not None:
        assert torch.equal(bits(got.global_scale), bits(ref.global_scale))
    moved = dataclasses.replace(got, codes=got.codes.cpu(), scales=got.scales.cpu(), scale_codes=got.scale_codes.cpu())
    if got.global_scale is not None:
        moved.global_scale = got.global_scale.cpu()
    assert torch.equal(dequantize(moved), dequantize(ref))


def test_pairs_from_one_read_equal_two_calls(device):
    x = torch.randn(64, 96).to(device)
    row = QuantSpec.preset("nvfp4").replace(rounding="sr")
    col = row.replace(rht_size=16, rht_seed=3)  # NVFP4's dgrad and wgrad dy
    assert dispatch.pairable(row, col)
    seed = torch.tensor([4], device=device)
    q_row, q_col = dispatch.quantize_pair(x, row.replace(rounding="rne"), col.replace(rounding="rne"), seed=seed)
    one_row = dispatch.quantize(x, row.replace(rounding="rne"))
    one_col = dispatch.quantize(x.t(), col.replace(rounding="rne"))
    assert torch.equal(q_row.operand.codes, one_row.operand.codes)
    assert torch.equal(q_col.operand.codes, one_col.operand.codes)
    assert torch.equal(q_col.operand.global_scale, one_col.operand.global_scale)
    assert not dispatch.pairable(QuantSpec.preset("mxfp4"), QuantSpec.preset("nvfp4"))
    fp8_row, mx_col = dispatch.quantize_pair(x, QuantSpec.preset("fp8_e4m3_row"), QuantSpec.preset("mxfp4"))
    assert fp8_row.shape == (64, 96) and mx_col.shape == (96, 64)


class _CountOps(TorchDispatchMode):
    """Counts calls of ``lowbit::`` custom ops."""

    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "lowbit":
            name = func.__name__.split(".")[0]
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


RNE_RECIPES = {
    "nvfp4": {
        "fprop": {"x": "nvfp4", "w": "nvfp4_2d"},
        "dgrad": {"dy": "nvfp4", "w": "nvfp4_2d"},
        "wgrad": {"dy": "nvfp4", "x": "nvfp4", "rht": 16},
    },
    "mxfp4": {
        "fprop": {"x": "mxfp4", "w": "mxfp4"},
        "dgrad": {"dy": "mxfp4", "w": "mxfp4", "rht": 32},
        "wgrad": {"dy": "mxfp4", "x": "mxfp4", "rht": 32},
    },
    "fp8": {
        "fprop": {"x": "fp8_e4m3_tensor", "w": "fp8_e4m3_tensor"},
        "dgrad": {"dy": "fp8_e5m2_tensor", "w": "fp8_e4m3_tensor"},
        "wgrad": {"dy": "fp8_e5m2_tensor", "x": "fp8_e4m3_row"},
    },
}


def _run(recipe, backend, x, dy, state):
    layer = QuantLinear.from_linear(nn.Linear(64, 96), GemmRecipe.from_dict(recipe), backend=backend)
    layer.load_state_dict(state)
    layer.to(x.device)
    x = x.clone().requires_grad_()
    with _CountOps() as counter:
        y = layer(x)
        y.backward(dy)
    return (y.detach(), x.grad, layer.weight.grad, layer.bias.grad), counter.calls


@pytest.mark.parametrize("name", list(RNE_RECIPES))
def test_quantlinear_triton_path_equals_emulate(name, device, monkeypatch, accumulation_rtol):
    """With RNE everywhere, the kernels give emulate's numbers up to FP32 accumulation order, through
    2 quantize calls forward, 3 backward (dy rowwise and colwise from one read) and 3 GEMMs."""
    monkeypatch.setattr(quant_backends, "_kernels_serve", lambda t: True)  # the interpreter runs them on CPU
    torch.manual_seed(0)
    state = nn.Linear(64, 96).state_dict()
    x, dy = torch.randn(40, 64), torch.randn(40, 96) * 1e-3  # 40 tokens: padded for the 16/32 blocks
    state = {k: v.to(device) for k, v in state.items()}
    ref, none = _run(RNE_RECIPES[name], "emulate", x.to(device), dy.to(device), state)
    got, calls = _run(RNE_RECIPES[name], "auto", x.to(device), dy.to(device), state)
    assert none == {}
    quantizer = {"nvfp4": "quantize_nvfp4", "mxfp4": "quantize_mx", "fp8": "quantize_fp8"}[name]
    assert calls.get(quantizer) == 5 and calls.get("gemm_blockscaled") == 3
    bounds = _bounds(x.to(device), dy.to(device), state["weight"])
    _assert_close(got, ref, bounds, accumulation_rtol("fp8" if name == "fp8" else "bf16"))


def _bounds(x, dy, weight):
    """Sums of |products| of each output's GEMM (y, dx, dW; None for the bias gradient, a plain sum)."""
    return x.abs() @ weight.abs().t(), dy.abs() @ weight.abs(), dy.abs().t() @ x.abs(), None


def _assert_close(got, ref, bounds, rtol):
    """Equal up to FP32 accumulation order (rtol 1e-5 of each value), or, for a GPU's FP8 MMAs, within
    ``rtol`` of each GEMM's sum of |products| (x2: the bound is taken on the unquantized operands)."""
    for a, b, bound in zip(ref, got, bounds):
        if rtol <= 1e-5 or bound is None:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6 * a.abs().max().item())
        else:
            assert ((b - a).abs() <= 2 * rtol * bound + 1e-6 * a.abs().max()).all()


def test_quantlinear_triton_path_with_stochastic_rounding(device, monkeypatch):
    """NVFP4's recipe (SR on gradients): seeded from sr_generator, repeatable, close to emulate."""
    monkeypatch.setattr(quant_backends, "_kernels_serve", lambda t: True)
    recipe = {
        "fprop": {"x": "nvfp4", "w": "nvfp4_2d"},
        "dgrad": {"dy": {"preset": "nvfp4", "rounding": "sr"}, "w": "nvfp4_2d"},
        "wgrad": {"dy": {"preset": "nvfp4", "rounding": "sr"}, "x": "nvfp4", "rht": 16},
    }
    torch.manual_seed(1)
    state = {k: v.to(device) for k, v in nn.Linear(64, 96).state_dict().items()}
    x, dy = torch.randn(48, 64, device=device), torch.randn(48, 96, device=device)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(_run(recipe, "auto", x, dy, state)[0])
    assert all(torch.equal(a, b) for a, b in zip(*runs))  # the same seed, the same draws
    ref, _ = _run(recipe, "emulate", x, dy, state)
    for a, b in zip(ref[1:3], runs[0][1:3]):  # dx, dW: different noise, both unbiased around the truth
        assert (a - b).norm() < 0.5 * a.norm()


def test_triton_backend_names_the_operand_the_kernels_do_not_cover(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # past the CUDA check
    recipe = GemmRecipe.from_dict(
        {"fprop": {"x": "nvfp4", "w": "nvfp4_2d"}, "wgrad": {"dy": "int8_channel", "x": "mxfp4"}}
    )
    with pytest.raises(LowbitError, match=r"no kernels for wgrad.dy \(int8 elements\); use backend auto"):
        QuantLinear(64, 96, recipe=recipe, backend="triton")
    half = GemmRecipe.from_dict({"fprop": {"x": "mxfp4", "w": None}})
    with pytest.raises(LowbitError, match=r"no kernels for fprop.w \(a high-precision operand\)"):
        QuantLinear(64, 96, recipe=half, backend="triton")
    QuantLinear(64, 96, recipe=GemmRecipe.from_dict(RNE_RECIPES["mxfp4"]), backend="triton")  # all covered


def test_quantlinear_fp8_delayed_scaling_on_the_kernels(device, monkeypatch, accumulation_rtol):
    """FP8 delayed scaling: the kernels quantize with the scale from earlier steps and the layer records
    the same amax history as emulate."""
    monkeypatch.setattr(quant_backends, "_kernels_serve", lambda t: True)
    state = {k: v.to(device) for k, v in nn.Linear(64, 96).state_dict().items()}
    layers, inputs = {}, []
    for backend in ("emulate", "auto"):
        layer = QuantLinear.from_linear(nn.Linear(64, 96), GemmRecipe.from_dict(RNE_RECIPES["fp8"]), backend=backend)
        layer.load_state_dict(state)
        layer.to(device)
        layer.delayed_scaling = {"history_len": 4}
        outputs = []
        for step in range(3):
            x = torch.randn(32, 64, generator=torch.Generator().manual_seed(step)).to(device) * (step + 1)
            outputs.append(layer(x).detach())
            inputs.append(x)
        layers[backend] = (layer, outputs)
    (emulate, ref), (kernels, got) = layers["emulate"], layers["auto"]
    bounds = [x.abs() @ state["weight"].abs().t() for x in inputs[:3]]
    _assert_close(got, ref, bounds, accumulation_rtol("fp8"))
    state_ref = emulate.scaling_state["fprop.x"].state_dict()
    state_got = kernels.scaling_state["fprop.x"].state_dict()
    assert torch.equal(state_ref["amax_history"], state_got["amax_history"])
    assert torch.equal(state_ref["scale"], state_got["scale"])
