"""Quantization-aware training: every fake quantizer is lowbit.numerics' fake_quantize bit for bit;
LSQ/LSQ+ gradients are the paper's; STE clips; QFX's binary point learns the range; LSQ starts
from the data once and remembers it across state dicts; QATLinear multiplies the fake-quantized
operands."""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import matrices
from torch import nn

from lowbit.errors import LowbitError
from lowbit.numerics import fake_quantize, get_spec, quantize
from lowbit.quant.qat import FakeQuant, QATLinear, QATPrecision, qat_layers

PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

INT8_ROW = {"element": "int8", "block": "row"}
INT8_TENSOR = {"element": "int8", "block": "tensor"}
INT4_TENSOR = {"element": "int4", "block": "tensor"}
INT4_G32 = {"element": "int4", "block": (1, 32)}
INT4_G32_ASYM = {"element": "int4", "block": (1, 32), "asymmetric": True}
MINMAX_SPECS = {
    "int8 row": INT8_ROW,
    "int4 g32": INT4_G32,
    "int4 g32 asym": INT4_G32_ASYM,
    "nvfp4": "nvfp4",
    "mxfp4": "mxfp4",
}


def _adversarial() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    normal = torch.randn(4, 64, generator=g)
    return {
        "zeros": torch.zeros(4, 64),
        "one nonzero": torch.zeros(4, 64).index_put_((torch.tensor([1]), torch.tensor([5])), torch.tensor(3.0)),
        "huge": normal * 1e38,  # an asymmetric range (max - min) overflows FP32: NaN, in the reference too
        "near FLT_MAX": torch.full((4, 64), 3.4e38) * torch.sign(normal),
        "tiny (subnormal)": normal * 1e-40,
        "rows 2^-60 .. 2^60": normal * torch.exp2(torch.tensor([-60.0, -1.0, 1.0, 60.0]))[:, None],
        "one outlier": normal.index_put((torch.tensor([2]), torch.tensor([7])), torch.tensor(1e6)),
        "bf16": normal.bfloat16(),
        "bf16 huge": (normal * 1e30).bfloat16(),
        "activation (B, T, C)": torch.randn(2, 3, 64, generator=g) * 5,
    }


def _exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit for bit: same dtype, shape and bits (NaNs included: a NaN where the reference has one)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16}[actual.dtype]
    assert torch.equal(actual.view(bits), expected.view(bits)), (actual, expected)


# ---- forward values: the numerics reference, bit for bit ---------------------------------------------


@pytest.mark.parametrize("spec", MINMAX_SPECS.values(), ids=MINMAX_SPECS.keys())
@PROPERTY
@given(x=matrices())
def test_minmax_is_fake_quantize(spec, x):
    _exact(FakeQuant(spec)(x), fake_quantize(x, spec))


@pytest.mark.parametrize("spec", MINMAX_SPECS.values(), ids=MINMAX_SPECS.keys())
@pytest.mark.parametrize("name", _adversarial())
def test_minmax_is_fake_quantize_on_adversarial_inputs(spec, name):
    x = _adversarial()[name]
    _exact(FakeQuant(spec)(x), fake_quantize(x, spec))


def test_minmax_passes_the_gradient_through_unchanged():
    x = (torch.randn(4, 64) * torch.tensor([1e-3, 1.0, 1e3, 1e30])[:, None]).requires_grad_()
    dy = torch.randn(4, 64)
    FakeQuant("nvfp4")(x).backward(dy)
    _exact(x.grad, dy)


_LEARNED = {"int4 g32": INT4_G32, "int8 row": INT8_ROW, "int8 tensor": INT8_TENSOR, "int4 g32 asym": INT4_G32_ASYM}


