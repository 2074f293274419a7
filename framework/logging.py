"""Loggers: Weights & Biases (online when it can reach the service with credentials, offline
otherwise, never hanging) and a CSV log that is always written."""

from __future__ import annotations

import netrc
import os
import socket
from pathlib import Path
from typing import Any

__all__ = ["build_loggers", "wandb_mode"]

_WANDB_HOST = "api.wandb.ai"


def _has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(_WANDB_HOST) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _reachable(host: str, port: int = 443, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wandb_mode() -> str:
    """``$WANDB_MODE`` if set; else ``online`` with credentials and a reachable service; else ``offline``."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if _has_credentials() and _reachable(_WANDB_HOST) else "offline"


def build_loggers(
    logger_cfg: dict[str, Any], run_dir: Path, run_name: str, group: str, hparams: dict[str, Any]
) -> list:
    """CSV always (``run_dir/csv/metrics.csv``); W&B when ``logger.wandb`` is true."""
    from lightning.pytorch.loggers import CSVLogger

    loggers: list = [CSVLogger(save_dir=str(run_dir), name="csv", version="")]
    if logger_cfg.get("wandb", True):
        from lightning.pytorch.loggers import WandbLogger

        mode = wandb_mode()
        extra = {"mode": "disabled"} if mode == "disabled" else {}
        loggers.append(
            WandbLogger(
                project=logger_cfg.get("project", "lowbit"),
                group=logger_cfg.get("group") or group,
                tags=list(logger_cfg.get("tags") or []),
                name=run_name,
                save_dir=str(run_dir),
                offline=mode in ("offline", "dryrun"),
                **extra,
            )
        )
    for lg in loggers:
        lg.log_hyperparams(hparams)
    return loggers
