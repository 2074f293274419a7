"""Every recipe composes, instantiates, and trains a few CPU steps (lightning-hydra-template style)."""

import pytest

from lowbit.config import compose, list_recipes
from lowbit.run import build, train

RECIPES = [name for name, _, package in list_recipes() if package == "lowbit.recipes"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes_and_instantiates(recipe):
    composed = compose([f"recipe={recipe}"])
    built = build(composed.cfg)
    assert composed.recipe == recipe and composed.cfg.description
    assert sum(p.numel() for p in built.task.parameters()) > 0


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_smoke_runs_on_cpu(recipe, tmp_path):
    result = train(compose([f"recipe={recipe}", "debug=smoke", f"run_dir={tmp_path}"]), echo=lambda *_: None)
    loss = result.metrics["val/loss"]
    assert 0 < loss < 10