@pytest.mark.parametrize("spec", _LEARNED.values(), ids=_LEARNED.keys())
@PROPERTY
@given(x=matrices(), data=st.data())
def test_lsq_is_fake_quantize_with_its_learned_scales(spec, x, data):
    fq = FakeQuant(spec, "lsq", shape=tuple(x.shape), learn_zero_point=get_spec(spec).asymmetric)
    n = fq.scale.numel()
    # any learned values: the forward takes |scale| and round(zero point)
    magnitudes = st.one_of(st.floats(1e-6, 1e6), st.floats(-1e6, -1e-6))
    scale = data.draw(st.lists(magnitudes, min_size=n, max_size=n))
    with torch.no_grad():
        fq.scale.copy_(torch.tensor(scale).reshape(fq.scale.shape))
        if get_spec(spec).asymmetric:
            zp = data.draw(st.lists(st.floats(-8.0, 7.0), min_size=n, max_size=n))
            fq.zero_point.copy_(torch.tensor(zp).reshape(fq.zero_point.shape))
    fq.initialized.fill_(True)
    zero_points = torch.round(fq.zero_point) if get_spec(spec).asymmetric else None
    expected = fake_quantize(x, spec, scales=fq.current_scale().detach(), zero_points=zero_points)
    _exact(fq(x), expected)
    torch.testing.assert_close(fq.current_scale().detach(), torch.tensor(scale).abs().float().reshape(fq.scale.shape))


@pytest.mark.parametrize("name", ["huge", "tiny (subnormal)", "bf16", "zeros", "one outlier"])
def test_lsq_static_and_fixed_are_fake_quantize_on_adversarial_inputs(name):
    x = _adversarial()[name]
    for fq in (
        FakeQuant(INT4_G32, "lsq", shape=tuple(x.shape)),
        FakeQuant(INT4_G32_ASYM, "lsq", shape=tuple(x.shape), learn_zero_point=True),
        FakeQuant(INT8_TENSOR, "static", calibration_steps=1),
        FakeQuant(INT8_TENSOR, "fixed"),
    ):
        out = fq(x)  # initializes (calibrates) from x
        zero_points = torch.round(fq.zero_point.detach()) if fq.spec.asymmetric else None
        _exact(out, fake_quantize(x, fq.spec, scales=fq.current_scale().detach(), zero_points=zero_points))
        if fq.mode == "fixed":
            continue  # a power of two: its own test below
        # started where min/max quantization is: its scales, and (for normal scales) its values
        minmax_scales = quantize(x, fq.spec).scales.reshape(-1)
        _exact(fq.scale.reshape(-1), minmax_scales)
        if name == "tiny (subnormal)":  # min/max scales 1e-40 / 7: the forward floors a scale at the smallest normal
            assert (minmax_scales < torch.finfo(torch.float32).tiny).all()
            assert (fq.current_scale() == torch.finfo(torch.float32).tiny).all()
        else:
            _exact(out, fake_quantize(x, fq.spec))


def test_fixed_point_scale_is_two_to_the_minus_rounded_frac_bits():
    x = torch.randn(8, 64)
    fq = FakeQuant(INT8_TENSOR, "fixed", shape=(8, 64))
    fq(x)  # init: the smallest F whose range covers the absmax
    amax = float(x.abs().max())
    assert fq.frac_bits.item() == math.floor(math.log2(127 / amax))
    assert 127 * 2.0 ** -fq.frac_bits.item() >= amax > 127 * 2.0 ** -(fq.frac_bits.item() + 1)
    for f, scale in [(2.6, 2.0**-3), (-4.2, 16.0), (2.5, 2.0**-2)]:  # round half to even
        with torch.no_grad():
            fq.frac_bits.fill_(f)
        assert fq.current_scale().item() == scale
        _exact(fq(x), fake_quantize(x, INT8_TENSOR, scales=torch.tensor([scale])))


