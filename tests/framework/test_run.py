"""Running: saved config, checkpoints, exact resume on CPU, Ctrl-C, precision across runs."""

import csv
import math
import os
import signal
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from lowbit.config import compose
from lowbit.errors import LowbitError
from lowbit.run import build, train

SMOKE = ["debug=smoke", "posenc=none", "logger=csv"]


def _losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def test_run_saves_resolved_config_and_checkpoints(tmp_path):
    composed = compose([*SMOKE, f"hydra.run.dir={tmp_path}"])
    result = train(composed, echo=lambda *_: None)
    text = (tmp_path / "config.yaml").read_text()
    assert "max_len: 32" in text and "${" not in text  # resolved
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "checkpoints" / "best.ckpt").is_file()
    assert set(result.metrics) >= {"val/loss", "val/bpb", "val/ppl"}
    assert result.metrics["val/bpb"] == pytest.approx(
        result.metrics["val/loss"] / torch.log(torch.tensor(2.0)).item(), rel=1e-5
    )
    assert result.metrics["val/ppl"] == pytest.approx(
        torch.exp(torch.tensor(result.metrics["val/loss"])).item(), rel=1e-4
    )
    assert 3.0 < result.baseline_bpb < 8.0  # Python source: ~4.7 bits; 8 bits is the uniform-bytes bound
    # the baseline is the val bytes' mean −log2 p(byte), p the train split's add-one-smoothed byte frequencies
    corpus = build(composed.cfg).data.corpus
    counts = torch.from_numpy(np.bincount(corpus.train, minlength=256)).double() + 1
    log2_p = torch.log2(counts / counts.sum())  # (256,)
    val_bytes = torch.from_numpy(corpus.val.astype(np.int64))
    assert result.baseline_bpb == pytest.approx(-log2_p[val_bytes].mean().item(), rel=1e-9)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 3


@pytest.mark.parametrize("recipe", ["bf16_llm", "nvfp4_llm"])  # nvfp4: stochastic rounding is seeded by (seed, step)
def test_resume_reproduces_every_later_loss_exactly(tmp_path, recipe):
    common = [
        f"recipe={recipe}",
        *SMOKE,
        "trainer.max_steps=6",
        "checkpoint.every_n_steps=3",
        "+checkpoint.keep_all=true",
        "trainer.val_check_interval=100",
    ]
    train(compose([*common, f"hydra.run.dir={tmp_path / 'full'}"]), echo=lambda *_: None)
    full = _losses(tmp_path / "full")
    assert sorted(full) == [0, 1, 2, 3, 4, 5]
    step3 = tmp_path / "full" / "checkpoints" / "step-3.ckpt"
    train(compose([*common, f"hydra.run.dir={tmp_path / 'resumed'}", f"resume={step3}"]), echo=lambda *_: None)
    resumed = _losses(tmp_path / "resumed")
    assert sorted(resumed) == [3, 4, 5]
    for step in (3, 4, 5):
        assert resumed[step] == full[step], f"step {step}: {resumed[step]} != {full[step]}"


class _Signal(L.Callback):
    """Sends ``signum`` to this process when the run reaches ``at_step``, as a scheduler or a user would."""

    def __init__(self, signum: int, at_step: int) -> None:
        self.signum, self.at_step = signum, at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            os.kill(os.getpid(), self.signum)


def _rows(run_dir: Path, key: str) -> dict[int, float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGUSR1, 138)])
def test_a_signal_saves_after_the_step_and_resume_matches_train_and_validation(tmp_path, monkeypatch, signum, code):
    import lowbit.run as run
    from lowbit.errors import Preempted

    original = run._callbacks
    monkeypatch.setattr(run, "_callbacks", lambda *a: [*original(*a), _Signal(signum, at_step=2)])
    common = [*SMOKE, "trainer.max_steps=6", "trainer.val_check_interval=2", "checkpoint.every_n_steps=100"]
    with pytest.raises(Preempted) as stop:
        train(compose([*common, f"hydra.run.dir={tmp_path / 'a'}"]), echo=lambda *_: None)
    assert stop.value.exit_code == code and stop.value.step == 3  # the step in flight finished first
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 3
    monkeypatch.setattr(run, "_callbacks", original)
    train(compose([*common, f"hydra.run.dir={tmp_path / 'b'}", f"resume={last}"]), echo=lambda *_: None)
    train(compose([*common, f"hydra.run.dir={tmp_path / 'full'}"]), echo=lambda *_: None)
    full, resumed = _losses(tmp_path / "full"), _losses(tmp_path / "b")
    assert sorted(resumed) == [3, 4, 5] and all(resumed[s] == full[s] for s in (3, 4, 5))
    full_val, a_val, b_val = (_rows(tmp_path / d, "val/loss") for d in ("full", "a", "b"))
    assert {**a_val, **b_val} == full_val  # validation at the same steps with the same losses


