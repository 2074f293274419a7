"""Learning-rate schedules (timm Schedulers stepped by the optimizer-step count): cosine gives the lr
sequence of the LambdaLR lowbit used before, exactly; how it differs from timm's CosineLRScheduler;
constant and wsd against their closed forms; a task steps them once per optimizer step."""

import math

import lightning as L
import pytest
import torch
from timm.scheduler import CosineLRScheduler, WSDLRScheduler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lowbit.config import compose, plain
from lowbit.errors import LowbitError
from lowbit.tasks.classify import ImageClassifier
from lowbit.tasks.schedule import WarmupCosine, WarmupStableDecay, build_scheduler, warmup_cosine

LR = 3e-3


def _optimizer(lr: float = LR) -> torch.optim.Optimizer:
    return torch.optim.AdamW([nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(2))], lr=lr)


def _lrs(spec: dict, max_steps: int, steps: int, lr: float = LR) -> list[float]:
    """The lr of optimizer steps 0 .. steps-1, stepped as a task steps the scheduler."""
    optimizer = _optimizer(lr)
    scheduler = build_scheduler(optimizer, spec, max_steps)
    lrs = []
    for k in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        assert all(g["lr"] == lrs[-1] for g in optimizer.param_groups)
        scheduler.step_update(k + 1)  # after optimizer step k, Lightning's global_step is k + 1
    return lrs


def test_warmup_then_cosine_values():
    assert warmup_cosine(0, 10, 110) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 110) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 110) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110, min_lr_ratio=0.1) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))
    )
    assert warmup_cosine(110, 10, 110, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 10, 110, min_lr_ratio=0.1) == pytest.approx(0.1)


@pytest.mark.parametrize(("warmup", "max_steps", "min_lr_ratio"), [(50, 1500, 0.1), (1, 20, 0.1), (0, 30, 0.0)])
def test_cosine_gives_exactly_the_lambdalr_sequence_lowbit_used_before(warmup, max_steps, min_lr_ratio):
    optimizer = _optimizer()
    old = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: warmup_cosine(k, warmup, max_steps, min_lr_ratio)
    )  # stepped once per optimizer step (Lightning's interval: step)
    want = []
    for _ in range(max_steps + 20):
        want.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        old.step()
    spec = {"name": "cosine", "warmup_steps": warmup, "min_lr_ratio": min_lr_ratio}
    assert _lrs(spec, max_steps, max_steps + 20) == want  # equal floats, not approximately


def test_cosine_differs_from_timms_cosine_by_its_warmup_only():
    """timm's CosineLRScheduler (warmup from 0, prefix, cosine over the rest) runs step k < W at lr·k/W:
    one step behind lowbit's lr·(k+1)/W. From step W on the two agree to 1e-15 relative: timm computes
    lr_min + ½(lr − lr_min)(1 + cos), lowbit lr·(r + (1 − r)·½(1 + cos)), and ~40% of the steps differ in the
    last bit of a float64 (which is why ``cosine`` is lowbit's own timm Scheduler: golden losses stay exact)."""
    W, N, ratio = 10, 110, 0.1
    optimizer = _optimizer()
    timm = CosineLRScheduler(
        optimizer,
        t_initial=N - W,
        lr_min=ratio * LR,
        warmup_t=W,
        warmup_lr_init=0.0,
        warmup_prefix=True,
        t_in_epochs=False,
    )
    timm_lr = [timm._get_lr(k)[0] for k in range(N + 10)]
    ours = _lrs({"name": "cosine", "warmup_steps": W, "min_lr_ratio": ratio}, N, N + 10)
    assert timm_lr[0] == 0.0 and ours[0] == LR / W
    assert ours[: W - 1] == pytest.approx(timm_lr[1:W], rel=1e-15)  # ours(k) = timm(k + 1) in the warmup
    assert ours[W - 1] == LR and timm_lr[W - 1] == pytest.approx(LR * (W - 1) / W)
    assert ours[W:] == pytest.approx(timm_lr[W:], rel=2e-15, abs=0)  # ours(k) = timm(k) after it
    assert ours[W:] != timm_lr[W:]  # but not bit for bit


