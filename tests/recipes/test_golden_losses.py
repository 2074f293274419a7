"""Golden losses: every built-in recipe trains 20 CPU steps to the losses stored in golden_losses.json.

A refactor that moves a number anywhere on a recipe's path (data stream, initialisation, model,
precision plugin, task loss, optimizer, schedule, gradient clipping) fails here. Every recipe of
``lowbit.recipes`` (from ``list_recipes``: a new recipe fails until its losses are stored) trains
with ``debug=smoke`` for exactly 20 optimizer steps, seeded as ``lowbit.run.train`` seeds a run, with
no validation, checkpoints or loggers; its 20 training losses must match the stored ones to rel=1e-6.

Pinned, so that the numbers follow the code rather than the machine: ``precision.mode=fp32`` (``auto``
is BF16 autocast on CPUs with native BF16, FP32 elsewhere: losses ~1e-2 apart after 20 steps) and one
torch thread (the CPU GEMMs' summation order depends on the thread count: ~1e-7 apart). Other
versions of torch or Python (the stdlib is the LLM recipes' corpus) can still move them; the JSON
records the versions it was generated with.

After a change that moves numbers on purpose, regenerate (each recipe trains twice and its losses are
written only when both runs agree bit for bit; ``-k NAME`` regenerates one recipe) and review the diff:

    .venv/bin/pytest tests/recipes/test_golden_losses.py --update-golden
"""

import json
import math
import platform
from pathlib import Path

import lightning as L
import pytest
import torch

from lowbit.callbacks.rounding import SeedStochasticRounding
from lowbit.config import compose, list_recipes
from lowbit.run import build

GOLDEN = Path(__file__).with_name("golden_losses.json")
UPDATE_COMMAND = ".venv/bin/pytest tests/recipes/test_golden_losses.py --update-golden"
STEPS = 20
RELATIVE_TOLERANCE = 1e-6
RECIPES = [name for name, _, package in list_recipes() if package == "lowbit.recipes"]
OVERRIDES = [
    "debug=smoke",
    f"trainer.max_steps={STEPS}",  # also the length of the cosine schedule the task is built with
    "trainer.accelerator=cpu",
    "precision.mode=fp32",
]


class _Losses(L.Callback):
    """The training loss of every step, as a Python float."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _train(recipe: str, root: Path) -> list[float]:
    """The losses of ``STEPS`` training steps of ``recipe`` (with ``OVERRIDES``) on the CPU."""
    cfg = compose([f"recipe={recipe}", *OVERRIDES]).cfg
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)  # as lowbit.run.train, before build
    built = build(cfg)
    recorder = _Losses()
    kwargs = {k: v for k, v in built.trainer_kwargs.items() if k not in ("val_check_interval", "limit_val_batches")}
    trainer = L.Trainer(
        **kwargs,
        plugins=[built.precision],
        # train's stochastic-rounding seeds, (seed, step) per layer; not its QuantHealth, whose recording
        # steps quantize with torch's global generator and so move the losses of diffusion recipes
        callbacks=[SeedStochasticRounding(int(cfg.seed)), recorder],
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        max_epochs=-1,
        default_root_dir=str(root),
    )
    trainer.fit(built.task, datamodule=built.data)
    assert trainer.global_step == STEPS and len(recorder.losses) == STEPS, (trainer.global_step, len(recorder.losses))
    return recorder.losses


def _environment() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__, "lightning": L.__version__}


def _load() -> dict:
    if not GOLDEN.exists():
        return {"environment": {}, "losses": {}}
    return json.loads(GOLDEN.read_text())


def _save(golden: dict) -> None:
    golden["environment"] = _environment()
    GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")  # floats as repr: exact


@pytest.fixture
def pinned(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """One torch thread; the stdlib-corpus and torch.compile caches in pytest's temporary directory."""
    caches = tmp_path_factory.getbasetemp() / "golden_caches"  # shared by this session's recipes
    monkeypatch.setenv("LOWBIT_CACHE", str(caches / "lowbit"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(caches / "inductor"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_trains_to_its_golden_losses(recipe, tmp_path, pinned, update_golden):
    losses = _train(recipe, tmp_path)
    assert all(math.isfinite(x) for x in losses), f"{recipe}: non-finite training loss {losses}"
    if update_golden:
        again = _train(recipe, tmp_path)
        differ = [step for step, (a, b) in enumerate(zip(losses, again)) if a != b]
        assert not differ, (
            f"{recipe} is not deterministic: a second run differs from step {differ[0]} "
            f"({losses[differ[0]]!r} vs {again[differ[0]]!r}); its golden losses were not written"
        )
        golden = _load()
        golden["losses"][recipe] = losses
        _save(golden)
        return
    golden = _load()
    assert recipe in golden["losses"], (
        f"{GOLDEN.name} has no golden losses for recipe '{recipe}'; generate them with: {UPDATE_COMMAND}"
    )
    assert losses == pytest.approx(golden["losses"][recipe], rel=RELATIVE_TOLERANCE), (
        f"{recipe}: the training losses moved from {GOLDEN.name} (generated with {golden['environment']}, "
        f"this run {_environment()}); if the change is meant to move them, regenerate with: {UPDATE_COMMAND}"
    )


def test_golden_file_names_only_builtin_recipes(update_golden):
    golden = _load()
    stale = sorted(set(golden["losses"]) - set(RECIPES))
    if update_golden and stale:
        for recipe in stale:
            del golden["losses"][recipe]
        _save(golden)
        return
    assert not stale, (
        f"{GOLDEN.name} holds losses of recipes that no longer exist: {stale}; remove them with: {UPDATE_COMMAND}"
    )