def test_static_calibrates_a_running_absmax_then_freezes():
    fq = FakeQuant(INT8_TENSOR, "static", calibration_steps=2)
    for amax in (1.0, 3.0, 10.0):  # the third forward is past calibration: 10 clips to 3
        fq(torch.tensor([[amax, -0.5]]))
    assert float(fq.amax) == 3.0 and int(fq.observed) == 2
    _exact(fq.current_scale().detach(), quantize(torch.tensor([3.0]), INT8_TENSOR).scales.reshape(1))
    _exact(fq(torch.tensor([[10.0, -0.5]])), fake_quantize(torch.tensor([[10.0, -0.5]]), INT8_TENSOR, amax=3.0))
    fresh = FakeQuant(INT8_TENSOR, "static", calibration_steps=2).eval()
    x = torch.tensor([[5.0, -0.3]])
    _exact(fresh(x), fake_quantize(x, INT8_TENSOR))  # evaluated before training (the sanity check): min/max
    assert int(fresh.observed) == 0 and float(fresh.amax) == 0.0 and not bool(fresh.initialized)  # nothing kept


# ---- gradients ---------------------------------------------------------------------------------------

# int4: Qmin = -8, Qmax = 7; one scale s = 0.5 over n = 4 values, so LSQ's g = 1 / sqrt(4 * 7)
# x / s = 0.75 (inside), -1.25 (inside), -10 (below Qmin), 8 (above Qmax); upstream dy = 1, 2, 3, 4
X = [[0.375, -0.625, -5.0, 4.0]]
DY = [[1.0, 2.0, 3.0, 4.0]]
G = 1 / math.sqrt(4 * 7)


def test_lsq_gradients_are_the_papers_formula_by_hand():
    fq = FakeQuant(INT4_TENSOR, "lsq", shape=(1, 4))
    fq.set_scales(torch.tensor([0.5]))
    x = torch.tensor(X, requires_grad=True)
    out = fq(x)
    out.backward(torch.tensor(DY))
    assert out.tolist() == [[0.5, -0.5, -4.0, 3.5]]  # round(0.75) = 1, round(-1.25) = -1, clamp -8 and 7, times s
    assert x.grad.tolist() == [[1.0, 2.0, 0.0, 0.0]]  # straight through inside, zero outside
    # dx_hat/ds: round(v) - v inside (1 - 0.75, -1 + 1.25), Qmin below, Qmax above (LSQ eq. 3)
    ds = (1 * 0.25 + 2 * 0.25 + 3 * -8 + 4 * 7) * G  # = 4.75 g
    assert fq.scale.grad.item() == pytest.approx(ds, rel=1e-6)


def test_fp16_learned_scales_round_to_fp16_and_pass_the_gradient_straight_through():
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(3)) * 0.02
    fq = FakeQuant(INT4_G32, "lsq", shape=(4, 64), scale_dtype="fp16")
    fq.set_scales(torch.tensor([[0.1234567, 3e-9], [1e6, 0.002], [0.5, 0.75], [1e-3, 1e-4]]))
    scale = fq.current_scale()
    fp16 = torch.finfo(torch.float16)
    want = fq.scale.detach().abs().clamp(fp16.tiny, fp16.max).half().float()  # FP16's normal range, then its grid
    _exact(scale.detach(), want)
    _exact(fq(w).detach(), fake_quantize(w, INT4_G32, scales=want))  # the forward rounds on those scales
    twin = FakeQuant(INT4_G32, "lsq", shape=(4, 64))  # FP32 scales equal to the FP16 ones: the same gradient
    twin.set_scales(want)
    fq(w).square().sum().backward()
    twin(w).square().sum().backward()
    inside = (fq.scale.detach().abs() > fp16.tiny) & (fq.scale.detach().abs() < fp16.max)
    _exact(fq.scale.grad[inside], twin.scale.grad[inside])
    with pytest.raises(LowbitError, match="scale_dtype must be one of fp32, fp16, got 'bf16'"):
        FakeQuant(INT4_G32, "lsq", shape=(4, 64), scale_dtype="bf16")
    with pytest.raises(LowbitError, match="scale_dtype 'fp16' applies to learned scales"):
        FakeQuant(INT4_G32, "minmax", scale_dtype="fp16")


