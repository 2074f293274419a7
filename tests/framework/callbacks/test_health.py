"""Quantization health: per-layer records in health.csv and the logs; a NaN stops the run with a diagnosis."""

import csv
import math

import lightning as L
import pytest
import torch

from lowbit.callbacks.health import HEALTH_FIELDS, QuantHealth, StopOnNonFinite, worst_layers
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


# ---- QAT layers ------------------------------------------------------------------------------------------

QAT_SMOKE = ["recipe=bf16_llm", "debug=smoke", "posenc=none", "logger=csv", "health.every_n_steps=1"]


QAT_LAYERS = {
    f"model.trunk.blocks.{b}.{n}" for b in (0, 1) for n in ("attn.qkv", "attn.proj", "mlp.fc_in", "mlp.fc_out")
}


def _qat_run(tmp_path, *overrides) -> tuple[list[dict], list[dict]]:
    """health.csv rows (checked: the QuantLinear columns, both operands of every QAT layer at steps 0-2)
    and metrics.csv rows of a 3-step QAT run with health every step."""
    train(compose([*QAT_SMOKE, *overrides, f"hydra.run.dir={tmp_path}"]), echo=lambda *_: None)
    with open(tmp_path / "health.csv") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == ("step", "layer", "operand", *HEALTH_FIELDS)
    keys = [(int(r["step"]), r["layer"], r["operand"]) for r in rows]
    assert sorted(keys) == sorted(
        (s, layer, op) for s in (0, 1, 2) for layer in QAT_LAYERS for op in ("fprop.x", "fprop.w")
    )
    for r in rows:
        assert float(r["amax"]) > 0 and float(r["scale_max"]) >= float(r["scale_min"]) > 0
        assert 0 <= float(r["underflow"]) <= 1 and 0 <= float(r["saturation"]) <= 1
    with open(tmp_path / "csv" / "metrics.csv") as f:
        logged = list(csv.DictReader(f))
    return rows, logged


def _curves(logged: list[dict], prefix: str) -> dict[str, list[float]]:
    """Every logged ``prefix<layer>.<operand>`` scalar, by layer.operand, in step order."""
    names = [k for k in logged[0] if k.startswith(prefix)]
    return {k.removeprefix(prefix): [float(r[k]) for r in logged if r.get(k)] for k in names}


def test_qat_layers_are_recorded_and_their_learned_step_sizes_logged_per_layer(tmp_path):
    rows, logged = _qat_run(tmp_path, "precision=qat_int4")  # LSQ INT4 weights in groups of 32, INT8 per-token inputs
    for r in rows:
        if int(r["step"]) == 0:  # LSQ starts at the min/max scales: PTQ's SNR (later steps move with AdamW)
            low, high = (12, 25) if r["operand"] == "fprop.w" else (35, 50)
            assert low < float(r["snr_db"]) < high and float(r["saturation"]) == 0
    scale_mean = _curves(logged, "qat/scale_mean/")
    assert set(scale_mean) == {f"{layer}.fprop.w" for layer in QAT_LAYERS}  # min/max inputs have no learned state
    assert not any(k.startswith("qat/frac_bits/") for k in logged[0])
    health = {(int(r["step"]), f"{r['layer']}.{r['operand']}"): r for r in rows}
    for operand, values in scale_mean.items():
        assert len(values) == 3 and len(set(values)) == 3  # steps 0, 1, 2: the step sizes train
        for step, value in enumerate(values):  # the mean of a layer's scales lies within their range
            r = health[(step, operand)]
            assert float(r["scale_min"]) * (1 - 1e-5) <= value <= float(r["scale_max"]) * (1 + 1e-5)
    for step in (0, 1, 2):  # the clipped fraction is summarized as for QuantLinear
        summary = next(r for r in logged if r.get("health/saturation_max") and int(r["step"]) == step)
        saturation = max(float(r["saturation"]) for r in rows if int(r["step"]) == step)
        assert float(summary["health/saturation_max"]) == pytest.approx(saturation, rel=1e-5, abs=1e-9)


