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

The CPU's instruction set moves them too: MKL's FP32 GEMM kernels sum in another order on AVX-512
with AMX than on the machine the first losses came from (~1e-7), and a quantized recipe turns that
into a rounding flip (fp8_llm 2e-4 apart after 20 steps; BF16 recipes stay within 1e-6). So the
JSON holds one set of losses per machine kind (``_machine()``: torch's CPU capability and AMX); a run
compares with its own kind's losses where they hold the recipe, else with every kind's (it must
match one). Regenerating a recipe drops the other kinds' losses of it: they described the old code.

After a change that moves numbers on purpose, regenerate (each recipe trains twice and its losses are
written only when both runs agree bit for bit; ``-k NAME`` regenerates one recipe) and review the diff:

    .venv/bin/pytest tests/recipes/test_golden_losses.py --update-golden

On a machine kind the JSON lacks, with the code unchanged: ``--add-golden-machine`` instead.
"""

import json
import math
import platform
import sys
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


def _machine() -> str:
    """The machine kind whose GEMMs sum alike: torch's CPU capability (``AVX512``, ``AVX2``), ``+AMX``
    where the CPU has AMX tiles (MKL takes other kernels there)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    amx = "+AMX" if " amx_tile" in flags else ""
    return f"{platform.machine()}-{torch.backends.cpu.get_cpu_capability()}{amx}"


def _load() -> dict:
    if not GOLDEN.exists():
        return {"machines": {}}
    return json.loads(GOLDEN.read_text())


def _save(golden: dict) -> None:
    GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")  # floats as repr: exact


def _store(golden: dict, recipe: str, losses: list[float], mode: str) -> None:
    """This machine kind's losses of ``recipe``; ``replace`` drops the other kinds' (the code that made
    them moved), ``add`` keeps them (the same code on another instruction set)."""
    for kind in golden["machines"].values() if mode == "replace" else ():
        kind["losses"].pop(recipe, None)
    mine = golden["machines"].setdefault(_machine(), {"losses": {}})
    mine["environment"] = _environment()
    mine["losses"][recipe] = losses
    golden["machines"] = {name: kind for name, kind in golden["machines"].items() if kind["losses"]}


def _references(golden: dict, recipe: str) -> dict[str, list[float]]:
    """The stored losses ``recipe``'s run must match: this machine kind's, else every kind's."""
    kinds = {name: kind["losses"][recipe] for name, kind in golden["machines"].items() if recipe in kind["losses"]}
    return {_machine(): kinds[_machine()]} if _machine() in kinds else kinds


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
        _store(golden, recipe, losses, update_golden)
        _save(golden)
        return
    references = _references(_load(), recipe)
    assert references, f"{GOLDEN.name} has no golden losses for recipe '{recipe}'; generate them with: {UPDATE_COMMAND}"
    matched = [kind for kind, golden in references.items() if losses == pytest.approx(golden, rel=RELATIVE_TOLERANCE)]
    kind, closest = next(iter(references.items()))
    assert matched or losses == pytest.approx(closest, rel=RELATIVE_TOLERANCE), (
        f"{recipe}: the training losses moved from {GOLDEN.name} (machine kinds {sorted(references)}; this run "
        f"{_machine()}, {_environment()}); if the change is meant to move them, regenerate with: {UPDATE_COMMAND}"
    )


def test_golden_file_names_only_builtin_recipes(update_golden):
    golden = _load()
    stale = sorted({recipe for kind in golden["machines"].values() for recipe in kind["losses"]} - set(RECIPES))
    if update_golden and stale:
        for kind in golden["machines"].values():
            for recipe in stale:
                kind["losses"].pop(recipe, None)
        _save(golden)
        return
    assert not stale, (
        f"{GOLDEN.name} holds losses of recipes that no longer exist: {stale}; remove them with: {UPDATE_COMMAND}"
    )


def test_a_run_compares_with_its_machine_kinds_losses_else_with_every_kinds(monkeypatch):
    golden = {"machines": {"a": {"losses": {"r": [1.0], "s": [2.0]}}, "b": {"losses": {"r": [1.5]}}}}
    monkeypatch.setattr(sys.modules[__name__], "_machine", lambda: "b")
    assert _references(golden, "r") == {"b": [1.5]}
    assert _references(golden, "s") == {"a": [2.0]}  # b lacks it: a's
    monkeypatch.setattr(sys.modules[__name__], "_machine", lambda: "c")
    assert _references(golden, "r") == {"a": [1.0], "b": [1.5]}
    _store(golden, "s", [3.0], "add")
    assert golden["machines"]["a"]["losses"]["s"] == [2.0] and golden["machines"]["c"]["losses"]["s"] == [3.0]
    _store(golden, "r", [4.0], "replace")  # the code moved: only this kind's losses of r remain
    assert [kind for kind, v in golden["machines"].items() if "r" in v["losses"]] == ["c"]
