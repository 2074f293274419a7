"""A quantized run beside a BF16 run of the same group logs the baseline's loss and its gap."""

import csv

import pytest

from lowbit.callbacks.baseline import find_baseline
from lowbit.config import compose
from lowbit.run import train

COMMON = ["debug=smoke", "posenc=none", "logger=csv", "trainer.max_steps=4"]


def _rows(run_dir):
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r.get("train/loss")]


def test_quantized_run_logs_the_bf16_loss_at_the_same_steps(tmp_path):
    runs = tmp_path / "runs"
    base, other_group, quant = runs / "bf16_llm" / "a", runs / "bf16_llm" / "b", runs / "nvfp4_llm" / "c"
    train(compose(["recipe=bf16_llm", *COMMON, "logger.group=exp", f"run_dir={base}"]), echo=lambda *_: None)
    train(compose(["recipe=bf16_llm", *COMMON, "seed=2", f"run_dir={other_group}"]), echo=lambda *_: None)
    assert find_baseline(quant, "exp") == base.resolve()
    assert find_baseline(quant, "bf16_llm") == other_group.resolve()
    assert find_baseline(quant, "nothing") is None
    train(compose(["recipe=nvfp4_llm", *COMMON, "logger.group=exp", f"run_dir={quant}"]), echo=lambda *_: None)
    baseline = {r["step"]: float(r["train/loss"]) for r in _rows(base)}
    rows = _rows(quant)
    assert len(rows) == 4
    for r in rows:
        assert float(r["compare/bf16_train_loss"]) == baseline[r["step"]]
        gap = (float(r["train/loss"]) - baseline[r["step"]]) / baseline[r["step"]]
        assert float(r["compare/gap_to_bf16"]) == pytest.approx(gap, rel=1e-5, abs=1e-9)
    assert "compare/gap_to_bf16" not in _rows(base)[0]  # a BF16 run compares with nothing
