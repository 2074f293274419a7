"""Experiment fingerprints ignore precision, seed and presentation and nothing else; a baseline
is a finished BF16 run of the same fingerprint, the same seed first, else the newest; runs are
read back with their final loss, throughput and worst quantization health."""

import copy
import csv
import hashlib
import json
import math
import os
from pathlib import Path

import pytest
import yaml

from lowbit.errors import LowbitError
from lowbit.experiment import (
    baseline_roots,
    describe_run,
    experiment_name,
    find_baseline,
    fingerprint,
    load_run,
    read_config,
)

# The resolved config of `train recipe=nvfp4_llm debug=smoke` (precision shortened).
CFG = {
    "trainer": {
        "accelerator": "auto",
        "devices": 1,
        "max_steps": 3,
        "val_check_interval": 3,
        "limit_val_batches": None,
        "log_every_n_steps": 1,
        "gradient_clip_val": 1.0,
        "accumulate_grad_batches": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    },
    "model": {"name": "gpt", "vocab_size": 256, "dim": 32, "n_layers": 2, "n_heads": 2, "max_len": 32},
    "posenc": {"name": "rope", "theta": 10000.0},
    "data": {"name": "stdlib", "seq_len": 32, "batch_size": 4, "val_windows": 8, "cache_dir": None, "num_workers": 0},
    "task": {"_target_": "lowbit.tasks.lm.CausalLM"},
    "optimizer": {"name": "adamw", "lr": 0.003, "weight_decay": 0.1, "betas": [0.9, 0.95]},
    "scheduler": {"warmup_steps": 1, "min_lr_ratio": 0.1},
    "precision": {"name": "nvfp4", "keep": ["lm_head"]},
    "logger": {"wandb": False, "project": "lowbit", "group": None, "tags": ["nvfp4", "llm"]},
    "description": "NVFP4",
    "seed": 1337,
    "name": "nvfp4_llm-nvfp4-1337",
    "resume": None,
    "checkpoint": {"every_n_steps": 3, "save_best": True},
    "health": {"every_n_steps": 50},
}


def _with(**changes):
    """CFG with dotted keys changed: _with(**{"model.dim": 64})."""
    cfg = copy.deepcopy(CFG)
    for dotted, value in changes.items():
        *parents, key = dotted.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[key] = value
    return cfg


def _write_run(path, cfg, losses, val=None, speed=None, health=None, mtime=None):
    """A fake finished run: config.yaml, csv/metrics.csv (train/loss by step, val/loss, tokens/s),
    and health.csv rows (step, layer, operand, underflow, saturation, snr_db)."""
    (path / "csv").mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    with open(path / "csv" / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "perf/tokens_per_s", "step", "train/loss", "val/loss"])
        for step, loss in enumerate(losses):
            w.writerow([0, (speed or {}).get(step, ""), step, loss, ""])
        for step, loss in (val or {}).items():
            w.writerow([0, "", step, "", loss])
    if health:
        with open(path / "health.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(
                ["step", "layer", "operand", "amax", "scale_min", "scale_max", "underflow", "saturation", "snr_db"]
            )
            for row in health:
                w.writerow([row[0], row[1], row[2], 1.0, 0.1, 0.5, *row[3:]])
    if mtime is not None:
        os.utime(path / "config.yaml", (mtime, mtime))
    return path


def test_fingerprint_is_eight_hex_of_the_canonical_experiment_keys():
    kept = {k: copy.deepcopy(CFG[k]) for k in ("model", "posenc", "data", "task", "optimizer", "scheduler", "trainer")}
    kept["trainer"] = {k: v for k, v in kept["trainer"].items() if k not in ("accelerator",) and "enable" not in k}
    kept["trainer"].pop("log_every_n_steps")
    kept["data"] = {k: v for k, v in kept["data"].items() if k not in ("cache_dir", "num_workers")}
    kept["trainer"].pop("limit_val_batches")  # null: the default, as if absent
    kept["trainer"]["gradient_clip_val"] = 1  # integral floats as ints
    kept["posenc"]["theta"] = 10000
    text = json.dumps(kept, sort_keys=True, separators=(",", ":"))
    assert fingerprint(CFG) == hashlib.sha256(text.encode()).hexdigest()[:8] == "2aa89207"
    assert experiment_name(CFG) == "gpt-stdlib-3steps-2aa89207"


