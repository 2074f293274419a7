"""Experiments and the runs that belong to them: a config's fingerprint, its BF16 baseline, and
a finished run read back from disk.

An *experiment* is what a run computes apart from its number format and seed: model, positional
encoding, data, task, optimizer, schedule and the training budget. Its fingerprint is a short
hash of those keys, so a quantized run and the BF16 run it should be compared with share one,
and runs of a different model or budget never do. ``find_baseline`` finds that BF16 run among
earlier runs; ``load_run`` reads a run's curves and summary for ``lowbit compare``.

A run is a lowbit run directory (``config.yaml``, ``csv/metrics.csv``, ``health.csv``) or a
Weights & Biases run directory (``wandb/offline-run-*`` or ``wandb/run-*``), read from its
``files/config.yaml`` when W&B wrote one and otherwise from the ``run-*.wandb`` record log (the
only copy of config and history an offline run keeps).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import statistics
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lowbit.errors import LowbitError

__all__ = [
    "BASELINE_DEPTH",
    "EXPERIMENT_KEYS",
    "Run",
    "baseline_roots",
    "describe_run",
    "experiment_name",
    "find_baseline",
    "fingerprint",
    "load_run",
    "read_config",
    "wandb_run_record",
]

# The config groups that define what is computed, and the checkpoint a run starts from (``init_from``:
# a QAT fine-tune's baseline is the BF16 fine-tune of the same checkpoint); precision, seed, logger,
# checkpoint, health, description, resume, run_dir and name (and W&B's recipe and choices) are left out.
EXPERIMENT_KEYS = ("model", "posenc", "data", "task", "optimizer", "scheduler", "trainer", "init_from")

# Keys inside those groups that change how a run is executed or shown, not the numbers it learns.
# The accelerator and strategy are here on purpose: a BF16 baseline trained on a GPU is the
# baseline of the same model trained in FP4 on that GPU, or emulated on a CPU.
_HOW_NOT_WHAT = {
    "trainer": {
        "accelerator",
        "strategy",
        "enable_progress_bar",
        "enable_model_summary",
        "enable_checkpointing",
        "log_every_n_steps",
        "num_sanity_val_steps",
        "default_root_dir",
        "profiler",
        "benchmark",
        "deterministic",
        "detect_anomaly",
        "barebones",
        "logger",
        "callbacks",
        "plugins",
    },
    "data": {"cache_dir", "num_workers"},
}

_HEALTH_COLUMNS = {"underflow": max, "saturation": max, "snr_db": min}  # worst over layers and steps


# --- experiments ----------------------------------------------------------------------------


def _canonical(value: Any) -> Any:
    """Plain JSON values that compare equal when the configs mean the same: integral floats as
    ints (``lr: 1`` and ``lr: 1.0``), tuples as lists, null-valued keys dropped (a key set to null
    means its default, as if absent)."""
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _processes(trainer: dict[str, Any]) -> int | None:
    """How many processes share each step (devices per node times nodes); None where the config
    alone cannot say (``devices: auto`` counts the GPUs of the machine that runs it)."""
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1)
    per_node = len(devices) if isinstance(devices, (list, tuple)) else devices
    if not (isinstance(per_node, int) and isinstance(nodes, int)):
        return None
    return per_node * nodes


def _global_batch(out: dict[str, Any]) -> None:
    """``data.batch_size`` is per process: 2 processes of 2 take the steps 1 process of 4 takes, so
    both are written as one process of the global batch (and a lone run's keys stay as they were)."""
    trainer, data = out.get("trainer"), out.get("data")
    if not isinstance(trainer, dict):
        return
    world = _processes(trainer)
    if world is None:
        return
    trainer.pop("num_nodes", None)
    if world != 1 and isinstance(data, dict) and isinstance(data.get("batch_size"), int):
        out["data"] = {**data, "batch_size": data["batch_size"] * world}
        trainer["devices"] = 1


def _experiment(cfg: dict[str, Any]) -> dict[str, Any]:
    """The part of ``cfg`` that defines the experiment (see ``EXPERIMENT_KEYS``)."""
    out = {}
    for key in EXPERIMENT_KEYS:
        node = cfg.get(key)
        if isinstance(node, dict):
            node = {k: v for k, v in node.items() if k not in _HOW_NOT_WHAT.get(key, ())}
        out[key] = node
    _global_batch(out)
    return _canonical(out)


def fingerprint(cfg: dict[str, Any]) -> str:
    """8 hex digits of the SHA-256 of the experiment's keys as canonical JSON: equal for runs that
    differ only in precision, seed, logging, checkpointing or presentation."""
    text = json.dumps(_experiment(cfg), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def experiment_name(cfg: dict[str, Any]) -> str:
    """A readable W&B group for the experiment: ``gpt-stdlib-600steps-1a2b3c4d``."""
    model = (cfg.get("model") or {}).get("name", "model")
    data = (cfg.get("data") or {}).get("name", "data")
    steps = (cfg.get("trainer") or {}).get("max_steps", "?")
    name = f"{model}-{data}-{steps}steps-{fingerprint(cfg)}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


# --- reading runs ---------------------------------------------------------------------------


def _is_wandb_dir(path: Path) -> bool:
    return path.parent.name == "wandb" and re.match(r"(offline-)?run-", path.name) is not None


def _wandb_log(path: Path) -> Path | None:
    logs = sorted(path.glob("run-*.wandb"))
    return logs[-1] if logs else None


def _wandb_records(log: Path) -> Iterator[Any]:
    """The protobuf records of a W&B transaction log (``run-*.wandb``): LevelDB's log format, a
    7-byte file header (``:W&B``, magic, version), then 32 KiB blocks of records, each a 7-byte
    header (crc32, length, type: full, first, middle, last) and its bytes. A log still being
    written (a live run; W&B flushes it in 8 KiB pieces) is read up to its last whole record."""
    from wandb.proto import wandb_internal_pb2

    data = log.read_bytes()
    if data[:4] != b":W&B":
        raise LowbitError(f"{log} is not a W&B run log (no ':W&B' header)")
    block, pos, parts = 32768, 7, []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0 or pos + length > len(data):  # the end of a log still being written
            break
        parts.append(data[pos : pos + length])
        pos += length
        if kind in (1, 4):  # full or last: one record complete
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def _wandb_read(path: Path, history: bool) -> tuple[dict[str, Any], dict[str, dict[int, float]], bool]:
    """(config, curves by metric and Lightning step, finished) from a W&B run directory."""
    config_file, log = path / "files" / "config.yaml", _wandb_log(path)
    cfg: dict[str, Any] = {}
    if config_file.is_file():  # W&B's config.yaml: {key: {value: ...}} plus its own _wandb
        raw = yaml.safe_load(config_file.read_text()) or {}
        cfg = {k: v["value"] for k, v in raw.items() if k != "_wandb" and isinstance(v, dict) and "value" in v}
    curves: dict[str, dict[int, float]] = {}
    finished = (path / "files" / "wandb-summary.json").is_file()
    if log is None or (cfg and not history and finished):
        return cfg, curves, finished
    logged: dict[str, Any] = {}  # the transaction log is the record; files/config.yaml a copy that may lag it
    for record in _wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind in ("run", "config"):  # the run record carries the config W&B had at init
            for item in (record.run.config if kind == "run" else record.config).update:
                key = item.key or "/".join(item.nested_key)
                if key.split("/", 1)[0] != "_wandb":
                    logged[key] = json.loads(item.value_json)
        elif kind == "exit":
            finished = record.exit.exit_code == 0
        elif kind == "history" and history:
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                value = json.loads(item.value_json)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    row[key] = float(value)
            step = int(row.pop("trainer/global_step", row.get("_step", 0)))
            for key, value in row.items():
                if not key.startswith("_"):
                    curves.setdefault(key, {})[step] = value
    return {**cfg, **logged}, curves, finished


def wandb_run_record(path: Path) -> dict[str, Any]:
    """What a W&B run directory says about its run: ``{"id", "name", "group", "tags", "project"}``
    (offline runs keep them only in their ``run-*.wandb`` log)."""
    log = _wandb_log(Path(path))
    if log is None:
        raise LowbitError(f"{path} holds no W&B run log (run-*.wandb)")
    for record in _wandb_records(log):
        if record.WhichOneof("record_type") == "run":
            run = record.run
            return {
                "id": run.run_id,
                "name": run.display_name,
                "group": run.run_group,
                "tags": list(run.tags),
                "project": run.project,
            }
    raise LowbitError(f"{log} has no run record")


def read_config(run_dir: Path) -> dict[str, Any]:
    """The resolved config a run saved: ``config.yaml``, or a W&B run's logged config (the plain
    config plus ``recipe`` and ``choices``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LowbitError(f"run directory {run_dir} does not exist")
    if (run_dir / "config.yaml").is_file():
        return yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    if _wandb_log(run_dir) is not None or (run_dir / "files" / "config.yaml").is_file():
        return _wandb_read(run_dir, history=False)[0]
    raise LowbitError(
        f"{run_dir} is not a run directory: it has no config.yaml (a lowbit run) and no run-*.wandb "
        "or files/config.yaml (a W&B run)"
    )


def _read_metrics(path: Path) -> dict[str, dict[int, float]]:
    """Every numeric column of a Lightning CSVLogger file, as {metric: {step: value}}."""
    curves: dict[str, dict[int, float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if not row.get("step"):
                continue
            step = int(row["step"])
            for key, value in row.items():
                if key not in ("step", "epoch") and value not in (None, ""):
                    curves.setdefault(key, {})[step] = float(value)
    return curves


def _read_health(path: Path) -> dict[str, float]:
    """Worst underflow, saturation (max) and SNR (min, NaN skipped) over every layer, operand and
    step of a ``health.csv`` (``lowbit.callbacks.health.QuantHealth``)."""
    worst: dict[str, list[float]] = {key: [] for key in _HEALTH_COLUMNS}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for key in _HEALTH_COLUMNS:
                value = float(row[key])
                if not math.isnan(value):
                    worst[key].append(value)
    return {f"{key}_{pick.__name__}": pick(v) for (key, pick), v in zip(_HEALTH_COLUMNS.items(), worst.values()) if v}


def _health_from_curves(curves: dict[str, dict[int, float]]) -> dict[str, float]:
    """The same summary from the ``health/*`` scalars QuantHealth logs (a W&B run has no health.csv)."""
    out = {}
    for key, pick in _HEALTH_COLUMNS.items():
        values = [v for v in curves.get(f"health/{key}_{pick.__name__}", {}).values() if not math.isnan(v)]
        if values:
            out[f"{key}_{pick.__name__}"] = pick(values)
    return out


@dataclass
class Run:
    """A run read back: its config, every logged metric as {step: value}, and the worst
    quantization health (``underflow_max``, ``saturation_max``, ``snr_db_min``; empty for BF16)."""

    path: Path
    cfg: dict[str, Any]
    curves: dict[str, dict[int, float]] = field(default_factory=dict)
    health: dict[str, float] = field(default_factory=dict)
    finished: bool = False

    @property
    def precision(self) -> str:
        return str((self.cfg.get("precision") or {}).get("name", "?"))

    @property
    def seed(self) -> int | None:
        return self.cfg.get("seed")

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cfg)

    @property
    def train_loss(self) -> dict[int, float]:
        return self.curves.get("train/loss", {})

    @property
    def final_val_loss(self) -> float | None:
        """The last ``val/loss`` logged (run.py validates once more after the last step)."""
        val = self.curves.get("val/loss")
        return val[max(val)] if val else None

    @property
    def steps(self) -> int:
        """Training steps run: one past the last step that logged a training loss."""
        return max(self.train_loss) + 1 if self.train_loss else 0

    @property
    def throughput(self) -> tuple[float, str] | None:
        """(median over logged steps, unit) of ``perf/{tokens,images,samples}_per_s``; the median
        keeps the first steps' compile and warm-up out."""
        for key, values in self.curves.items():
            unit = re.fullmatch(r"perf/(\w+)_per_s", key)
            if unit and values:
                return statistics.median(values.values()), unit.group(1)
        return None


def _finished(cfg: dict[str, Any], curves: dict[str, dict[int, float]]) -> bool:
    """Logged losses up to the last step of its budget (``trainer.max_steps``)."""
    steps = [s for key in ("train/loss", "val/loss") for s in curves.get(key, {})]
    max_steps = (cfg.get("trainer") or {}).get("max_steps")
    return bool(steps) and (max_steps is None or max_steps < 0 or max(steps) >= int(max_steps) - 1)


def load_run(run_dir: Path) -> Run:
    """Read a finished (or unfinished) run: a lowbit run directory or a W&B run directory."""
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    metrics, health = run_dir / "csv" / "metrics.csv", run_dir / "health.csv"
    if (run_dir / "config.yaml").is_file():
        if not metrics.is_file():
            raise LowbitError(f"{run_dir} has no csv/metrics.csv: the run logged nothing (did it start?)")
        curves = _read_metrics(metrics)
        finished = _finished(cfg, curves)
    else:
        _, curves, finished = _wandb_read(run_dir, history=True)
        finished = finished and _finished(cfg, curves)
    summary = _read_health(health) if health.is_file() else _health_from_curves(curves)
    return Run(path=run_dir, cfg=cfg, curves=curves, health=summary, finished=finished)


# --- baselines ------------------------------------------------------------------------------


def _candidates(roots: Sequence[Path], max_depth: int | None = None) -> Iterator[Path]:
    """Every run directory under ``roots`` (at most ``max_depth`` folders down): lowbit run dirs, and
    W&B run dirs that are not inside one (those are the same run twice). Checkpoints, CSV and Hydra
    folders are not entered."""
    seen = set()
    for root in roots:
        for top, dirs, files in os.walk(root):
            here = Path(top)
            if max_depth is not None and len(here.relative_to(root).parts) >= max_depth:
                dirs[:] = []  # nothing deeper is looked at
            if "config.yaml" in files and not _is_wandb_dir(here.parent):  # not W&B's files/config.yaml
                key = here.resolve()
                if key not in seen:
                    seen.add(key)
                    yield here
                dirs[:] = [d for d in dirs if d not in ("checkpoints", "csv", ".hydra", "wandb")]
            elif _is_wandb_dir(here):
                key = here.resolve()
                if key not in seen and (_wandb_log(here) or (here / "files" / "config.yaml").is_file()):
                    seen.add(key)
                    yield here
                dirs[:] = []
            else:
                dirs[:] = [d for d in dirs if d not in (".hydra", "latest-run")]


def _started(run_dir: Path) -> float:
    marker = run_dir / "config.yaml" if (run_dir / "config.yaml").is_file() else _wandb_log(run_dir)
    return (marker or run_dir).stat().st_mtime


def _is_bf16_run_of(other: Any, wanted: str) -> bool:
    """Whether a config read from disk is a BF16 run of the experiment ``wanted``; a foreign
    ``config.yaml`` (another tool's, or one whose sections are not mappings) never is."""
    if not isinstance(other, dict) or not isinstance(other.get("precision"), dict):
        return False
    if other["precision"].get("name") != "bf16":
        return False
    try:
        return fingerprint(other) == wanted
    except (LowbitError, AttributeError, KeyError, TypeError, ValueError):
        return False


BASELINE_DEPTH = 3
"""How far below a root ``find_baseline`` looks: the run folders lowbit writes lie at most three
folders down (``runs/<name>/<time>``, ``runs/multirun/<time>/<job>``), and a root that holds other
things (a home or scratch folder) is not walked to its bottom at every start."""


def find_baseline(cfg: dict[str, Any], roots: Sequence[Path], exclude: Path | None = None) -> Path | None:
    """The run directory of a finished BF16 run of the same experiment (same ``fingerprint``)
    at most ``BASELINE_DEPTH`` folders under ``roots``: the one with the same seed if any, else the
    newest; ``exclude`` (the run itself) never. None when there is none."""
    wanted, seed = fingerprint(cfg), cfg.get("seed")
    skip = Path(exclude).resolve() if exclude is not None else None
    found = []
    for run_dir in _candidates([Path(r) for r in roots if Path(r).is_dir()], BASELINE_DEPTH):
        if skip is not None and run_dir.resolve() == skip:
            continue
        try:
            other = read_config(run_dir)
        except (LowbitError, OSError, yaml.YAMLError, ValueError):
            continue  # half-written or foreign; not a baseline
        if not _is_bf16_run_of(other, wanted):
            continue
        try:
            run = load_run(run_dir)
        except (LowbitError, OSError, ValueError, KeyError):
            continue
        if run.finished and run.train_loss:
            found.append((other.get("seed") == seed, _started(run_dir), str(run_dir), run_dir))
    return max(found)[3] if found else None


def describe_run(run: Run | Path) -> str:
    """``runs/bf16_llm/20261204-101500 (bf16, seed 1337)``: the path as found, precision and seed."""
    if not isinstance(run, Run):
        run = Run(path=Path(run), cfg=read_config(Path(run)))
    return f"{run.path} ({run.precision}, seed {run.seed})"


def baseline_roots(run_dir: Path) -> list[Path]:
    """Where a run looks for its baseline: the folder holding its name's folder (``runs/`` for
    ``runs/<name>/<time>``, the sweep folder for ``runs/multirun/<time>/<job>``; not a filesystem's
    root, as for ``hydra.run.dir=/tmp/run``) and ``./runs``, those that exist, each once, as given
    (relative paths stay relative, for shorter messages)."""
    roots: list[Path] = []
    for root in (Path(run_dir).parent.parent, Path("runs")):
        where = root.resolve()
        if root.is_dir() and where != Path(where.anchor) and all(where != r.resolve() for r in roots):
            roots.append(root)
    return roots
