"""Every recipe composes, instantiates, and trains a few CPU steps (lightning-hydra-template style)."""

import math

import pytest

from lowbit.config import compose, list_recipes
from lowbit.run import build, train

RECIPES = [name for name, _, package in list_recipes() if package == "lowbit.recipes"]
LANGUAGE_TASKS = {"lm", "deq_lm"}  # lowbit.tasks plugin names
CLASSIFIER_TASKS = {"classify", "deq_classify"}
DIFFUSION_TASKS = {"diffusion"}


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes_and_instantiates(recipe):
    composed = compose([f"recipe={recipe}"])
    built = build(composed.cfg)
    assert composed.recipe == recipe and composed.cfg.description
    assert sum(p.numel() for p in built.task.parameters()) > 0


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_smoke_runs_on_cpu(recipe, tmp_path):
    composed = compose([f"recipe={recipe}", "debug=smoke", f"hydra.run.dir={tmp_path}"])
    result = train(composed, echo=lambda *_: None)
    loss = result.metrics["val/loss"]
    assert 0 < loss < 10
    # 3 steps from a fresh model leave the loss near chance, by an amount each task family bounds (on this seed,
    # BF16 or FP32 alike: LMs 5.23-5.36, classifiers 2.24-2.31, diffusion 0.968-0.979)
    task = composed.cfg.task.name
    if task in LANGUAGE_TASKS:
        # chance is ln 256 = 5.545 nats per byte; 3 AdamW steps lower it by 0.19-0.32
        assert math.log(256) - 0.5 < loss < math.log(256) - 0.1
        assert result.metrics["val/bpb"] == pytest.approx(loss / math.log(2), rel=1e-6)  # the same mean, in bits
        assert result.metrics["val/ppl"] == pytest.approx(math.exp(loss), rel=1e-5)
    elif task in CLASSIFIER_TASKS:
        # chance is ln(classes): a fresh head's logits are near zero, and 3 steps move them little
        assert loss == pytest.approx(math.log(composed.cfg.task.num_classes), abs=0.15)
    elif task in DIFFUSION_TASKS:
        # the ε-prediction MSE: adaLN-Zero starts at ε̂ = 0, so the loss is E ε² = 1 up to 3 steps and val noise
        assert loss == pytest.approx(1.0, abs=0.06)
    else:
        raise AssertionError(f"recipe {recipe}: no expected smoke loss for task {task}; add its family above")
