"""Throughput on Lightning's ThroughputMonitor: tokens/s and images/s from a known clock, in the task's unit."""

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ThroughputMonitor, throughput_monitor
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lowbit.callbacks.throughput import Throughput
from lowbit.tasks.classify import ImageClassifier
from lowbit.tasks.lm import CausalLM

OPTIMIZER = {"name": "adamw", "lr": 1e-3}
SCHEDULER = {"name": "constant"}


class _Clock:
    """perf_counter that advances 0.25 s at every reading: batch i ends 0.25·i s after training starts."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 0.25
        return self.now


def _fit(task: L.LightningModule, data: TensorDataset, monkeypatch, steps: int = 12) -> L.Trainer:
    monkeypatch.setattr(throughput_monitor, "time", SimpleNamespace(perf_counter=_Clock().perf_counter))
    trainer = L.Trainer(
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Throughput(window_size=10)],
        accelerator="cpu",
    )
    trainer.fit(task, train_dataloaders=DataLoader(data, batch_size=4))
    return trainer


def test_tokens_per_second_counts_every_token_of_the_batch(monkeypatch):
    torch.manual_seed(0)
    task = CausalLM(nn.Embedding(16, 16), OPTIMIZER, SCHEDULER, max_steps=12)  # (B, T) -> (B, T, 16) logits
    tokens = torch.randint(0, 16, (64, 8))
    trainer = _fit(task, TensorDataset(tokens, tokens), monkeypatch)
    assert isinstance(trainer.callbacks[0], ThroughputMonitor) and trainer.callbacks[0].unit == "tokens"
    # a window of 10 batches: 9 batches of 4 × 8 tokens in 9 × 0.25 s
    assert float(trainer.callback_metrics["perf/tokens_per_s"]) == pytest.approx(4 * 8 / 0.25)
    assert float(trainer.callback_metrics["perf/peak_mem_mb"]) > 0


def test_images_per_second_counts_the_batch(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    task = ImageClassifier(model, OPTIMIZER, SCHEDULER, max_steps=12, num_classes=3)
    trainer = _fit(task, TensorDataset(torch.randn(64, 1, 2, 2), torch.arange(64) % 3), monkeypatch)
    assert trainer.callbacks[0].unit == "images"
    assert float(trainer.callback_metrics["perf/images_per_s"]) == pytest.approx(4 / 0.25)
    assert "perf/tokens_per_s" not in trainer.callback_metrics


def test_a_run_shorter_than_the_window_logs_no_rate(monkeypatch):
    task = ImageClassifier(
        nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), OPTIMIZER, SCHEDULER, max_steps=5, num_classes=3
    )
    trainer = _fit(task, TensorDataset(torch.randn(64, 1, 2, 2), torch.arange(64) % 3), monkeypatch, steps=5)
    assert "perf/images_per_s" not in trainer.callback_metrics and "perf/peak_mem_mb" in trainer.callback_metrics


def test_bad_units_are_clear_errors():
    with pytest.raises(ValueError, match="unit must be one of tokens, images, samples, got 'pixels'"):
        Throughput("pixels")
