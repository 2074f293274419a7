"""Two gloo processes on CPU: DDP and FSDP2 take the steps one process takes with the whole batch,
sharded checkpoints resume on 2 processes and on 1, and every rank holds the same tensor scales.

Each run is the ``train`` command in a process of its own (``trainproc.run_train``; Lightning launches
the second process by re-running the command); a tiny GPT, 5 steps, losses read from the run's CSV.
Each run is trained once a session, by whichever worker asks first.
"""

import csv
import fcntl
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from trainproc import run_train

from lowbit.distributed import all_reduce_max, all_reduce_mean, world

pytestmark = pytest.mark.timeout(600)

STEPS = 5
COMMON = [
    "debug=smoke",
    "trainer.accelerator=cpu",
    f"trainer.max_steps={STEPS}",
    f"trainer.val_check_interval={STEPS}",
    "+checkpoint.keep_all=true",
    "precision.mode=fp32",
    "logger.wandb=false",
]
NVFP4 = [
    "recipe=nvfp4_llm",
    "precision.backend=emulate",
    "precision.dgrad.dy.rounding=rne",  # SR draws differ per rank by design: off for an exact comparison
    "precision.wgrad.dy.rounding=rne",
    "precision.amax_reduction=global",
]
QAT_LSQ = ["recipe=qat_int8_llm", "precision.activations=static", "precision.lsq=true"]  # learned scales
FP8 = ["recipe=fp8_llm", "precision.backend=emulate", "precision.amax_reduction=global"]
RECIPES = {
    "bf16": ["recipe=bf16_llm"],
    "nvfp4": NVFP4,
    "fp8": FP8,
    "qat": QAT_LSQ,
    "dit": ["recipe=nvfp4_dit", *NVFP4[1:]],
}
LAYOUTS = {  # one global batch of 4 sequences
    "one": ["trainer.devices=1", "data.batch_size=4"],
    "ddp": ["trainer.devices=2", "trainer.strategy=ddp", "data.batch_size=2"],
    "fsdp": ["trainer.devices=2", "trainer.strategy=fsdp", "data.batch_size=2"],
}


def _train(run_dir: Path, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled"}  # warnings as a user sees them (tests assert there are none)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_PORT", "PYTHONWARNINGS"):
        env.pop(name, None)
    return run_train([*args, f"hydra.run.dir={run_dir}"], cwd=run_dir.parent, env=env, timeout=300)


def _column(run_dir: Path, name: str) -> dict[int, float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return {int(r["step"]): float(r[name]) for r in csv.DictReader(f) if r.get(name)}


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "warn" in line.lower()]


def _losses(run_dir: Path) -> dict[int, float]:
    return _column(run_dir, "train/loss")


