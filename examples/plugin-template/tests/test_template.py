"""The template's plugins: numbers of the format, the posenc's bias, the precision's conversion.

Run after installing the distribution (``pip install -e .``, then ``pytest``): lowbit finds the
plugins through the installed entry points, as it does in a training run.
"""

import math

import pytest
import torch
from lowbit.errors import LowbitError
from lowbit.numerics import fake_quantize, get_format
from lowbit.quant import QuantLinear
from lowbit.registry import registry
from omegaconf import OmegaConf
from torch import nn

from lowbit_template.formats import TPL_INT5
from lowbit_template.posenc import LogDistanceBias
from lowbit_template.precision import Int5Precision

# ---- the format ----------------------------------------------------------------------------------


def test_format_is_registered_under_its_name():
    assert get_format("tpl_int5") is TPL_INT5
    assert TPL_INT5.lowbit_plugin_api == 1
    assert (TPL_INT5.bits, TPL_INT5.qmin, TPL_INT5.qmax, TPL_INT5.max) == (5, -15, 15, 15.0)


def test_format_round_trips_every_representable_value_exactly():
    values = TPL_INT5.values()
    assert values.tolist() == [float(v) for v in range(-15, 16)]  # narrow range: no -16
    codes = TPL_INT5.encode(values)
    assert codes.dtype == torch.int8 and codes.tolist() == list(range(-15, 16))
    torch.testing.assert_close(TPL_INT5.decode(codes), values, rtol=0, atol=0)


def test_format_rounds_ties_to_even_and_saturates_symmetrically():
    x = torch.tensor([0.5, 1.5, 2.5, -2.5, 3.5, 14.5, 2.4999, 2.5001, 100.0, -100.0, -15.6, float("nan")])
    expected = [0, 2, 2, -2, 4, 14, 2, 3, 15, -15, -15, 0]
    assert TPL_INT5.encode(x).tolist() == expected


def test_quantizing_with_the_format_scales_by_amax_over_15():
    # amax 3.75 -> scale 3.75 / 15 = 0.25: the elements become 2.5 (tie -> 2) and 3.5 (tie -> 4) steps
    x = torch.tensor([[-3.75, 0.625, 0.875, 0.1]])
    out = fake_quantize(x, {"element": "tpl_int5", "block": "tensor"})
    torch.testing.assert_close(out, torch.tensor([[-3.75, 0.5, 1.0, 0.0]]), rtol=0, atol=0)


# ---- the positional encoding ---------------------------------------------------------------------


def test_posenc_bias_has_the_shape_and_values_of_its_formula():
    pe = registry.build("posenc", {"name": "tpl_logbias"}, dim=64, n_heads=2, head_dim=32, max_len=16, grid=None)
    assert isinstance(pe, LogDistanceBias)
    pos = torch.arange(5)
    bias = pe.bias(pos, pos)
    assert bias.shape == (2, 5, 5) and bias.dtype == torch.float32
    # slopes 2^-4 and 2^-8 for two heads; query 2, key 0: distance 2
    assert bias[0, 2, 0].item() == pytest.approx(-math.log(3) / 16, rel=1e-6)
    assert bias[1, 4, 1].item() == pytest.approx(-math.log(4) / 256, rel=1e-6)
    assert torch.all(bias.diagonal(dim1=1, dim2=2) == 0)
    assert torch.all(bias.triu(diagonal=1) == 0)  # future keys: left to the causal mask
    x = torch.randn(3, 5, 64)
    assert torch.equal(pe.embed(x, pos), x)  # a bias-only encoding adds nothing to the tokens


def test_posenc_options_are_checked():
    doubled = registry.build("posenc", {"name": "tpl_logbias", "strength": 2.0}, n_heads=2)
    pos = torch.arange(3)
    assert doubled.bias(pos, pos)[0, 1, 0].item() == pytest.approx(-2 * math.log(2) / 16, rel=1e-6)
    with pytest.raises(LowbitError, match="has no option 'gain'; valid: strength"):
        registry.build("posenc", {"name": "tpl_logbias", "gain": 2.0}, n_heads=2)
    with pytest.raises(LowbitError, match="takes 1-D positions"):
        doubled.bias(torch.zeros(4, 2, dtype=torch.long), torch.zeros(4, 2, dtype=torch.long))


def test_posenc_runs_in_the_gpt_trunk():
    model = registry.build(
        "models", {"name": "gpt", "dim": 32, "n_layers": 1, "n_heads": 2, "max_len": 8, "posenc": "tpl_logbias"}
    )
    assert isinstance(model.posenc, LogDistanceBias)
    logits = model(torch.randint(0, 256, (2, 8)))
    assert logits.shape == (2, 8, 256) and torch.isfinite(logits).all()


# ---- the precision plugin ------------------------------------------------------------------------


def test_precision_converts_linear_layers_to_int5():
    torch.manual_seed(0)
    precision = registry.build("precision", "tpl_int5", device_type="cpu")
    assert isinstance(precision, Int5Precision)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(64, 32, bias=False))
    model.add_module("lm_head", nn.Linear(32, 16, bias=False))
    weight = model.proj.weight.detach().clone()
    precision.convert_module(model)
    assert isinstance(model.proj, QuantLinear) and model.proj.weight is not None
    assert type(model.lm_head) is nn.Linear  # kept in high precision by keep: [lm_head]
    assert precision.report.converted == ["proj"] and precision.report.kept == ["lm_head"]

    spec = precision.recipe.fprop.a
    assert (spec.element, spec.block, spec.scale_format, spec.rounding) == ("tpl_int5", (1, 32), "fp32", "rne")
    assert precision.recipe.wgrad.a.rounding == "sr"
    x = torch.randn(4, 64)
    expected = fake_quantize(x, spec) @ fake_quantize(weight, spec).t()
    out = model.proj(x)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert (out - x @ weight.t()).abs().max() > 1e-3  # the GEMM did see 5-bit operands
    # each 1x32 block of the weight holds at most 31 levels: multiples of its scale amax / 15
    w_q = fake_quantize(weight, spec).view(32, 2, 32)
    steps = w_q / (weight.view(32, 2, 32).abs().amax(-1, keepdim=True) / 15)
    torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-4)


def test_recipe_yaml_selects_both_plugins_and_the_precision_config_comes_from_the_class():
    from lowbit.config import compose

    composed = compose(["recipe=tpl_int5_llm"])
    assert composed.choices["precision"] == "tpl_int5" and composed.choices["posenc"] == "tpl_logbias"
    options = OmegaConf.to_container(composed.cfg.precision, resolve=True)
    assert options["fprop"]["x"] == {"element": "tpl_int5", "block": [1, 32], "scale_format": "fp32"}
    assert options["wgrad"]["dy"]["rounding"] == "sr" and options["wgrad"]["rht"] == 0
    assert registry.build("precision", options, device_type="cpu").recipe == Int5Precision().recipe
    assert OmegaConf.to_container(composed.cfg.posenc) == {"name": "tpl_logbias", "strength": 1.0}