def test_adamw8bit_trains(tmp_path):
    result = train(compose([*SMOKE, "optimizer=adamw8bit", f"hydra.run.dir={tmp_path}"]), echo=lambda *_: None)
    assert result.metrics["val/loss"] > 0
    # both updates lower the loss, and 3 steps take the val loss ≥ 0.25 below the near-uniform start (ln 256 = 5.545):
    # on this seed 32-bit AdamW reaches 5.2271 and the 8-bit states 5.2272, while no update at all stays at ~5.51
    losses = _losses(tmp_path)
    assert losses[0] > losses[1] > losses[2], losses
    assert result.metrics["val/loss"] < math.log(256) - 0.25


def test_output_names_precision_and_baseline(tmp_path):
    lines = []
    result = train(compose([*SMOKE, f"hydra.run.dir={tmp_path}"]), echo=lines.append)
    text = "\n".join(lines)
    assert "precision: " in text and ("FP32 on cpu" in text or "BF16 autocast on cpu" in text)
    assert f"unigram baseline: {result.baseline_bpb:.4f}" in text
    assert f"val bits/byte: {result.metrics['val/bpb']:.4f}" in text


def test_the_summary_says_above_or_below_the_baseline():
    from lowbit.run import _against_baseline

    assert _against_baseline(2.0, 2.5) == "20.0% below the baseline"
    assert _against_baseline(2.5, 2.0) == "25.0% above the baseline"
    assert _against_baseline(2.0001, 2.0) == "level with the baseline"


def _bf16_checkpoint(path: Path, *overrides: str) -> Path:
    """A checkpoint as train writes it (``state_dict`` of the task), of the smoke GPT with ``overrides``."""
    torch.manual_seed(0)
    task = build(compose([*SMOKE, *overrides]).cfg).task
    torch.save({"state_dict": task.state_dict(), "global_step": 5}, path)
    return path


def test_init_from_loads_a_bf16_checkpoint_into_a_qat_model(tmp_path):
    ckpt = _bf16_checkpoint(tmp_path / "bf16.ckpt")
    source = torch.load(ckpt, weights_only=False)["state_dict"]
    task = build(compose([*SMOKE, "precision=qat_int4", f"init_from={ckpt}"]).cfg).task
    own = task.state_dict()
    assert any(".weight_quant." in key for key in own)  # the quantizers: not in the BF16 checkpoint, left to the data
    assert all(torch.equal(own[key], value) for key, value in source.items())  # every weight, bit for bit
    # a run directory means its checkpoints/last.ckpt
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    ckpt.rename(tmp_path / "run" / "checkpoints" / "last.ckpt")
    again = build(compose([*SMOKE, "precision=qat_int4", f"init_from={tmp_path / 'run'}"]).cfg).task
    assert all(torch.equal(again.state_dict()[key], value) for key, value in source.items())


def test_init_from_a_missing_or_mismatched_checkpoint_is_one_line_naming_path_and_key(tmp_path):
    missing = tmp_path / "nowhere.ckpt"
    with pytest.raises(LowbitError, match=rf"init_from={missing}: no checkpoint at {missing}"):
        build(compose([*SMOKE, "precision=qat_int4", f"init_from={missing}"]).cfg)
    wide = _bf16_checkpoint(tmp_path / "wide.ckpt", "model.mlp_ratio=4")
    with pytest.raises(
        LowbitError, match=r"wide\.ckpt: '[\w.]+\.fc_in\.weight' is \(256, 32\) there but \(\d+, 32\) in this"
    ):
        build(compose([*SMOKE, "precision=qat_int4", f"init_from={wide}"]).cfg)
    deeper = _bf16_checkpoint(tmp_path / "deeper.ckpt", "model.n_layers=3")
    with pytest.raises(LowbitError, match=r"deeper\.ckpt has a key the model lacks: 'model\.trunk\.blocks\.2\."):
        build(compose([*SMOKE, f"init_from={deeper}"]).cfg)
    (tmp_path / "junk.ckpt").write_text("not a checkpoint")
    with pytest.raises(LowbitError, match=r"cannot read .*junk\.ckpt as a checkpoint"):
        build(compose([*SMOKE, f"init_from={tmp_path / 'junk.ckpt'}"]).cfg)
    with pytest.raises(LowbitError, match="init_from and resume are both set"):
        build(compose([*SMOKE, f"init_from={missing}", f"resume={missing}"]).cfg)