def test_qfx_binary_points_are_logged_per_layer_and_operand(tmp_path):
    rows, logged = _qat_run(tmp_path, "precision=qat_fixed")  # INT8 words, weights and inputs
    frac_bits = _curves(logged, "qat/frac_bits/")
    assert set(frac_bits) == {f"{layer}.{op}" for layer in QAT_LAYERS for op in ("fprop.x", "fprop.w")}
    health = {(int(r["step"]), f"{r['layer']}.{r['operand']}"): r for r in rows}
    # round(F), the binary point in use: at the smoke lr (3e-3, Adam moves F ~lr a step) it holds over 3 steps
    for operand, values in frac_bits.items():
        assert len(values) == 3
        for step, f in enumerate(values):
            r = health[(step, operand)]
            assert f == round(f) and float(r["scale_min"]) == float(r["scale_max"]) == pytest.approx(2.0**-f, rel=1e-6)
        if operand.endswith("fprop.w"):  # F = floor(log2(127 / amax)) from the weight itself: nothing clips
            r = health[(0, operand)]
            assert float(r["saturation"]) == 0 and float(r["amax"]) <= 127 * 2.0 ** -values[0] < 2 * float(r["amax"])


def test_qat_state_is_one_scalar_per_layer_and_operand_with_learned_state():
    rec = {"amax": 1.0, "scale_min": 0.5, "scale_max": 0.5, "underflow": 0.0, "saturation": 0.0, "snr_db": 30.0}
    records = [
        ("a", "fprop.w", rec | {"scale_mean": 0.25}),
        ("a", "fprop.x", rec),  # min/max: nothing learned, nothing logged
        ("b", "fprop.x", rec | {"frac_bits": 6.0}),
    ]
    assert QuantHealth.qat_state(records) == {"qat/scale_mean/a.fprop.w": 0.25, "qat/frac_bits/b.fprop.x": 6.0}


class _BreakQATWeights(L.Callback):
    """Writes a NaN into one QAT layer's master weight before step 2."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 2:
            with torch.no_grad():
                pl_module.model.trunk.blocks[1].mlp.fc_in.weight[0, 0] = math.nan


def test_a_non_finite_loss_in_a_qat_run_names_the_worst_qat_layer(tmp_path):
    built = build(compose(["recipe=bf16_llm", "precision=qat_int4", "debug=smoke", "posenc=none"]).cfg)
    trainer = L.Trainer(
        **{**built.trainer_kwargs, "max_steps": 4},
        plugins=[built.precision],
        callbacks=[_BreakQATWeights(), StopOnNonFinite(tmp_path / "last.ckpt")],
        logger=False,
        enable_checkpointing=False,
    )
    with pytest.raises(LowbitError) as err:
        trainer.fit(built.task, datamodule=built.data)
    message = str(err.value)
    # INT formats encode a NaN as +0 (lowbit.numerics), so the loss stays finite; the NaN reaches the step
    # size's gradient (round(v) - v), and the step never runs
    assert message.startswith("non-finite gradients at step 2; worst quantized operands: ")
    # the NaN weight first; a NaN's SNR is -inf, not a perfect score
    assert message.split("operands: ")[1].startswith("model.trunk.blocks.1.mlp.fc_in.fprop.w (amax nan, SNR -inf dB")
    assert trainer.global_step == 2


def test_the_first_record_is_eager_and_later_ones_compiled(monkeypatch):
    """The first health step does not wait for the statistics' kernels to compile (they would delay the
    first training step by seconds); every later one runs them compiled. Counted, not timed."""
    from types import SimpleNamespace

    from lowbit.quant import GemmRecipe, QuantLinear
    from lowbit.quant import linear as quant_linear

    calls = []
    for name in ("quant_error_and_codes", "quant_error_and_scales"):
        real = getattr(quant_linear, name)
        monkeypatch.setattr(
            quant_linear, name, lambda t, spec, _f=real, _n=name, **kw: calls.append(_n) or _f(t, spec, **kw)
        )
    spec = {"x": "nvfp4", "w": "nvfp4_2d"}
    recipe = GemmRecipe.from_dict(
        {"fprop": spec, "dgrad": {"dy": "nvfp4", "w": "nvfp4_2d"}, "wgrad": {"dy": "nvfp4", "x": "nvfp4"}}
    )
    model = torch.nn.Sequential(QuantLinear(64, 64, recipe=recipe))
    callback = QuantHealth(every_n_steps=2)
    x = torch.randn(32, 64, requires_grad=True)  # dgrad runs too: six operands
    for step, expected in ((0, "quant_error_and_codes"), (2, "quant_error_and_scales"), (4, "quant_error_and_scales")):
        callback.on_train_batch_start(SimpleNamespace(global_step=step), model, None, 0)
        calls.clear()
        model(x).sum().backward()
        assert calls == [expected] * 6
        model[0].record_health = False