def test_constant_is_warmup_then_the_lr():
    lrs = _lrs({"name": "constant", "warmup_steps": 4}, 20, 8)
    assert lrs == [LR * 1 / 4, LR * 2 / 4, LR * 3 / 4, LR, LR, LR, LR, LR]
    assert _lrs({"name": "constant"}, 20, 3) == [LR] * 3


def test_wsd_matches_its_closed_form_at_every_phase():
    # max_steps 100, warmup 10: 90 steps after it, the last D = 0.2 · 90 = 18 decaying from S = 82 to 100
    lr, lr_min = 1.0, 0.1
    lrs = _lrs({"name": "wsd", "warmup_steps": 10, "decay_fraction": 0.2, "min_lr_ratio": 0.1}, 100, 130, lr=lr)
    assert lrs[0] == 0.1 and lrs[4] == 0.5 and lrs[9] == 1.0  # (k + 1)/W
    assert lrs[10:83] == [1.0] * 73  # stable through S = 82
    for k in (83, 91, 95, 99):
        assert lrs[k] == lr_min + (lr - lr_min) * (1 - math.sqrt((k - 82) / 18)), k  # 1 − √f, Hägele et al. eq. 1
    assert lrs[100:] == [lr_min] * 30
    linear = _lrs({"name": "wsd", "warmup_steps": 0, "decay_fraction": 0.5, "decay_fn": "linear"}, 40, 41, lr=lr)
    assert linear[:21] == [1.0] * 21 and linear[30] == 0.5 and linear[40] == 0.0
    scheduler = build_scheduler(_optimizer(), {"name": "wsd", "warmup_steps": 2}, 12)
    assert isinstance(scheduler, WSDLRScheduler) and isinstance(scheduler, WarmupStableDecay)


def test_scheduler_options_are_checked():
    with pytest.raises(LowbitError, match="scheduler.decay_fraction must be in \\(0, 1\\], got 0"):
        build_scheduler(_optimizer(), {"name": "wsd", "decay_fraction": 0}, 100)
    with pytest.raises(LowbitError, match="wsd needs trainer.max_steps > scheduler.warmup_steps, got 20 and 50"):
        build_scheduler(_optimizer(), {"name": "wsd"}, 20)
    with pytest.raises(LowbitError, match="scheduler wsd: Invalid decay_fn \\(cubic\\)"):
        build_scheduler(_optimizer(), {"name": "wsd", "warmup_steps": 1, "decay_fn": "cubic"}, 20)
    with pytest.raises(LowbitError, match="scheduler.min_lr_ratio must be in \\[0, 1\\], got 2"):
        build_scheduler(_optimizer(), {"name": "cosine", "min_lr_ratio": 2}, 20)
    with pytest.raises(LowbitError, match="unknown schedulers 'step'; installed: constant, cosine, wsd"):
        build_scheduler(_optimizer(), {"name": "step"}, 20)
    # configs from before schedulers were plugins name none: cosine
    assert isinstance(build_scheduler(_optimizer(), {"warmup_steps": 1}, 20), WarmupCosine)


@pytest.mark.parametrize("name", ["constant", "cosine", "wsd"])
def test_every_scheduler_composes_with_smoke_and_a_task_steps_it_once_per_optimizer_step(name):
    spec = plain(compose([f"scheduler={name}", "debug=smoke"]).cfg.scheduler)
    assert spec["name"] == name and spec["warmup_steps"] == 1  # debug=smoke's key exists in every schedule
    spec["warmup_steps"] = 3
    max_steps, seen = 12, []

    class _Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    task = ImageClassifier(model, {"name": "adamw", "lr": LR}, spec, max_steps=max_steps, num_classes=3)
    data = TensorDataset(torch.randn(64, 1, 2, 2), torch.arange(64) % 3)
    trainer = L.Trainer(
        max_steps=max_steps,
        accumulate_grad_batches=2,  # the schedule follows optimizer steps, not batches
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[_Record()],
        accelerator="cpu",
    )
    trainer.fit(task, train_dataloaders=DataLoader(data, batch_size=2))
    assert seen[::2] == seen[1::2]  # both micro-batches of an optimizer step see its lr
    assert seen[::2] == _lrs(spec, max_steps, max_steps)
