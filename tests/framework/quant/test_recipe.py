"""GemmRecipe: YAML in, specs per operand out, block multiples per dim, clear errors."""

import pytest

from lowbit.errors import LowbitError
from lowbit.numerics import get_spec
from lowbit.quant import GemmRecipe


def test_operands_take_presets_mappings_and_null():
    r = GemmRecipe.from_dict(
        {
            "fprop": {"x": "nvfp4", "w": {"preset": "nvfp4_2d"}},
            "dgrad": {"dy": {"preset": "nvfp4", "rounding": "sr"}, "w": None},
            "wgrad": {"dy": "none", "x": "mxfp4", "rht": 32, "rht_seed": 5},
        }
    )
    assert r.spec_of("fprop.x") == get_spec("nvfp4")
    assert r.spec_of("fprop.w") == get_spec("nvfp4_2d")
    assert r.spec_of("dgrad.dy") == get_spec("nvfp4").replace(rounding="sr")
    assert r.spec_of("dgrad.w") is None and r.spec_of("wgrad.dy") is None
    # the GEMM's RHT is folded into each of its operand specs
    assert r.spec_of("wgrad.x") == get_spec("mxfp4").replace(rht_size=32, rht_seed=5)
    assert r.quantized and not GemmRecipe.from_dict({}).quantized


def test_rht_is_one_field_the_size_and_round_trips_through_dicts():
    r = GemmRecipe.from_dict({"wgrad": {"dy": "nvfp4", "x": "nvfp4", "rht": 16}})
    assert r.wgrad.rht == 16 and r.to_dict()["wgrad"]["rht"] == 16 and "rht_size" not in r.to_dict()["wgrad"]
    assert GemmRecipe.from_dict(r.to_dict()) == r
    assert GemmRecipe.from_dict({"wgrad": {"dy": "nvfp4", "rht": False}}).wgrad.rht == 0
    for bad in (True, 24, -16, 1):
        with pytest.raises(LowbitError, match=r"precision.wgrad.rht is the random Hadamard transform's size"):
            GemmRecipe.from_dict({"wgrad": {"dy": "nvfp4", "rht": bad}})
    with pytest.raises(LowbitError, match="precision.wgrad has no key 'rht_size'; valid: dy, x, rht, rht_seed"):
        GemmRecipe.from_dict({"wgrad": {"dy": "nvfp4", "rht": 16, "rht_size": 16}})


def test_multiples_follow_the_contraction_dims():
    r = GemmRecipe.from_dict(
        {
            "fprop": {"x": "nvfp4", "w": "nvfp4_2d"},  # in: 16; out: 16 (2-D weight rows)
            "dgrad": {"dy": "mxfp4", "w": "nvfp4_2d"},  # out: 32 (dy blocks along out)
            "wgrad": {"dy": "nvfp4", "x": "nvfp4", "rht": 64},  # tokens: 64 (RHT size)
        }
    )
    assert r.multiples() == {"in": 16, "out": 32, "tokens": 64}
    fp8 = GemmRecipe.from_dict({"fprop": {"x": "fp8_e4m3_tensor", "w": "fp8_e4m3_row"}})
    assert fp8.multiples() == {"in": 1, "out": 1, "tokens": 1}


@pytest.mark.parametrize(
    "d,message",
    [
        ({"fwd": {}}, "a GEMM recipe has no GEMM 'fwd'; valid: fprop, dgrad, wgrad"),
        ({"fprop": {"dy": "nvfp4"}}, "precision.fprop has no key 'dy'; valid: x, w, rht, rht_seed"),
        ({"wgrad": {"x": "nvfp4", "rht": 12}}, "precision.wgrad.rht is the random Hadamard transform.s size"),
        ({"fprop": {"x": "nvfp5"}}, "precision.fprop.x: unknown quantization preset 'nvfp5'"),
    ],
)
def test_bad_recipes_are_clear_errors(d, message):
    with pytest.raises(LowbitError, match=message.replace("(", r"\(").replace(")", r"\)")):
        GemmRecipe.from_dict(d)


def test_unknown_operand_name():
    with pytest.raises(LowbitError, match="unknown GEMM operand 'fprop.dy'; valid: fprop.x, fprop.w"):
        GemmRecipe().spec_of("fprop.dy")
