"""A quantized run logs the loss of the BF16 run of the same experiment at the same steps, and the
relative gap; a BF16 smoke run of another model is never its baseline; the callback says which
baseline it uses. Runs here are a toy module whose losses are known in closed form."""

import copy
import csv
import json
import os

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from lowbit.callbacks.baseline import BaselineLoss
from lowbit.experiment import experiment_name, fingerprint, load_run, read_config
from lowbit.logging import finish

CFG = {
    "trainer": {"max_steps": 4, "log_every_n_steps": 1},
    "model": {"name": "gpt", "dim": 32},
    "data": {"name": "stdlib", "batch_size": 1},
    "optimizer": {"name": "sgd", "lr": 0.1},
    "precision": {"name": "nvfp4"},
    "seed": 1337,
}
TOY_LOSSES = [4.0 * 0.64**k for k in range(4)]  # w = 2, loss w², SGD lr 0.1: w shrinks by 0.8 a step


def _cfg(precision="nvfp4", seed=1337, **model):
    cfg = copy.deepcopy(CFG)
    cfg["precision"]["name"], cfg["seed"] = precision, seed
    cfg["model"].update(model)
    return cfg


def _write_run(path, cfg, losses, mtime=1_000):
    (path / "csv").mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    with open(path / "csv" / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "train/loss"])
        w.writerows(enumerate(losses))
    os.utime(path / "config.yaml", (mtime, mtime))  # when the run started
    return path


class Toy(L.LightningModule):
    """loss = (w x)² with x = 1 and w = 2 at the start."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(2.0))

    def training_step(self, batch, batch_idx):
        loss = (self.w * batch[0]).pow(2).mean()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.ones(8, 1)), batch_size=1)


def _fit(run_dir, callback, loggers=()):
    trainer = L.Trainer(
        max_steps=4,
        accelerator="cpu",
        logger=[CSVLogger(run_dir, name="csv", version=""), *loggers],
        callbacks=[callback],
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(Toy())
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r.get("train/loss")]


@pytest.fixture
def runs(tmp_path):
    """A BF16 smoke run of a smaller model, and BF16 runs of the experiment with seeds 1337 and 2."""
    root = tmp_path / "runs"
    return {
        "smoke": _write_run(root / "bf16_smoke" / "a", _cfg("bf16", dim=8), [9.0, 9.0, 9.0, 9.0]),
        "seed1337": _write_run(root / "bf16" / "a", _cfg("bf16"), [4.0, 2.0, 1.5, 1.0]),
        "seed2": _write_run(root / "bf16" / "b", _cfg("bf16", seed=2), [4.0, 2.5, 1.5, 1.25], mtime=2_000),
    }


def test_quantized_run_logs_the_bf16_loss_of_its_experiment_at_the_same_steps(runs, tmp_path):
    callback = BaselineLoss(_cfg(), [tmp_path / "runs"], tmp_path / "runs" / "nvfp4" / "c")
    assert callback.baseline_dir == runs["seed1337"]  # the same seed; never the smaller smoke model
    assert callback.description == f"baseline: {runs['seed1337']} (bf16, seed 1337)"
    rows = _fit(tmp_path / "runs" / "nvfp4" / "c", callback)
    assert [float(r["train/loss"]) for r in rows] == pytest.approx(TOY_LOSSES, rel=1e-6)
    assert [float(r["compare/bf16_train_loss"]) for r in rows] == [4.0, 2.0, 1.5, 1.0]
    gaps = [(mine - base) / base for mine, base in zip(TOY_LOSSES, [4.0, 2.0, 1.5, 1.0])]
    assert [float(r["compare/gap_to_bf16"]) for r in rows] == pytest.approx(gaps, rel=1e-5, abs=1e-7)
    assert [r[0] for r in callback.rows()] == [0, 1, 2, 3]


def test_another_seed_is_the_baseline_when_its_own_is_missing(runs, tmp_path):
    callback = BaselineLoss(_cfg(seed=7), [tmp_path / "runs"])
    assert callback.baseline_dir == runs["seed2"]  # the newer of the two
    assert callback.description == f"baseline: {runs['seed2']} (bf16, seed 2)"
    assert callback.losses == {0: 4.0, 1: 2.5, 2: 1.5, 3: 1.25}


def test_no_baseline_for_a_bf16_run_or_another_experiment(runs, tmp_path):
    bf16 = BaselineLoss(_cfg("bf16"), [tmp_path / "runs"], runs["seed1337"])
    assert bf16.baseline_dir is None and bf16.losses == {}
    assert bf16.description == f"baseline: none, this bf16 run is the baseline of {experiment_name(_cfg())}"
    other = BaselineLoss(_cfg(dim=64), [tmp_path / "runs"])
    assert other.baseline_dir is None
    name = experiment_name(_cfg(dim=64))
    assert other.description == f"baseline: none, no finished bf16 run of {name} under {tmp_path / 'runs'}"
    rows = _fit(tmp_path / "runs" / "nvfp4" / "d", other)
    assert len(rows) == 4 and "compare/gap_to_bf16" not in rows[0]  # nothing to compare with


def test_wandb_gets_the_chart_and_table_and_the_run_reads_back(runs, tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "runs" / "nvfp4" / "w"
    run_dir.mkdir(parents=True)
    wandb_logger = WandbLogger(project="lowbit-test", save_dir=str(run_dir), offline=True)
    wandb_logger.log_hyperparams({**_cfg(), "recipe": "nvfp4_llm", "choices": {"precision": "nvfp4"}})
    rows = _fit(run_dir, BaselineLoss(_cfg(), [tmp_path / "runs"], run_dir), [wandb_logger])
    finish([wandb_logger])  # as train ends a run: the run's files are complete when it returns

    (wandb_dir,) = (run_dir / "wandb").glob("offline-run-*")
    assert fingerprint(read_config(wandb_dir)) == fingerprint(_cfg())  # config + recipe + choices
    logged = load_run(wandb_dir)
    assert logged.finished and logged.train_loss == pytest.approx(dict(enumerate(TOY_LOSSES)), rel=1e-6)
    csv_gaps = {int(r["step"]): float(r["compare/gap_to_bf16"]) for r in rows}
    assert logged.curves["compare/gap_to_bf16"] == pytest.approx(csv_gaps, rel=1e-6)
    (table,) = (wandb_dir / "files" / "media" / "table" / "compare").glob("vs_bf16_*.table.json")
    data = json.loads(table.read_text())
    assert data["columns"] == ["step", "loss", "bf16 loss", "gap"]
    assert [r[0] for r in data["data"]] == [0, 1, 2, 3] and [r[2] for r in data["data"]] == [4.0, 2.0, 1.5, 1.0]
    assert [r[3] for r in data["data"]] == pytest.approx(list(csv_gaps.values()), rel=1e-6)