def test_lsq_plus_gradients_with_a_zero_point_by_hand():
    spec = {**INT4_TENSOR, "asymmetric": True}
    fq = FakeQuant(spec, "lsq", shape=(1, 4), learn_zero_point=True)
    fq.set_scales(torch.tensor([0.5]), torch.tensor([2.0]))
    # v = x / s + z = 2.75, 0.75 (inside), -10 (below), 8 (above)
    x = torch.tensor([[0.375, -0.625, -6.0, 3.0]], requires_grad=True)
    out = fq(x)
    out.backward(torch.tensor(DY))
    assert out.tolist() == [[0.5, -0.5, -5.0, 2.5]]  # (code - z) s: codes 3, 1, -8, 7
    assert x.grad.tolist() == [[1.0, 2.0, 0.0, 0.0]]
    ds = (1 * 0.25 + 2 * 0.25 + 3 * (-8 - 2) + 4 * (7 - 2)) * G  # Qmin - z below, Qmax - z above: -9.25 g
    dz = (3 * -0.5 + 4 * -0.5) * G  # 0 inside, -s outside (LSQ+): -3.5 g
    assert fq.scale.grad.item() == pytest.approx(ds, rel=1e-6)
    assert fq.zero_point.grad.item() == pytest.approx(dz, rel=1e-6)


def test_group_scales_get_the_gradient_of_their_own_block():
    """A (2, 64) weight in groups of 32: each of the 4 scales' gradient is that of a per-tensor
    quantizer on its block alone (same n = 32, so the same g)."""
    torch.manual_seed(0)
    w = torch.randn(2, 64)
    dy = torch.randn(2, 64)
    scales = torch.tensor([[0.2, 0.05], [0.4, 0.1]])  # small scales: some values clip
    fq = FakeQuant(INT4_G32, "lsq", shape=(2, 64))
    fq.set_scales(scales)
    x = w.clone().requires_grad_()
    fq(x).backward(dy)
    for i in range(2):
        for j in range(2):
            block = FakeQuant(INT4_TENSOR, "lsq", shape=(1, 32))
            block.set_scales(scales[i, j].reshape(1))
            xb = w[i : i + 1, 32 * j : 32 * (j + 1)].clone().requires_grad_()
            block(xb).backward(dy[i : i + 1, 32 * j : 32 * (j + 1)])
            torch.testing.assert_close(fq.scale.grad[i, j], block.scale.grad.reshape(()), rtol=1e-6, atol=0)
            _exact(x.grad[i : i + 1, 32 * j : 32 * (j + 1)], xb.grad)
    assert fq.grad_scale(w) == 1 / math.sqrt(32 * 7)


def test_activation_scales_count_elements_per_sample():
    """LSQ section 2.2: an activation's g = 1 / sqrt(N_features Qp), N per sample (here T x C = 256),
    not the batch's 1024 elements."""
    x = torch.randn(4, 8, 32) * 3
    per_sample = FakeQuant(INT8_TENSOR, "lsq", per_sample=True)
    per_batch = FakeQuant(INT8_TENSOR, "lsq")
    for fq in (per_sample, per_batch):
        fq.set_scales(torch.tensor([0.01]))
        fq(x).sum().backward()
    assert per_sample.grad_scale(x) == 1 / math.sqrt(256 * 127) and per_batch.grad_scale(x) == 1 / math.sqrt(1024 * 127)
    torch.testing.assert_close(per_sample.scale.grad, 2 * per_batch.scale.grad, rtol=1e-6, atol=0)


