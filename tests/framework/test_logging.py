"""W&B mode selection (never hangs offline) and the always-on CSV log."""

import pytest

import lowbit.logging as lg


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
    monkeypatch.setattr(lg, "_reachable", lambda host, port=443, timeout=2.0: False)
    assert lg.wandb_mode() == "offline"
    monkeypatch.setattr(lg, "_reachable", lambda host, port=443, timeout=2.0: True)
    assert lg.wandb_mode() == "online"


def test_offline_wandb_run_is_written_locally(monkeypatch, tmp_path):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    loggers = lg.build_loggers(
        {"wandb": True, "project": "lowbit-test", "tags": ["t"]}, tmp_path, "run", "grp", {"seed": 1}
    )
    csv, wandb_logger = loggers
    wandb_logger.log_metrics({"train/loss": 1.5}, step=0)
    wandb_logger.experiment.finish()
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    csv.log_metrics({"train/loss": 1.5}, step=0)
    csv.save()
    assert "train/loss" in (tmp_path / "csv" / "metrics.csv").read_text()
