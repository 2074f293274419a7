"""Quantization health: per-layer records in health.csv and the logs; a NaN stops the run with a diagnosis."""

import csv
import math

import lightning as L
import pytest
import torch

from lowbit.callbacks.health import QuantHealth, StopOnNonFinite, worst_layers
from lowbit.config import compose
from lowbit.errors import LowbitError
from lowbit.run import build, train

SMOKE = ["recipe=nvfp4_llm", "debug=smoke", "posenc=none", "logger=csv", "precision.keep_last_blocks=0"]


def test_health_is_recorded_per_layer_and_operand(tmp_path):
    train(compose([*SMOKE, "health.every_n_steps=2", f"hydra.run.dir={tmp_path}"]), echo=lambda *_: None)
    with open(tmp_path / "health.csv") as f:
        rows = list(csv.DictReader(f))
    steps = sorted({int(r["step"]) for r in rows})
    assert steps == [0, 2]  # every 2 steps of 3
    layers = {r["layer"] for r in rows}
    assert "model.trunk.blocks.0.attn.qkv" in layers and "model.lm_head" not in layers
    assert len(layers) == 8  # 2 blocks x (qkv, proj, fc_in, fc_out)
    assert len(rows) == 2 * 8 * 6  # every operand of every GEMM
    for r in rows:
        assert float(r["amax"]) > 0 and float(r["scale_max"]) >= float(r["scale_min"]) > 0
        assert 0 <= float(r["underflow"]) <= 1 and 0 <= float(r["saturation"]) <= 1
        assert 5 < float(r["snr_db"]) < 40  # 4-bit floats: about 10-25 dB
    with open(tmp_path / "csv" / "metrics.csv") as f:
        logged = [r for r in csv.DictReader(f) if r.get("health/snr_db_min")]
    snr_min = min(float(r["snr_db"]) for r in rows if int(r["step"]) == 0)
    assert float(logged[0]["health/snr_db_min"]) == pytest.approx(snr_min, rel=1e-4)
    wgrad_dy_saturation = [float(r["saturation"]) for r in rows if int(r["step"]) == 0 and r["operand"] == "wgrad.dy"]
    assert len(wgrad_dy_saturation) == 8  # one per layer
    assert float(logged[0]["health/wgrad.dy/saturation_max"]) == pytest.approx(
        max(wgrad_dy_saturation), rel=1e-5, abs=1e-9
    )


def test_summary_takes_the_worst_values():
    rec = lambda snr, under, sat: {
        "amax": 1.0,
        "scale_min": 1.0,
        "scale_max": 1.0,
        "underflow": under,
        "saturation": sat,
        "snr_db": snr,
    }
    records = [
        ("a", "fprop.x", rec(20.0, 0.1, 0.0)),
        ("b", "fprop.x", rec(12.0, 0.0, 0.2)),
        ("b", "wgrad.dy", rec(30.0, 0.3, 0.0)),
    ]
    s = QuantHealth.summary(records)
    assert s["health/snr_db_min"] == 12.0 and s["health/underflow_max"] == 0.3 and s["health/saturation_max"] == 0.2
    assert s["health/fprop.x/snr_db_min"] == 12.0 and s["health/wgrad.dy/underflow_max"] == 0.3
    worst = worst_layers([*records, ("c", "fprop.w", rec(math.nan, 0.0, 0.0) | {"amax": math.inf})], k=2)
    assert worst[0].startswith("c.fprop.w (amax inf") and worst[1].startswith("b.fprop.x (amax 1, SNR 12.0 dB")


class _BreakWeights(L.Callback):
    """Writes a NaN into one quantized weight before step 2 (an Inf would saturate to the FP4 max)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 2:
            with torch.no_grad():
                pl_module.model.trunk.blocks[1].mlp.fc_in.weight[0, 0] = math.nan


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_the_worst_layer(tmp_path):
    built = build(compose([*SMOKE, "trainer.max_steps=5"]).cfg)
    ckpt = tmp_path / "last.ckpt"
    trainer = L.Trainer(
        **{**built.trainer_kwargs, "max_steps": 5},
        plugins=[built.precision],
        callbacks=[_BreakWeights(), StopOnNonFinite(ckpt)],
        logger=False,
        enable_checkpointing=False,
    )
    before = {n: p.detach().clone() for n, p in built.task.named_parameters()}
    with pytest.raises(LowbitError) as err:
        trainer.fit(built.task, datamodule=built.data)
    message = str(err.value)
    assert message.startswith("non-finite loss at step 2; worst quantized operands: ")
    assert message.split("operands: ")[1].startswith("model.trunk.blocks.1.mlp.fc_in.fprop.w (amax nan")
    assert trainer.global_step == 2  # the step with the NaN never updated the weights
    changed = [n for n, p in built.task.named_parameters() if not torch.equal(p, before[n])]
    assert changed == list(before)  # steps 0 and 1 did train, every parameter