def test_static_scales_pass_gradients_inside_the_range_and_zero_them_outside():
    fq = FakeQuant(INT8_TENSOR, "static")
    fq.set_scales(torch.tensor([0.1]))  # range [-12.8, 12.7]
    x = torch.tensor([[-13.0, -12.8, -1.0, 0.0, 0.04, 12.7, 12.74, 12.76, 100.0]], requires_grad=True)
    dy = torch.arange(1.0, 10.0)[None]
    out = fq(x)
    out.backward(dy)
    assert out[0].tolist() == pytest.approx([-12.8, -12.8, -1.0, 0.0, 0.0, 12.7, 12.7, 12.7, 12.7], rel=1e-6)
    # inside means Qmin <= x / s <= Qmax: 12.74 / 0.1 rounds into the range but lies above it
    assert x.grad.tolist() == [[0.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.0, 0.0, 0.0]]
    assert not any(p.requires_grad for p in fq.parameters())  # static scales are buffers


# ---- QFX: the learned binary point ---------------------------------------------------------------------


@pytest.mark.parametrize("start", [-6.0, 12.0], ids=["everything rounds to 0", "everything clips"])
def test_fixed_point_binary_point_learns_the_datas_range(start):
    torch.manual_seed(0)
    x = torch.randn(64, 64) * 0.25  # amax 1.03: Qmax / amax = 124, so F* = floor(log2(124)) = 6
    target = math.floor(math.log2(127 / float(x.abs().max())))
    assert target == 6
    fq = FakeQuant(INT8_TENSOR, "fixed", shape=(64, 64))
    fq.initialized.fill_(True)
    with torch.no_grad():
        fq.frac_bits.fill_(start)
    opt = torch.optim.SGD(fq.parameters(), lr=3000.0)  # LSQ's g = 1 / sqrt(4096 * 127) makes F's gradient small
    errors = []
    for _ in range(30):
        error = (fq(x) - x).pow(2).sum() / x.pow(2).sum()  # MSE relative to the signal's
        opt.zero_grad()
        error.backward()
        opt.step()
        errors.append(float(error))
    assert errors[0] > 0.8  # F = -6: 64 x the amax, all 0; F = 12: range 0.03, all clip
    f = round(fq.frac_bits.item())
    assert abs(f - target) <= 1 < abs(start - target)  # within a bit of F* (F* + 1 clips the few largest values)
    assert errors[-1] < 2e-3 and errors[-1] == min(errors)


# ---- initialization and state ---------------------------------------------------------------------------


def test_lsq_initializes_from_the_first_forward_only():
    torch.manual_seed(0)
    w = torch.randn(4, 64)
    fq = FakeQuant(INT4_G32_ASYM, "lsq", shape=(4, 64), learn_zero_point=True)
    assert not fq.initialized
    fq(w)
    q = quantize(w, INT4_G32_ASYM)
    assert fq.initialized
    _exact(fq.scale.detach(), q.scales)
    _exact(fq.zero_point.detach(), q.zero_points.float())
    fq(w * 100)  # a second forward keeps the scales
    _exact(fq.scale.detach(), q.scales)
    assert not torch.equal(quantize(w * 100, INT4_G32_ASYM).scales, q.scales)


def test_initialized_scales_survive_a_state_dict_round_trip():
    torch.manual_seed(0)
    w = torch.randn(4, 64)
    fq = FakeQuant(INT4_G32, "lsq", shape=(4, 64))
    fq(w)
    with torch.no_grad():
        fq.scale.mul_(1.5)  # a learned value, no longer the data's min/max scale
    state = fq.state_dict()
    assert set(state) == {"scale", "initialized"} and bool(state["initialized"])
    fresh = FakeQuant(INT4_G32, "lsq", shape=(4, 64))
    fresh.load_state_dict(state)
    assert fresh.initialized
    _exact(fresh(w), fq(w))  # no re-init from w: the learned scales are used
    _exact(fresh.scale.detach(), quantize(w, INT4_G32).scales * 1.5)