def _shared_root(tmp_path_factory) -> Path:
    """A folder all of this session's xdist workers see: tests of this module that land on different
    workers need the same runs (a two-process run costs ~20-60 s), and one worker trains each."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "distributed-runs"
    root.mkdir(exist_ok=True)
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``runs(recipe, layout, *extra)`` -> the run directory of a finished run, each run once per session:
    the first worker to ask trains it under a lock on the run's name, another waits and reads it."""
    root = _shared_root(tmp_path_factory)

    def run(recipe: str, layout: str, *extra: str) -> Path:
        key = (recipe, layout, *extra)
        run_dir = root / f"{recipe}-{layout}-{hashlib.sha1(repr(key).encode()).hexdigest()[:10]}"
        if run_dir not in run.stderr:
            stderr = run_dir.with_suffix(".stderr")  # written once the run has finished well
            with open(run_dir.with_suffix(".lock"), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not stderr.exists():
                    shutil.rmtree(run_dir, ignore_errors=True)  # a failed try's leftovers
                    result = _train(run_dir, [*RECIPES[recipe], *COMMON, *LAYOUTS[layout], *extra])
                    assert result.returncode == 0, result.stderr[-3000:]
                    stderr.write_text(result.stderr)
            run.stderr[run_dir] = stderr.read_text()
        return run_dir

    run.stderr = {}  # a run directory's stderr
    return run


# bf16 in -m slow: one more two-process run (~30 s); nvfp4 checks the same layouts, its quantizers included
BF16_DDP = pytest.mark.slow


def _close(a: dict[int, float], b: dict[int, float], rel: float) -> None:
    assert sorted(a) == sorted(b)
    assert max(abs(a[k] - b[k]) / abs(b[k]) for k in a) <= rel, (a, b)


def test_one_process_has_no_world_and_reductions_are_identities():
    assert world() == (0, 1)
    t = torch.tensor([1.5, -2.0])
    assert torch.equal(all_reduce_max(t), t) and torch.equal(all_reduce_mean(t), t)


@pytest.mark.parametrize("recipe", [pytest.param("bf16", marks=BF16_DDP), "nvfp4"])
def test_ddp_two_halves_take_the_steps_of_one_process_with_the_whole_batch(runs, recipe):
    one, ddp = _losses(runs(recipe, "one")), _losses(runs(recipe, "ddp"))
    assert len(one) == STEPS and one[STEPS - 1] < one[0]
    # FP32 compute; the two gradient halves are summed by an all-reduce: another summation order only
    _close(ddp, one, 1e-5)


@pytest.mark.parametrize("recipe", [pytest.param("bf16", marks=BF16_DDP), "nvfp4"])
def test_fsdp2_takes_the_steps_ddp_takes(runs, recipe):
    _close(_losses(runs(recipe, "fsdp")), _losses(runs(recipe, "ddp")), 1e-5)
    assert (runs(recipe, "fsdp") / "checkpoints" / "last.ckpt" / ".metadata").is_file()  # sharded (DCP)
    # both print no warning (torch's distributed checkpoint warned at every save of last.ckpt after the first)
    for layout in ("fsdp", "ddp"):
        assert _warnings(runs.stderr[runs(recipe, layout)]) == []


def test_qat_scales_initialised_in_the_first_forward_survive_fsdp2_and_agree_across_ranks(runs):
    # LSQ weight and activation scales are set from the first batch inside the forward: under FSDP2 that
    # forward holds an all-gathered copy (lowbit.distributed.set_parameter writes the shards too), and
    # the activation scale comes from both ranks' halves (the min/max the whole batch has)
    # (DDP holds whole copies: its forward writes the parameters themselves, as one process does)
    one = _losses(runs("qat", "one"))
    _close(_losses(runs("qat", "fsdp")), one, 2e-5)  # INT8 rounding turns summation-order noise into ~1e-5


def test_a_sharded_checkpoint_resumes_on_two_processes_and_on_one(runs):
    full = _losses(runs("bf16", "fsdp"))
    step3 = runs("bf16", "fsdp") / "checkpoints" / "step-3.ckpt"
    assert (step3 / ".metadata").is_file()
    on_two = _losses(runs("bf16", "fsdp", f"resume={step3}"))
    on_one = _losses(runs("bf16", "one", f"resume={step3}"))
    assert sorted(on_two) == sorted(on_one) == [3, 4]
    _close(on_two, {k: full[k] for k in on_two}, 1e-6)
    _close(on_one, {k: full[k] for k in on_one}, 1e-5)


def test_a_one_file_checkpoint_resumes_under_fsdp2(runs):
    full = _losses(runs("bf16", "one"))
    step3 = runs("bf16", "one") / "checkpoints" / "step-3.ckpt"
    on_two = _losses(runs("bf16", "fsdp", f"resume={step3}"))
    _close(on_two, {k: full[k] for k in on_two}, 1e-5)


# fp8 in -m slow (40 s): its per-tensor codes are checked bit for bit in tests/framework/quant/test_gather.py
@pytest.mark.parametrize("recipe", [pytest.param("fp8", marks=pytest.mark.slow), "nvfp4"])
def test_quantized_all_gather_takes_the_same_steps_and_sends_fewer_bytes(runs, recipe):
    quantized, plain = runs(recipe, "fsdp"), runs(recipe, "fsdp", "precision.quantized_all_gather=false")
    _close(_losses(quantized), _losses(plain), 1e-6)  # the same quantized weight either way
    sent, full = _column(quantized, "comm/all_gather_mb"), _column(plain, "comm/all_gather_mb")
    assert sorted(sent) == sorted(full) == list(range(STEPS))
    # the gathered linear weights: FP8 1 byte an element, NVFP4 ~0.52, against FP32's 4; embeddings, norms
    # and the layers kept in high precision are still sent in FP32
    ratios = [sent[k] / full[k] for k in range(STEPS)]
    assert max(ratios) < (0.45 if recipe == "fp8" else 0.35), (ratios, sent, full)
    rs = _column(quantized, "comm/reduce_scatter_mb")
    assert rs == _column(plain, "comm/reduce_scatter_mb")  # gradients reduce-scatter in FP32 either way


def test_a_dit_and_its_ema_shard_under_fsdp2(runs):
    # the EMA keeps one average per parameter: under FSDP2 each rank averages its own shard
    # (EMA.shard_like); validation swaps the averages in, so val/loss checks them
    fsdp, ddp = runs("dit", "fsdp"), runs("dit", "ddp")
    _close(_losses(fsdp), _losses(ddp), 1e-5)
    _close(_column(fsdp, "val/loss"), _column(ddp, "val/loss"), 1e-5)
    # the sample grid's evaluations and FID, the same on every rank, are logged as synced values: Lightning
    # warned "It is recommended to use `self.log(..., sync_dist=True)`" in every two-process DiT run
    for run_dir in (fsdp, ddp):
        assert _warnings(runs.stderr[run_dir]) == [], runs.stderr[run_dir][-2000:]


def test_a_sharded_checkpoint_of_another_model_is_refused_in_one_line_before_any_step(runs, tmp_path):
    layout = "fsdp"
    step3 = runs("bf16", "fsdp") / "checkpoints" / "step-3.ckpt"
    run_dir = tmp_path / f"wider-{layout}"
    result = _train(run_dir, [*RECIPES["bf16"], *COMMON, *LAYOUTS[layout], "model.dim=48", f"resume={step3}"])
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "the checkpoint's model differs from this run's" in line and "48" in line, line
    assert not (run_dir / "csv" / "metrics.csv").exists()  # not one step trained