@pytest.mark.parametrize(
    "change",
    [
        {"precision": {"name": "bf16"}},
        {"seed": 2},
        {"name": "bf16_llm-bf16-2", "description": "", "resume": "runs/x"},
        {"logger.wandb": True, "logger.group": "exp", "logger.tags": []},
        {"checkpoint.every_n_steps": 100, "health.every_n_steps": 1},
        {"trainer.enable_progress_bar": True, "trainer.log_every_n_steps": 10, "trainer.accelerator": "cpu"},
        {"data.cache_dir": "/tmp/cache", "data.num_workers": 4},
        {"optimizer.lr": 3e-3, "posenc.theta": 10000},  # the same numbers written differently
        {"recipe": "nvfp4_llm", "choices": {"precision": "nvfp4"}},  # what W&B's config adds
    ],
)
def test_precision_seed_and_presentation_do_not_change_the_fingerprint(change):
    assert fingerprint(_with(**change)) == fingerprint(CFG)


@pytest.mark.parametrize(
    "change",
    [
        {"model.dim": 64},
        {"model.name": "deq_gpt"},
        {"posenc.name": "alibi"},
        {"data.name": "text"},
        {"data.batch_size": 8},
        {"task._target_": "lowbit.tasks.deq.DEQLM"},
        {"optimizer.lr": 1e-3},
        {"scheduler.warmup_steps": 2},
        {"trainer.max_steps": 600},
        {"trainer.accumulate_grad_batches": 2},
        {"trainer.val_check_interval": 1},
        {"trainer.devices": 2},
    ],
)
def test_what_is_computed_changes_the_fingerprint(change):
    assert fingerprint(_with(**change)) != fingerprint(CFG)


@pytest.mark.parametrize(
    "change",
    [
        {"trainer.devices": 2, "data.batch_size": 2},
        {"trainer.devices": [0, 1], "data.batch_size": 2},
        {"trainer.num_nodes": 2, "trainer.devices": 2, "data.batch_size": 1},
        {"trainer.devices": 4, "data.batch_size": 1, "trainer.strategy": "fsdp"},
    ],
)
def test_processes_sharing_the_global_batch_are_the_experiment_of_one_process(change):
    four = fingerprint(_with(**{"data.batch_size": 4}))
    assert fingerprint(_with(**change)) == four
    assert fingerprint(_with(**{"trainer.num_nodes": 1})) == fingerprint(CFG)  # a lone run's key as before
    assert fingerprint(_with(**{"trainer.devices": "auto"})) != four  # the machine decides: not the same


def test_load_run_reads_loss_throughput_and_worst_health(tmp_path):
    health = [
        (0, "blocks.0.qkv", "fprop.x", 0.25, 0.01, 21.5),
        (0, "blocks.0.qkv", "dgrad.dy", 0.5, 0.0, "nan"),  # an all-zero operand: no SNR
        (2, "blocks.1.fc", "wgrad.dy", 0.125, 0.0625, 16.25),
    ]
    path = _write_run(
        tmp_path / "r",
        CFG,
        [5.5, 5.25, 5.0],
        val={2: 4.75, 3: 4.5},
        speed={0: 100.0, 1: 1000.0, 2: 1200.0},
        health=health,
    )
    run = load_run(path)
    assert run.train_loss == {0: 5.5, 1: 5.25, 2: 5.0}
    assert (run.final_val_loss, run.steps, run.finished) == (4.5, 3, True)
    assert run.throughput == (1000.0, "tokens")  # the median keeps the warm-up step out
    assert run.health == {"underflow_max": 0.5, "saturation_max": 0.0625, "snr_db_min": 16.25}
    assert (run.precision, run.seed, run.fingerprint) == ("nvfp4", 1337, "2aa89207")
    assert describe_run(run) == f"{path} (nvfp4, seed 1337)"
    assert not load_run(_write_run(tmp_path / "stopped", CFG, [5.5])).finished  # 1 of 3 steps


