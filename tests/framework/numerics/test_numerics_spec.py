"""QuantSpec: presets, YAML round trip, validation errors."""

import dataclasses

import pytest
import torch

import lowbit.registry  # noqa: F401  (plugin formats resolve, and unknown names list them)
from lowbit.errors import LowbitError
from lowbit.numerics import PRESETS, QuantSpec, get_spec, preset_names, quantize

REQUIRED_PRESETS = {
    "mxfp8_e4m3",
    "mxfp8_e5m2",
    "mxfp6_e2m3",
    "mxfp6_e3m2",
    "mxfp4",
    "nvfp4",
    "fp8_e4m3_tensor",
    "fp8_e4m3_row",
    "fp8_e5m2_tensor",
    "int8_channel",
    "int4_group32",
}


def test_required_presets_exist_with_their_definitions():
    assert set(preset_names()) >= REQUIRED_PRESETS
    mx = QuantSpec.preset("mxfp4")
    assert (mx.element, mx.block, mx.scale_format, mx.scale_rule) == ("e2m1", (1, 32), "e8m0", "floor")
    nv = QuantSpec.preset("nvfp4")
    assert (nv.element, nv.block, nv.scale_format, nv.global_scale) == ("e2m1", (1, 16), "e4m3", True)
    assert QuantSpec.preset("fp8_e4m3_row").block == "row"
    assert QuantSpec.preset("int4_group32").block == (1, 32)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_plain_dicts(name):
    spec = QuantSpec.preset(name)
    d = spec.to_dict()
    assert all(isinstance(v, (str, int, float, bool, list)) for v in d.values())
    assert QuantSpec.from_dict(d) == spec and get_spec(d) == spec and get_spec(name) is spec


def test_from_dict_with_a_preset_base_and_overrides():
    spec = get_spec({"preset": "nvfp4", "rounding": "sr", "rht_size": 16, "block": [16, 16]})
    assert spec.rounding == "sr" and spec.rht_size == 16 and spec.block == (16, 16) and spec.global_scale


def test_spec_is_frozen_and_hashable():
    spec = QuantSpec.preset("mxfp4")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.element = "e4m3"
    assert len({spec, QuantSpec.preset("mxfp4"), spec.replace(rounding="sr")}) == 2


def test_block_normalization():
    assert QuantSpec(block=32).block == (1, 32)
    assert QuantSpec(block=[16, 16]).block == (16, 16)
    assert QuantSpec(block=(32,)).block == (1, 32)


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"element": "fp5"}, "unknown formats 'fp5'; installed: .*e2m1"),
        ({"block": "column"}, "unknown block 'column'; valid: tensor, row"),
        ({"block": (0, 32)}, "block must be 'tensor', 'row' or two positive ints"),
        ({"block": (1, 2, 3)}, "block must be"),
        (
            {"scale_format": "e8m0", "scale_rule": "amax"},
            "scale_rule 'amax' does not fit scale_format 'e8m0'; valid: auto, floor",
        ),
        ({"scale_rule": "floor"}, "scale_rule 'floor' does not fit scale_format 'fp32'; valid: auto, amax"),
        ({"rounding": "stochastic"}, "unknown rounding 'stochastic'; valid: rne, ta, sr"),
        ({"rht_size": 24}, "rht_size must be 0 .off. or a power of two"),
        ({"sr_prescale": 1.5}, r"sr_prescale must be in \(0, 1\]"),
        ({"asymmetric": True}, "asymmetric needs an integer element format"),
        ({"global_scale": True, "block": (1, 16)}, "global_scale needs a low-precision"),
        ({"global_scale": True, "scale_format": "e4m3"}, "global_scale .* needs blocks"),
        ({"pow2_scale": True, "scale_format": "e8m0"}, "pow2_scale applies to fp32 scales"),
        ({"element": 3}, "QuantSpec.element must be a string"),
    ],
)
def test_invalid_specs_are_clear_errors(fields, message):
    with pytest.raises(LowbitError, match=message):
        QuantSpec(**fields)


def test_unknown_preset_and_field_and_type():
    with pytest.raises(LowbitError, match="unknown quantization preset 'nvfp5'; valid: .*mxfp4.*nvfp4"):
        get_spec("nvfp5")
    with pytest.raises(LowbitError, match="QuantSpec has no field 'blocks'; valid: preset, element, block"):
        get_spec({"blocks": 32})
    with pytest.raises(LowbitError, match="preset name, a mapping or a QuantSpec, got int"):
        get_spec(3)


def test_amax_target_maps_amax_to_it_instead_of_the_format_max():
    x = torch.tensor([[0.5, -3.0, 1.25, 0.0]])
    q = quantize(x, {"element": "e4m3", "block": "tensor", "amax_target": 12.0})
    assert q.scales.item() == 3.0 / 12.0  # decode scale amax / target
    pow2 = quantize(x, {"element": "e4m3", "block": "tensor", "amax_target": 10.0, "pow2_scale": True})
    assert pow2.scales.item() == 0.5  # encode 2 = largest 2^k <= 10 / 3: amax lands on 6 <= 10
    rows = quantize(torch.tensor([[1.0, 2.0], [-8.0, 4.0]]), {"element": "e4m3", "block": "row", "amax_target": 4.0})
    assert rows.scales.flatten().tolist() == [0.5, 2.0]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"amax_target": 500.0}, r"amax_target must be in \(0, 448\] \(the 'e4m3' max; 0 means the max\), got 500"),
        ({"amax_target": -1.0}, r"amax_target must be in \(0, 448\]"),
        (
            {"block": (1, 32), "scale_format": "e8m0", "amax_target": 4.0},
            "amax_target applies to symmetric FP32 scales; got scale_format 'e8m0'",
        ),
    ],
)
def test_amax_target_outside_the_format_or_on_other_scales_is_an_error(options, message):
    with pytest.raises(LowbitError, match=message):
        QuantSpec(**{"element": "e4m3", **options})
