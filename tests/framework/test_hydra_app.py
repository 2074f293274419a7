"""``train`` as a Hydra application, run as a user types it (a process each, forked by
``trainproc.run_train`` with its imports done; the default run's, which must print no warning,
started as a shell starts it): Hydra's flags, output directories and ``.hydra/``, sweeps with the
basic, joblib and submitit launchers and the Optuna sweeper, one W&B run per job with its name,
group and tags, resume continuing the W&B run, and a default run that prints no warning."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from trainproc import run_train

from lowbit.experiment import experiment_name, read_config, wandb_run_record

BIN = Path(sys.executable).parent
TINY = ["debug=smoke", "posenc=none", "trainer.max_steps=2", "checkpoint.every_n_steps=2"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "WANDB_MODE", "WANDB_SILENT")}
    return {**env, "WANDB_MODE": "offline"}


def _train(args: list[str], cwd: Path, *, console: bool = False) -> subprocess.CompletedProcess:
    """``train *args``; ``console``: the console script itself (a fresh interpreter: its imports' output too)."""
    if console:
        cmd = [str(BIN / "train"), *args]
        result = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    else:
        result = run_train(args, cwd=cwd, env=_env())
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _wandb_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def test_cfg_job_and_resolve_print_the_config(tmp_path):
    out = _train(["--cfg", "job", "recipe=bf16_llm", "trainer.max_steps=111"], tmp_path).stdout
    cfg = yaml.safe_load(out)
    assert cfg["trainer"]["max_steps"] == 111 and cfg["model"]["max_len"] == "${data.seq_len}"
    resolved = yaml.safe_load(_train(["--cfg", "job", "--resolve", "recipe=bf16_llm"], tmp_path).stdout)
    assert resolved["model"]["max_len"] == resolved["data"]["seq_len"] == 128
    assert resolved["name"] == "bf16_llm-bf16-1337"
    hydra = yaml.safe_load(_train(["--cfg", "hydra", "hydra.run.dir=/x/y"], tmp_path).stdout)
    assert hydra["hydra"]["run"]["dir"] == "/x/y"
    assert not (tmp_path / "runs").exists()  # printing a config creates nothing


def test_info_and_config_dir_flags(tmp_path):
    info = _train(["--info", "searchpath"], tmp_path).stdout
    assert "pkg://lowbit.recipes" in info and "lowbit://plugins" in info
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "mine.yaml").write_text("defaults:\n  - config\n  - _self_\nseed: 7\n")
    out = _train(["-cd", str(conf), "-cn", "mine", "--cfg", "job"], tmp_path).stdout
    assert yaml.safe_load(out)["seed"] == 7


def test_a_run_writes_where_hydra_says_with_hydra_files(tmp_path):
    run_dir = tmp_path / "my run"
    _train([*TINY, "seed=3", f"hydra.run.dir={run_dir}"], tmp_path)
    assert yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) == [*TINY, "seed=3"]
    assert yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())["seed"] == 3
    assert yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]["name"] == "train"
    assert read_config(run_dir)["name"] == "gpt-bf16-3"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "train.log").is_file()
    assert not (tmp_path / "runs").exists()


def test_default_run_dir_names_recipe_precision_and_seed(tmp_path):
    _train(["recipe=bf16_llm", "precision=nvfp4", *TINY], tmp_path)
    (run_dir,) = (tmp_path / "runs" / "bf16_llm-nvfp4-1337").iterdir()
    assert read_config(run_dir)["precision"]["name"] == "nvfp4"


def _sweep_jobs(sweep: Path) -> list[Path]:
    return sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))


