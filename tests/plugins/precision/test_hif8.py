"""The hif8 precision plugin: every GEMM input is a HiF8 code times a power-of-two tensor scale that
maps amax under 15 (activations, weights) or 224 (gradients), rounded ties-away; the head stays high
precision; its knobs are config overrides; bad values are one-line errors."""

import pytest
import torch

from lowbit.config import compose
from lowbit.errors import LowbitError
from lowbit.numerics import get_format, get_spec
from lowbit.quant import QuantLinear, quant_layers
from lowbit.run import build

HIF8 = get_format("hif8")
OPERANDS = ("fprop.x", "fprop.w", "dgrad.dy", "dgrad.w", "wgrad.dy", "wgrad.x")


def _built(*overrides):
    return build(compose(["recipe=hif8_llm", "debug=smoke", *overrides]).cfg)


def test_every_gemm_input_is_hif8_with_the_training_targets():
    precision = _built().precision
    fwd = get_spec({"element": "hif8", "block": "tensor", "rounding": "ta", "pow2_scale": True, "amax_target": 15})
    bwd = fwd.replace(amax_target=224.0)
    assert tuple(precision.recipe.spec_of(op) for op in OPERANDS) == (fwd, fwd, bwd, fwd, bwd, fwd)
    assert precision.recipe.fprop.rht == precision.recipe.dgrad.rht == precision.recipe.wgrad.rht == 0


def _on_hif8_grid(values: torch.Tensor) -> bool:
    """Every value a HiF8 value: encoding and decoding gives it back exactly."""
    return torch.equal(HIF8.decode(HIF8.encode(values)), values)


def test_the_three_gemms_see_hif8_codes_times_power_of_two_scales():
    built = _built()
    layer = next(m for m in built.task.modules() if isinstance(m, QuantLinear))
    seen = {}
    emulator = layer._emulator
    original = emulator.quantize

    def spy(lyr, t, operand, dtype):
        out = original(lyr, t, operand, dtype)
        seen[operand] = (t.detach().float().clone(), out.detach().float().clone())
        return out

    emulator.quantize = spy
    try:
        gen = torch.Generator().manual_seed(0)
        x = 3 * torch.randn(4, 8, layer.in_features, generator=gen, requires_grad=True)
        with built.precision.forward_context():
            y = layer(x)
        (y.float() * 50 * torch.randn(y.shape, generator=gen)).sum().backward()
    finally:
        emulator.quantize = original
    assert {op for op in seen} >= {"fprop.x", "dgrad.dy", "wgrad.dy", "wgrad.x"}
    for operand, (t, q) in seen.items():
        target = 224.0 if operand.endswith("dy") else 15.0
        amax = float(t.abs().max())
        scale = 2.0 ** torch.floor(torch.log2(torch.tensor(target / amax))).item()  # largest 2^k <= target / amax
        assert amax * scale <= target < 2 * amax * scale, operand
        # the GEMM's operand is a HiF8 code decoded and divided by the scale: on the grid once scaled back
        assert _on_hif8_grid(q * scale), operand
        # and the code is x·scale rounded to the nearest HiF8 value (ties away)
        expected = HIF8.decode(HIF8.encode((t * scale).to(torch.float32), rounding="ta")) / scale
        torch.testing.assert_close(q, expected.to(q.dtype).float(), rtol=0, atol=0, msg=operand)


def test_the_head_stays_high_precision_and_training_runs():
    built = _built()
    assert "model.lm_head" not in quant_layers(built.task)
    assert "hif8" in built.precision.description


def test_targets_and_rounding_are_config_overrides():
    precision = _built("precision.forward_target=8", "precision.backward_target=32", "precision.rounding=rne").precision
    assert precision.recipe.spec_of("fprop.x").amax_target == 8.0
    assert precision.recipe.spec_of("wgrad.dy").amax_target == 32.0
    assert precision.recipe.spec_of("dgrad.w").rounding == "rne"


def test_bad_values_are_one_line_errors():
    with pytest.raises(LowbitError, match="hif8 rounding must be ta .* got 'up'"):
        _built("precision.rounding=up")
    with pytest.raises(
        LowbitError, match=r"amax_target must be in \(0, 32768\] \(the 'hif8' max; 0 means the max\), got 40000"
    ):
        _built("precision.backward_target=40000")


def test_delayed_scaling_maps_the_history_amax_to_the_specs_target():
    from lowbit.quant.precision import QuantPrecision

    spec = {"element": "hif8", "block": "tensor", "rounding": "ta", "amax_target": 15.0}
    recipe = {"fprop": {"x": spec, "w": spec}, "dgrad": {}, "wgrad": {}}
    precision = QuantPrecision(recipe=recipe, delayed_scaling={"history_len": 4}, mode="fp32", device_type="cpu")
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 32))
    precision.convert_module(model)
    amaxes = []
    for scale in (1.0, 6.0, 2.0):
        x = torch.randn(8, 32) * scale
        amaxes.append(float(x.abs().max()))
        model(x).sum().backward()
    state = model[0].scaling_state["fprop.x"]
    assert float(state.scale) == pytest.approx(15.0 / max(amaxes))  # not 32768 / amax
