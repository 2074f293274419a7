"""W&B mode selection (never hangs offline) and the always-on CSV log."""

import json

import pytest
import yaml

import lowbit.logging as lg
from lowbit.experiment import _wandb_records


def test_wandb_mode_respects_env(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert lg.wandb_mode() == "disabled"


def test_offline_without_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    assert lg.wandb_mode() == "offline"


def test_offline_when_service_unreachable(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setattr(lg, "_reachable", lambda host, port=443, timeout=2.0, tls=True: False)
    assert lg.wandb_mode() == "offline"
    monkeypatch.setattr(lg, "_reachable", lambda host, port=443, timeout=2.0, tls=True: True)
    assert lg.wandb_mode() == "online"


def test_offline_wandb_run_is_written_locally(monkeypatch, tmp_path):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    loggers = lg.build_loggers({"wandb": True, "project": "lowbit-test"}, tmp_path, "run", "grp", ["t"])
    assert not any(tmp_path.iterdir())  # nothing written before the first log call
    csv, wandb_logger = loggers
    wandb_logger.log_hyperparams({"seed": 1})
    wandb_logger.log_metrics({"train/loss": 1.5}, step=0)
    lg.finish(loggers, summary={"final/val/loss": 2.5})
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    assert yaml.safe_load((run / "files" / "config.yaml").read_text())["seed"] == {"value": 1}
    assert json.loads((run / "files" / "wandb-summary.json").read_text())["final/val/loss"] == 2.5
    csv.log_metrics({"train/loss": 1.5}, step=0)
    csv.save()
    assert "train/loss" in (tmp_path / "csv" / "metrics.csv").read_text()
    # finish returns once the run's log is on disk: whole, ending with the exit record
    (log,) = run.glob("run-*.wandb")
    kinds = [r.WhichOneof("record_type") for r in _wandb_records(log)]
    assert kinds[0] == "header" and kinds[-1] == "exit" and "config" in kinds


def test_a_log_still_being_written_reads_up_to_its_last_whole_record(monkeypatch, tmp_path):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    loggers = lg.build_loggers({"wandb": True, "project": "lowbit-test"}, tmp_path, "run", "grp", [])
    for step in range(200):
        loggers[1].log_metrics({"train/loss": 1.0 / (step + 1)}, step=step)
    lg.finish(loggers)
    (log,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    whole = list(_wandb_records(log))
    cut = tmp_path / "cut.wandb"
    for size in (8192, 8192 + 13, len(log.read_bytes()) - 3):  # W&B flushes 8 KiB at a time
        cut.write_bytes(log.read_bytes()[:size])
        records = list(_wandb_records(cut))
        assert 0 < len(records) < len(whole) and records == whole[: len(records)]


def test_tags_are_the_choices_then_the_users():
    choices = {
        "recipe": "bf16_llm",
        "precision": "nvfp4",
        "model": "gpt",
        "data": "stdlib",
        "task": "lm",
        "posenc": None,
    }
    assert lg.tags(choices, ["ablation", "gpt"]) == ["bf16_llm", "nvfp4", "gpt", "stdlib", "lm", "ablation"]


def test_wandb_run_id_is_the_newest_runs(tmp_path):
    for name in ("offline-run-20261204_101500-aaaa1111", "run-20261204_111500-bbbb2222"):
        (tmp_path / "wandb" / name).mkdir(parents=True)
    assert lg.wandb_run_id(tmp_path) == "bbbb2222"
    assert lg.wandb_run_id(tmp_path / "none") is None