# the joblib and submitit launchers and the optuna sweeper: off the default run (-m slow), ~45 s
@pytest.mark.parametrize("launcher", ["basic", pytest.param("joblib", marks=pytest.mark.slow)])
def test_multirun_logs_one_wandb_run_per_job(tmp_path, launcher):
    sweep = tmp_path / "sweep"
    extra = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"] if launcher == "joblib" else []
    _train(
        [
            "-m",
            "recipe=bf16_llm",
            *TINY,
            "logger.wandb=true",
            "precision=bf16,nvfp4",
            f"hydra.sweep.dir={sweep}",
            *extra,
        ],
        tmp_path,
    )
    jobs = _sweep_jobs(sweep)
    assert [p.name for p in jobs] == ["0-bf16_llm-bf16-1337", "1-bf16_llm-nvfp4-1337"]
    records = []
    for job in jobs:
        (wandb_dir,) = _wandb_runs(job)  # one W&B run per job, in the job's own folder
        records.append(wandb_run_record(wandb_dir))
    assert [r["name"] for r in records] == ["bf16_llm-bf16-1337", "bf16_llm-nvfp4-1337"]
    group = experiment_name(read_config(jobs[0]))
    assert [r["group"] for r in records] == [group, group]  # same model, data and budget: one group
    assert records[0]["tags"] == ["bf16_llm", "bf16", "gpt", "stdlib", "lm", "none"]
    assert records[1]["tags"] == ["bf16_llm", "nvfp4", "gpt", "stdlib", "lm", "none"]
    assert records[0]["id"] != records[1]["id"]
    assert all((_wandb_runs(job)[0] / "files" / "wandb-summary.json").is_file() for job in jobs)  # finished
    if launcher == "basic":  # the NVFP4 job found the BF16 job of its sweep as its baseline
        assert "compare/gap_to_bf16" in (jobs[1] / "csv" / "metrics.csv").read_text()
        _compare_the_two_runs(jobs, tmp_path)


def _compare_the_two_runs(jobs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "compare"
    result = subprocess.run(
        [str(BIN / "lowbit"), "compare", *map(str, jobs), "--out", str(out)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("|")]
    assert len(rows) == 4 and "bf16" in rows[2] and "nvfp4" in rows[3]  # header, rule, one row per run
    for png in ("loss.png", "gap.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "compare.md").read_text().strip().splitlines()[2:] == rows[2:]


@pytest.mark.slow
def test_submitit_local_launcher_runs_each_job(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    _train(["-m", *TINY, "seed=1,2", "hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep}"], tmp_path)
    jobs = _sweep_jobs(sweep)
    assert [p.name for p in jobs] == ["0-gpt-bf16-1", "1-gpt-bf16-2"]
    assert all((job / "checkpoints" / "last.ckpt").is_file() for job in jobs)


@pytest.mark.slow
def test_optuna_sweeps_the_learning_rate(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "sweep"
    _train(
        [
            "-m",
            "debug=smoke",
            "posenc=none",
            "hydra/sweeper=optuna",
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.sampler.seed=0",
            "optimizer.lr=interval(1e-4,1e-2)",
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
    )
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    jobs = _sweep_jobs(sweep)
    assert len(jobs) == 2
    lrs = [read_config(job)["optimizer"]["lr"] for job in jobs]
    assert lrs[0] != lrs[1] and all(1e-4 <= lr <= 1e-2 for lr in lrs)
    assert result["best_params"]["optimizer.lr"] in lrs and result["best_value"] > 0


def test_resume_continues_the_wandb_run(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    _train([*TINY, "logger.wandb=true", f"hydra.run.dir={first}"], tmp_path)
    _train([*TINY, "logger.wandb=true", "trainer.max_steps=4", f"resume={first}", f"hydra.run.dir={second}"], tmp_path)
    (a,), (b,) = _wandb_runs(first), _wandb_runs(second)
    assert wandb_run_record(a)["id"] == wandb_run_record(b)["id"]


def test_a_default_run_prints_no_warning(tmp_path):
    result = _train(
        [
            "recipe=nvfp4_llm",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "data.seq_len=32",
            "model.n_layers=2",
        ],
        tmp_path,
        console=True,
    )
    lines = (result.stdout + result.stderr).splitlines()
    noisy = [line for line in lines if any(w in line.lower() for w in ("warn", "tip:", "deprecat"))]
    assert noisy == [], noisy
    assert "\r" not in result.stdout + result.stderr  # no progress-bar updates into a pipe
    assert any(line.startswith("step 2/2") for line in lines)  # the line-per-interval progress log
