"""``trainproc.run_train``, the forked ``train`` the CLI tests use, is the console script as a shell runs it:
the same output and exit code, the request's working directory and environment, and no run left behind."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from trainproc import run_train


def _env(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}, "WANDB_MODE": "disabled", **extra}


def test_a_refused_argument_reads_as_from_the_console_script(tmp_path):
    args = ["recipe=bf16_llm", "trainer.max_stepz=3"]
    train = Path(sys.executable).with_name("train")
    shell = subprocess.run([str(train), *args], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    forked = run_train(args, cwd=tmp_path, env=_env())
    assert (forked.returncode, forked.stdout, forked.stderr) == (shell.returncode, shell.stdout, shell.stderr)
    assert forked.returncode == 2 and forked.stderr.startswith("error: unknown config key 'trainer.max_stepz'")
    assert list(tmp_path.iterdir()) == []


def test_a_run_takes_the_requested_directory_and_environment(tmp_path):
    run_dir = tmp_path / "run"
    env = _env(LOWBIT_CACHE=str(tmp_path / "cache"))
    done = run_train(["debug=smoke", "trainer.max_steps=1", f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (tmp_path / "cache").is_dir()


def test_a_run_past_its_timeout_is_killed_and_the_next_one_runs(tmp_path):
    with pytest.raises(subprocess.TimeoutExpired):
        run_train(
            ["debug=smoke", "trainer.max_steps=100000", f"hydra.run.dir={tmp_path / 'long'}"],
            cwd=tmp_path,
            env=_env(),
            timeout=3,
        )
    again = run_train(["recipe=bf16_llm", "trainer.max_steps=0"], cwd=tmp_path, env=_env())
    assert again.returncode == 2 and "trainer.max_steps must be an integer of at least 1" in again.stderr