def test_quantizer_modes_reject_what_they_cannot_do():
    cases = [
        (lambda: FakeQuant("nvfp4", "lsq", shape=(4, 32)), "quantizer mode 'lsq' learns or fixes integer step sizes; "),
        (lambda: FakeQuant("mxfp4", "static", shape=(4, 32)), "element 'e2m1' is not an integer format"),
        (lambda: QATPrecision(weight="mxfp4", weight_mode="lsq"), "use mode minmax for float formats"),
        (lambda: FakeQuant(INT4_G32, "fixed", shape=(4, 32)), "one symmetric power-of-two scale per tensor"),
        (lambda: FakeQuant(INT4_G32, "lsq"), "on an activation needs one scale per tensor (block 'tensor'), got "),
        (lambda: FakeQuant(INT4_G32, "lsqq"), "unknown quantizer mode 'lsqq'; valid: minmax, lsq, static, fixed"),
        (lambda: FakeQuant(INT4_G32, "lsq", shape=(4, 32), learn_zero_point=True), "learn_zero_point (LSQ+) needs"),
        (lambda: FakeQuant(INT4_G32).set_scales(torch.ones(1)), "set_scales needs a quantizer in mode static or lsq"),
    ]
    for make, message in cases:
        with pytest.raises(LowbitError, match=re.escape(message)):
            make()


# ---- QATLinear --------------------------------------------------------------------------------------------


def test_qat_linear_multiplies_the_fake_quantized_operands_and_shares_the_weights():
    torch.manual_seed(0)
    linear = nn.Linear(64, 16)
    layer = QATLinear.from_linear(linear, FakeQuant(INT4_G32, "lsq", shape=(16, 64)), FakeQuant(INT8_ROW))
    assert layer.weight is linear.weight and layer.bias is linear.bias
    x = torch.randn(2, 5, 64)
    expected = F.linear(fake_quantize(x, INT8_ROW), fake_quantize(linear.weight.detach(), INT4_G32), linear.bias)
    _exact(layer(x).detach(), expected.detach())  # the first forward: LSQ starts at the min/max scales
    assert set(layer.state_dict()) == {"weight", "bias", "weight_quant.scale", "weight_quant.initialized"}
    model = nn.Sequential(linear)
    model[0] = layer
    assert list(qat_layers(model)) == ["0"]


def test_qat_linear_records_health_per_operand():
    layer = QATLinear.from_linear(nn.Linear(32, 8), FakeQuant(INT8_TENSOR, "fixed", shape=(8, 32)), FakeQuant(INT8_ROW))
    x = torch.randn(4, 32)
    layer(x)
    assert layer.health == {}  # off unless the health callback turns it on
    layer.record_health = True
    layer(x)
    assert set(layer.health) == {"fprop.x", "fprop.w"}
    w = layer.health["fprop.w"]
    assert w["frac_bits"] == layer.weight_quant.frac_bits.item() and w["saturation"] == 0.0
    assert w["amax"] == float(layer.weight.abs().max())
    assert w["scale_min"] == w["scale_max"] == 2.0 ** -w["frac_bits"]
    assert "frac_bits" not in layer.health["fprop.x"] and "scale_mean" not in layer.health["fprop.x"]


def test_a_non_finite_operand_has_no_snr_to_boast_of():
    """A NaN in a tensor makes its SNR -inf (as lowbit.numerics.quant_error says), not a perfect +inf."""
    fq = FakeQuant(INT4_G32, "lsq", shape=(4, 32))
    x = torch.randn(4, 32)
    fq(x)
    x[0, 0] = math.nan
    stats = fq.stats(x, fq(x))
    assert math.isnan(stats["amax"]) and stats["snr_db"] == -math.inf
    assert FakeQuant("nvfp4").stats(x, fake_quantize(x, "nvfp4"))["snr_db"] == -math.inf
    assert FakeQuant("nvfp4").stats(torch.zeros(4, 32), torch.zeros(4, 32))["snr_db"] == math.inf
