"""Composition with Hydra's override grammar, strict keys, type checks and sweeps."""

import pytest
from omegaconf import OmegaConf

from lowbit.config import compose, expand_sweeps, list_recipes
from lowbit.errors import LowbitError


def test_recipe_and_overrides_compose():
    c = compose(
        ["recipe=bf16_llm", "trainer.max_steps=7", "+logger.tags=[ablation]", "~checkpoint.save_best", "posenc=none"]
    )
    assert c.recipe == "bf16_llm" and c.choices["posenc"] == "none"
    assert c.cfg.trainer.max_steps == 7
    assert list(c.cfg.logger.tags) == ["bf16", "llm", "ablation"] or list(c.cfg.logger.tags) == ["ablation"]
    assert "save_best" not in c.cfg.checkpoint
    assert c.cfg.model.max_len == c.cfg.data.seq_len  # interpolation resolves
    assert c.cfg.description.startswith("BF16 baseline")
    assert OmegaConf.is_struct(c.cfg)


def test_add_new_key_with_plus():
    c = compose(["+trainer.detect_anomaly=true"])
    assert c.cfg.trainer.detect_anomaly is True


def test_typo_in_key_is_an_error_naming_valid_keys():
    with pytest.raises(LowbitError) as err:
        compose(["trainer.max_stepz=5"])
    msg = str(err.value)
    assert msg.startswith("unknown config key 'trainer.max_stepz'; valid keys under 'trainer': ")
    assert "max_steps" in msg and "+trainer.max_stepz=VALUE" in msg


def test_a_dict_value_with_a_new_key_names_that_key():
    """model.kwargs={pos_embed: none} merges into an empty dict: the unknown key is the one inside it."""
    with pytest.raises(LowbitError) as err:
        compose(["recipe=timm_nvfp4", "model.kwargs={pos_embed: none}"])
    assert str(err.value) == (
        "unknown config key 'model.kwargs.pos_embed'; valid keys under 'model.kwargs': none "
        "(use +model.kwargs.pos_embed=VALUE to add a new key)"
    )
    assert compose(["recipe=timm_nvfp4", "+model.kwargs.pos_embed=none"]).cfg.model.kwargs == {"pos_embed": "none"}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.max_steps=abc", "trainer.max_steps must be an integer (default 600), got 'abc'"),
        ("model.dim=1.5", "model.dim must be an integer"),
        ("optimizer.lr=fast", "optimizer.lr must be a number"),
        ("model.tie_weights=3", "model.tie_weights must be a boolean"),
        ("optimizer.betas=0.9", "optimizer.betas must be a list"),
    ],
)
def test_wrong_value_type_is_an_error(override, message):
    with pytest.raises(LowbitError, match=message.replace("(", r"\(").replace(")", r"\)")):
        compose([override])


def test_int_is_accepted_for_float():
    assert compose(["optimizer.lr=1"]).cfg.optimizer.lr == 1


def test_unknown_recipe_and_group_option_list_choices():
    with pytest.raises(LowbitError, match=r"unknown recipe 'nvfp5_llm'; valid: .*bf16_llm.* \(lowbit recipes\)"):
        compose(["recipe=nvfp5_llm"])
    with pytest.raises(LowbitError, match=r"unknown precision 'nvfp5'; valid: .*bf16"):
        compose(["precision=nvfp5"])


def test_sweep_without_multirun_is_a_clear_error():
    with pytest.raises(LowbitError, match="Ambiguous value for argument 'seed=1,2'.*--multirun") as err:
        compose(["seed=1,2"])
    assert "\n" not in str(err.value)


def test_expand_sweeps_is_a_cartesian_product():
    jobs = expand_sweeps(["recipe=bf16_llm", "seed=1,2", "model.dim=16,32", "+a=1"])
    assert jobs == [
        ["recipe=bf16_llm", "seed=1", "model.dim=16", "+a=1"],
        ["recipe=bf16_llm", "seed=1", "model.dim=32", "+a=1"],
        ["recipe=bf16_llm", "seed=2", "model.dim=16", "+a=1"],
        ["recipe=bf16_llm", "seed=2", "model.dim=32", "+a=1"],
    ]
    assert expand_sweeps(["seed=range(3)"]) == [["seed=0"], ["seed=1"], ["seed=2"]]


def test_every_recipe_has_a_description():
    rows = list_recipes()
    assert rows and all(desc for _, desc, _ in rows)
