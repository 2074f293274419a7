"""Run directories and preemption, as a user and a scheduler meet them (processes, real signals):
nothing of an earlier run is lost or changed, a preempted run resumes in place bit for bit, a live
run's directory is refused, a stale lock is taken over. The runs that get a signal, and the printed
resume command, start as a shell starts them; the others are forked by ``trainproc.run_train``."""

from __future__ import annotations

import csv
import hashlib
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from trainproc import run_train

BIN = Path(sys.executable).parent
TINY = ["debug=smoke", "posenc=none", "logger=csv", "trainer.val_check_interval=7", "checkpoint.every_n_steps=5"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    return {**env, "WANDB_MODE": "disabled"}


def _train(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return run_train(args, cwd=cwd, env=_env())


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def _curves(run_dir: Path) -> tuple[dict[int, float], dict[int, float]]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    train = [(int(r["step"]), float(r["train/loss"])) for r in rows if r.get("train/loss")]
    val = [(int(r["step"]), float(r["val/loss"])) for r in rows if r.get("val/loss")]
    assert len({s for s, _ in train}) == len(train) and len({s for s, _ in val}) == len(val)  # each step once
    return dict(train), dict(val)


def test_a_second_run_into_a_run_directory_is_refused_and_changes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    assert _train([*TINY, "trainer.max_steps=5", f"hydra.run.dir={run_dir}"], tmp_path).returncode == 0
    before = _hashes(run_dir)
    result = _train([*TINY, "trainer.max_steps=7", "seed=2", f"hydra.run.dir={run_dir}"], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr == (
        f"error: {run_dir} already holds a run (config.yaml, checkpoints, csv); continue it with resume={run_dir}, "
        "or choose another hydra.run.dir\n"
    )
    assert _hashes(run_dir) == before


# nvfp4 (32 s) in -m slow: the default run checks its resume exactness in tests/framework/test_run.py
@pytest.mark.parametrize("precision", ["bf16", pytest.param("nvfp4", marks=pytest.mark.slow)])
def test_sigterm_at_a_random_step_then_resume_in_place_is_bit_exact(tmp_path, precision):
    steps, at = 24, random.Random(precision).randrange(3, 20)
    args = [*TINY, f"precision={precision}", f"trainer.max_steps={steps}", "trainer.enable_progress_bar=true"]
    run_dir = tmp_path / "a run"  # a space: the printed resume command must be quoted
    proc = subprocess.Popen(
        [str(BIN / "train"), *args, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    for line in proc.stdout:  # LineProgress: "step k/24 ..." after every step, the output being a pipe
        lines.append(line)
        if line.startswith("step ") and int(line.split()[1].split("/")[0]) >= at:
            proc.send_signal(signal.SIGTERM)
            break
    lines += proc.stdout.readlines()
    assert proc.wait(timeout=300) == 143, "".join(lines)
    command = next(line for line in lines if line.startswith("resume with: ")).removeprefix("resume with: ").strip()
    before = _hashes(run_dir / "checkpoints")
    resumed = subprocess.run(
        ["bash", "-c", f'PATH="{BIN}:$PATH" {command}'], cwd=tmp_path, env=_env(), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert before  # the preempted run left its checkpoints
    full_dir = tmp_path / "full"
    assert _train([*args, f"hydra.run.dir={full_dir}"], tmp_path).returncode == 0
    (train, val), (full_train, full_val) = _curves(run_dir), _curves(full_dir)
    assert sorted(train) == list(range(steps)) and train == full_train
    assert val == full_val and sorted(val) == [6, 13, 20, 24]  # validation at the same steps, same values


def test_ctrl_c_saves_and_exits_130(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [
            str(BIN / "train"),
            *TINY,
            "trainer.max_steps=5000",
            "trainer.enable_progress_bar=true",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in proc.stdout:
        if line.startswith("step 3/"):
            proc.send_signal(signal.SIGINT)
            break
    out = proc.stdout.read()
    assert proc.wait(timeout=300) == 130, out
    assert "SIGINT: saving a checkpoint after this step, then stopping" in out and "Traceback" not in out
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_live_lock_is_refused_and_a_stale_one_taken_over(tmp_path):
    import json
    import socket

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = run_dir / ".lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "2026-12-04T10:00:00"}))
    result = _train([*TINY, "trainer.max_steps=2", f"hydra.run.dir={run_dir}"], tmp_path)
    assert result.returncode == 2 and result.stderr == (
        f"error: {run_dir} is in use by PID {os.getpid()} on {socket.gethostname()} (since 2026-12-04T10:00:00); "
        f"wait for it to finish, or delete {lock} if that process is gone\n"
    )
    assert not (run_dir / "config.yaml").exists()
    pid = _dead_pid()
    lock.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "2026-12-04T10:00:00"}))
    result = _train([*TINY, "trainer.max_steps=2", f"hydra.run.dir={run_dir}"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert (
        f"notice: taking over the stale lock of {run_dir} (PID {pid} on {socket.gethostname()} is gone)"
        in result.stdout
    )
    assert not lock.exists() and (run_dir / "checkpoints" / "last.ckpt").is_file()
