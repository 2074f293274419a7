"""Loggers: Weights & Biases (online when it can reach the service with credentials, offline
otherwise, never hanging; one W&B run per job, finished at its end) and a CSV log that is always
written. ``WANDB_MODE=online`` without a key or a reachable service logs offline with a one-line
notice (``logger.offline_fallback: false``: a one-line error instead), decided within seconds."""

from __future__ import annotations

import csv
import logging
import netrc
import os
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lowbit.errors import LowbitError

__all__ = ["build_loggers", "describe", "finish", "tags", "trim_csv", "wandb_mode", "wandb_run_id"]

_WANDB_HOST = "api.wandb.ai"
_PROBE_TIMEOUT_S = 2.0

log = logging.getLogger("lowbit")


def _service() -> tuple[str, int, bool]:
    """(host, port, https) of the W&B service: ``$WANDB_BASE_URL`` (a self-hosted server) or api.wandb.ai."""
    url = urlparse(os.environ.get("WANDB_BASE_URL") or f"https://{_WANDB_HOST}")
    https = url.scheme != "http"
    return url.hostname or _WANDB_HOST, url.port or (443 if https else 80), https


def _has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(_service()[0]) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _reachable(host: str, port: int = 443, timeout: float = _PROBE_TIMEOUT_S, tls: bool = True) -> bool:
    """``host`` answers within ``timeout`` seconds, the DNS lookup included (in a thread:
    ``create_connection``'s timeout does not bound ``getaddrinfo``); with ``tls``, the TLS handshake
    with a certificate valid for ``host`` too, so a proxy that accepts every connection is no answer."""
    answer: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout) as sock:
                if tls:
                    context = ssl.create_default_context(cafile=os.environ.get("REQUESTS_CA_BUNDLE"))
                    with context.wrap_socket(sock, server_hostname=host):
                        pass
                answer.append(True)
        except (OSError, ValueError):  # ssl.SSLError is an OSError
            answer.append(False)

    thread = threading.Thread(target=probe, daemon=True, name="lowbit-wandb-probe")
    thread.start()
    thread.join(timeout)
    return bool(answer and answer[0])


def _online_problem() -> str | None:
    """Why an online W&B run cannot start now (no key, service unreachable), None when it can."""
    if not _has_credentials():
        return "no W&B API key (WANDB_API_KEY or ~/.netrc from `wandb login`)"
    host, port, https = _service()
    if not _reachable(host, port, tls=https):
        return f"{host}:{port} is unreachable (no answer within {_PROBE_TIMEOUT_S:.0f} s)"
    return None


def wandb_mode(offline_fallback: bool = True, notice: Callable[[str], None] | None = None) -> str:
    """``$WANDB_MODE`` if set; else ``online`` with credentials and a reachable service; else ``offline``.

    An explicit ``WANDB_MODE=online`` that cannot work (no key, no network) logs offline with a
    one-line ``notice`` (default: the ``lowbit`` logger) or, with ``offline_fallback=False``, is a
    ``LowbitError``; either way within a few seconds, never W&B's own minutes of retries."""
    mode = os.environ.get("WANDB_MODE")
    if mode and mode != "online":
        return mode
    problem = _online_problem()
    if mode is None or problem is None:
        return "online" if problem is None else "offline"
    if not offline_fallback:
        raise LowbitError(
            f"WANDB_MODE=online but {problem}; run `wandb login`, or unset WANDB_MODE, "
            "or set logger.offline_fallback=true to log offline"
        )
    (notice or log.warning)(f"notice: WANDB_MODE=online but {problem}; logging offline (wandb sync later)")
    return "offline"


def tags(choices: dict[str, Any], extra: Sequence[str] = ()) -> list[str]:
    """W&B tags from what the run actually chose (recipe, precision, model, data, task), then the
    user's ``logger.tags``; no duplicates, no empty choices."""
    picked = [choices.get(group) for group in ("recipe", "precision", "model", "data", "task", "posenc")]
    out: list[str] = []
    for tag in [*picked, *extra]:
        if tag and str(tag) not in out:
            out.append(str(tag))
    return out


def wandb_run_id(run_dir: Path) -> str | None:
    """The id of the newest W&B run logged in ``run_dir`` (``wandb/[offline-]run-<time>-<id>``), so a
    resumed run continues it; None when the run logged none."""
    runs = sorted((run_dir / "wandb").glob("*run-*-*"), key=lambda p: p.name.split("run-", 1)[1])
    return runs[-1].name.rsplit("-", 1)[1] if runs else None