@pytest.mark.parametrize("variable", ["LOCAL_RANK", "RANK", "NODE_RANK", "SLURM_PROCID"])
def test_a_launched_worker_joins_rank_zeros_run_directory(tmp_path, monkeypatch, variable):
    from lowbit.run import _run_dir
    from lowbit.rundir import launched_worker

    composed = compose([*SMOKE, f"hydra.run.dir={tmp_path}"])
    (tmp_path / "config.yaml").write_text("rank 0 wrote this\n")  # rank 0 has made the run directory
    for name in ("LOCAL_RANK", "RANK", "NODE_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    assert not launched_worker()
    with pytest.raises(LowbitError, match="already holds a run"):  # rank 0 (or a lone run) checks
        _run_dir(composed)
    monkeypatch.setenv(variable, "1")  # a DDP subprocess (Lightning), a torchrun rank, a second node, srun
    assert launched_worker() and _run_dir(composed) == tmp_path  # it joins, and writes nothing of its own
    assert (tmp_path / "config.yaml").read_text() == "rank 0 wrote this\n"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.devices=0"], r"trainer\.devices must be an integer >= 1, a list of device ids or 'auto', got 0"),
        (["trainer.num_nodes=0"], r"trainer\.num_nodes must be an integer of at least 1, got 0"),
        (["trainer.strategy=horovod"], r"trainer\.strategy=horovod is not a strategy; use one of auto, ddp, "),
        (["trainer.strategy=deepspeed"], r"precision 'nvfp4' cannot run with trainer\.strategy=deepspeed: DeepSpeed"),
        (["trainer.strategy=fsdp_cpu_offload"], r"fsdp_cpu_offload is FSDP1.*use trainer\.strategy=fsdp"),
        (["trainer.strategy=fsdp", "trainer.devices=4096"], r"over 4096 processes: the model's largest parameter"),
        (["precision.amax_reduction=all"], r"precision\.amax_reduction must be one of local, global, got 'all'"),
    ],
)
def test_a_launch_that_cannot_work_is_one_line_before_anything_starts(tmp_path, overrides, message):
    with pytest.raises(LowbitError, match=message):
        build(compose([*SMOKE, "recipe=nvfp4_llm", "trainer.accelerator=cpu", *overrides]).cfg)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("strategy", ["fsdp", "fsdp2", "model_parallel"])
def test_fsdp_names_build_fsdp2_over_every_process(strategy):
    from lightning.pytorch.strategies import ModelParallelStrategy

    built = build(
        compose(
            [
                *SMOKE,
                "trainer.accelerator=cpu",
                "trainer.devices=2",
                "trainer.num_nodes=2",
                f"trainer.strategy={strategy}",
            ]
        ).cfg
    )
    chosen = built.trainer_kwargs["strategy"]
    assert isinstance(chosen, ModelParallelStrategy)
    assert (chosen._data_parallel_size, chosen._tensor_parallel_size) == (4, 1)


def test_validation_runs_under_no_grad_not_inference_mode(tmp_path):
    """``train``'s Trainer evaluates as the validation inside ``fit`` does: inference tensors carry other
    dispatch keys, and every compiled quantize kernel compiled again for the final ``trainer.validate``."""
    from lowbit.run import _trainer

    built = build(compose(["recipe=nvfp4_llm", *SMOKE]).cfg)
    trainer = _trainer(built, [], [], tmp_path)
    assert trainer.validate_loop.inference_mode is False and trainer.test_loop.inference_mode is False