def test_read_config_says_what_a_run_directory_needs(tmp_path):
    with pytest.raises(LowbitError, match=r"run directory .*nowhere does not exist"):
        read_config(tmp_path / "nowhere")
    with pytest.raises(LowbitError, match=r"is not a run directory: it has no config.yaml"):
        read_config(tmp_path)
    with pytest.raises(LowbitError, match=r"has no csv/metrics.csv"):
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(CFG))
        load_run(tmp_path)


def test_find_baseline_matches_the_experiment_not_the_group(tmp_path):
    runs = tmp_path / "runs"
    bf16 = {"precision": {"name": "bf16"}}
    # a BF16 smoke run of a smaller model in the same logger group: never the baseline
    _write_run(runs / "smoke" / "a", _with(**bf16, **{"model.dim": 8, "logger.group": "exp"}), [5.5, 5.4, 5.3])
    quant = _with(**{"logger.group": "exp"})
    assert find_baseline(quant, [runs]) is None
    # same experiment, but not BF16, or BF16 stopped early, or only Hydra's copy of a config
    _write_run(runs / "nvfp4" / "b", CFG, [5.5, 5.4, 5.3])
    _write_run(runs / "bf16" / "stopped", _with(**bf16), [5.5])
    hydra_only = _write_run(runs / "bf16" / "hydra", _with(**bf16), [5.5, 5.4, 5.3])
    (hydra_only / ".hydra").mkdir()
    (hydra_only / "config.yaml").rename(hydra_only / ".hydra" / "config.yaml")
    assert find_baseline(quant, [runs]) is None

    older = _write_run(runs / "bf16" / "seed1337", _with(**bf16), [5.5, 5.4, 5.3], mtime=1_000)
    newer = _write_run(runs / "bf16" / "seed2", _with(**bf16, seed=2), [5.5, 5.4, 5.3], mtime=2_000)
    assert find_baseline(quant, [runs]) == older  # the same seed beats the newer run
    assert find_baseline(_with(seed=7), [runs]) == newer  # no same seed: the newest
    assert find_baseline(_with(**bf16), [runs], exclude=older) == newer  # never the run itself
    assert find_baseline(quant, [tmp_path / "elsewhere"]) is None
    # another tool's config.yaml (sections that are strings, or a list) is skipped, not an error
    for i, foreign in enumerate(
        ({"precision": "bf16", "model": "gpt"}, ["a", "b"], {"precision": {"name": "bf16"}, "model": 3})
    ):
        (runs / "foreign" / str(i)).mkdir(parents=True)
        (runs / "foreign" / str(i) / "config.yaml").write_text(yaml.safe_dump(foreign))
    assert find_baseline(quant, [runs]) == older


def test_find_baseline_looks_three_folders_down_and_no_deeper(tmp_path):
    bf16 = _with(**{"precision.name": "bf16"})
    job = _write_run(tmp_path / "runs" / "multirun" / "20261204-101500" / "0-bf16", bf16, [5.5, 5.4, 5.3])
    assert find_baseline(CFG, [tmp_path / "runs"]) == job  # a sweep's job: the deepest layout lowbit writes
    (tmp_path / "deep").mkdir()
    (tmp_path / "runs").rename(tmp_path / "deep" / "runs")
    assert find_baseline(CFG, [tmp_path / "deep"]) is None  # four folders down: not walked


def test_baseline_roots_are_the_runs_folder_beside_the_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "runs" / "nvfp4_llm-nvfp4-1337" / "20261204-101500"
    run_dir.mkdir(parents=True)
    assert baseline_roots(run_dir) == [tmp_path / "runs"]
    sweep_job = tmp_path / "multirun" / "20261204" / "0-x"
    sweep_job.mkdir(parents=True)
    assert baseline_roots(sweep_job) == [tmp_path / "multirun", Path("runs")]
    assert baseline_roots(Path("runs/x/20261204-101500")) == [Path("runs")]  # relative stays relative
    assert baseline_roots(Path("/run")) == [Path("runs")]  # hydra.run.dir=/run: not the whole filesystem


def test_health_nan_rows_only_leave_snr_out(tmp_path):
    path = _write_run(tmp_path / "r", CFG, [1.0, 1.0, 1.0], health=[(0, "l", "fprop.x", 0.0, 0.0, "nan")])
    health = load_run(path).health
    assert health == {"underflow_max": 0.0, "saturation_max": 0.0} and not any(map(math.isnan, health.values()))