def _appending_csv_logger(run_dir: Path):
    """Lightning's CSVLogger, except that an existing ``metrics.csv`` is continued (its header kept,
    new columns merged in) rather than deleted: a run resumed in place appends to its own log."""
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter

    class _AppendingWriter(ExperimentWriter):
        def _check_log_dir_exists(self) -> None:  # Lightning's deletes metrics.csv here
            if self._fs.isfile(self.metrics_file_path):
                with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                    self.metrics_keys = sorted(next(csv.reader(f), []))

    class AppendingCSVLogger(CSVLogger):
        @property
        def experiment(self):
            if self._experiment is None:
                self._fs.makedirs(self.root_dir, exist_ok=True)
                self._experiment = _AppendingWriter(log_dir=self.log_dir)
            return self._experiment

    return AppendingCSVLogger(save_dir=str(run_dir), name="csv", version="")


def trim_csv(path: Path, before_step: int) -> None:
    """Keep the rows of a step-indexed CSV log (``metrics.csv``, ``health.csv``) logged before
    ``before_step``: a run resumed from a checkpoint of that step logs the later ones again."""
    if not path.is_file():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or "step" not in rows[0]:
        return
    at = rows[0].index("step")
    kept = [rows[0], *(r for r in rows[1:] if r[at] == "" or int(float(r[at])) < before_step)]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(kept)
    os.replace(tmp, path)


def build_loggers(
    logger_cfg: dict[str, Any],
    run_dir: Path,
    name: str,
    group: str,
    tags: Sequence[str],
    run_id: str | None = None,
) -> list:
    """CSV always (``run_dir/csv/metrics.csv``, continued if it exists); W&B when ``logger.wandb`` is true: one run named
    ``name`` in ``logger.group`` (default ``group``: the experiment), continuing ``run_id`` when given.
    Nothing is written until the first log call."""
    loggers: list = [_appending_csv_logger(run_dir)]
    if logger_cfg.get("wandb", True):
        import wandb
        from lightning.pytorch.loggers import WandbLogger

        mode = wandb_mode(offline_fallback=bool(logger_cfg.get("offline_fallback", True)))
        extra: dict[str, Any] = {"mode": "disabled"} if mode == "disabled" else {}
        if run_id:
            extra.update(id=run_id, resume="allow")
        loggers.append(
            WandbLogger(
                project=logger_cfg.get("project", "lowbit"),
                group=logger_cfg.get("group") or group,
                tags=list(tags),
                name=name,
                save_dir=str(run_dir),
                offline=mode in ("offline", "dryrun"),
                reinit="finish_previous",  # one W&B run per job, also when a sweep runs jobs in one process
                settings=wandb.Settings(silent=True),  # where the run is: describe(); the rest in its debug log
                **extra,
            )
        )
        # Lightning passes wandb.init(anonymous=None); wandb takes any value as set and warns it is deprecated
        loggers[-1]._wandb_init.pop("anonymous", None)
    return loggers


def describe(loggers: Sequence[Any]) -> str | None:
    """``W&B: offline run <name> (<id>), group <group>: wandb sync <dir>`` or the run's URL online."""
    from lightning.pytorch.loggers import WandbLogger

    for lg in loggers:
        if isinstance(lg, WandbLogger):
            run = lg.experiment
            if getattr(run, "disabled", False) or not getattr(run, "id", None):
                return None
            where = run.url if not run.settings._offline else f"wandb sync {Path(run.dir).parent}"
            return f"W&B: {run.name} ({run.id}) in group {run.group}: {where}"
    return None


def finish(loggers: Sequence[Any], summary: dict[str, Any] | None = None, exit_code: int = 0) -> None:
    """Close the job's W&B run so the next job of a sweep starts its own. An offline run also gets
    ``files/config.yaml`` and ``files/wandb-summary.json`` as an online run has them, so its config
    and final numbers are readable without ``wandb sync``."""
    import json

    import yaml
    from lightning.pytorch.loggers import WandbLogger

    finished = False
    for lg in loggers:
        if not isinstance(lg, WandbLogger) or lg._experiment is None:
            continue
        run = lg.experiment
        if summary:
            run.summary.update(summary)
        if run.settings._offline and getattr(run, "dir", None):
            files = Path(run.dir)
            config = {k: {"value": v} for k, v in dict(run.config).items()}
            (files / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
            (files / "wandb-summary.json").write_text(json.dumps(dict(run.summary), default=str))
        run.finish(exit_code=exit_code)
        finished = True
    if finished:
        # run.finish() returns before W&B's service has written the run's log to disk (seen: 8 KiB of
        # 10); teardown waits for it, so the run reads back complete the moment train returns
        import wandb

        wandb.teardown()
