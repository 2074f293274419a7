"""Diffusion task: guidance by formula, EMA in validation and sampling, a short fit that learns, writes sample
grids and reports FID in the closing validation only, and clear errors."""

import csv
import math

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lowbit.errors import LowbitError
from lowbit.metrics import fid as fid_module
from lowbit.models.dit import DiT
from lowbit.registry import registry
from lowbit.tasks.diffusion import Diffusion

OPTIMIZER = {"name": "adamw", "lr": 3e-3, "weight_decay": 0.0}
SCHEDULER = {"warmup_steps": 1, "min_lr_ratio": 1.0}
SHAPE = {"image_size": 8, "in_chans": 1, "num_classes": 10}


class _ClassNoise(nn.Module):
    """ε̂ = 3 for a real class, 1 for the null class, everywhere: guidance is then visible in one number."""

    num_classes, null_class = 10, 10

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))  # something to train (and for the EMA to average)

    def forward(self, x, t, y):
        return torch.where((y == 10).view(-1, 1, 1, 1), 1.0, 3.0).expand_as(x).clone()


def _tiny_dit(seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    return DiT(**SHAPE, patch_size=2, dim=32, n_layers=2, n_heads=2, posenc="rope")


def test_classifier_free_guidance_is_uncond_plus_scale_times_the_difference():
    task = Diffusion(
        _ClassNoise(), OPTIMIZER, SCHEDULER, 1, **SHAPE, schedule="linear", timesteps=10, sample_steps=1, clip_x0=False
    )
    alphas = task.alphas_cumprod
    for scale, want in ((1.0, 3.0), (0.0, 1.0), (1.5, 4.0), (3.0, 7.0)):
        images, stats = task.sample(torch.arange(4), steps=1, guidance_scale=scale, use_ema=False)
        x_T = torch.randn((4, 1, 8, 8), generator=torch.Generator().manual_seed(0))
        eps = (x_T - alphas[9].sqrt() * images) / (1 - alphas[9]).sqrt()  # invert the one DDIM step to ᾱ = 1
        torch.testing.assert_close(eps, torch.full_like(eps, want), rtol=0, atol=1e-4)
        assert stats.steps == 1


def test_validation_and_sampling_use_the_ema_weights():
    model = _tiny_dit()
    task = Diffusion(model, OPTIMIZER, SCHEDULER, 1, **SHAPE, timesteps=100, ema_warmup=False, clip_x0=False)
    with torch.no_grad():  # the EMA stays at the initial weights, the model moves away
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x0, y = torch.randn(6, 1, 8, 8), torch.arange(6)
    task.validation_step((x0, y), batch_idx=3)
    got = task.val_loss.compute()
    gen = torch.Generator().manual_seed(3)  # validation's fixed draws for batch 3
    t, noise = torch.randint(0, 100, (6,), generator=gen), torch.randn(x0.shape, generator=gen)
    with task.ema.swapped(model):
        want = task._noise_loss(x0, y, t, noise)
    raw = task._noise_loss(x0, y, t, noise)
    torch.testing.assert_close(got, want)
    assert not torch.isclose(got, raw)
    ema_images, _ = task.sample(torch.arange(3), steps=3)
    with task.ema.swapped(model):
        want_images, _ = task.sample(torch.arange(3), steps=3, use_ema=False)
    torch.testing.assert_close(ema_images, want_images, rtol=0, atol=0)


def test_a_short_fit_learns_writes_grids_and_reports_fid_at_the_end(tmp_path, monkeypatch):
    calls = []

    def fast_feature_net(datamodule, cache_dir=None, echo=None):  # no 10-second training in a unit test
        calls.append(datamodule)
        torch.manual_seed(0)
        return fid_module.FeatureNet(1, 10).eval().requires_grad_(False)

    monkeypatch.setattr(fid_module, "feature_net", fast_feature_net)
    data = registry.build("data", {"name": "digits", "image_size": 8, "batch_size": 32, "val_batch_size": 512}, seed=1)
    task = Diffusion(
        _tiny_dit(),
        OPTIMIZER,
        SCHEDULER,
        40,
        **SHAPE,
        timesteps=100,
        sample_steps=4,
        samples_per_class=2,
        fid_samples=30,
    )
    trainer = L.Trainer(
        max_steps=40,
        val_check_interval=20,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=1,
        logger=CSVLogger(tmp_path, name="csv", version=""),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        accelerator="cpu",
    )
    trainer.fit(task, datamodule=data)
    final = trainer.validate(task, datamodule=data, verbose=False)[0]
    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert len(val) == 3 and val[1] < val[0] < 0.95  # fresh: ε̂ = 0, loss ≈ E ε² = 1
    assert not any(r.get("val/fid") for r in rows[:-1])  # no FID during the fit
    assert math.isfinite(final["val/fid"]) and final["val/fid"] > 0 and len(calls) == 1
    # val/fid is the Fréchet distance (Heusel et al. 2017, eq. 6) between the feature net's features of the
    # validation split and of 30 images the EMA model samples from the task's FID seed, labels cycling over classes
    torch.manual_seed(0)
    net = fid_module.FeatureNet(1, 10).eval().requires_grad_(False)  # the one fast_feature_net gave the task
    fake, _ = task.sample(torch.arange(30) % 10, generator=torch.Generator().manual_seed(task.sample_seed + 1))
    real, _ = fid_module.stack_dataset(data.val_set)
    with torch.no_grad():
        f_r, f_g = net(real).double().numpy(), net(fake.float()).double().numpy()  # (N, 64) each
    cov_r, cov_g = np.cov(f_r, rowvar=False), np.cov(f_g, rowvar=False)
    # tr √(Σr·Σg) = Σ √λ over the product's eigenvalues (real, ≥ 0; 30 samples leave many at 0)
    trace_sqrt = np.sqrt(np.linalg.eigvals(cov_r @ cov_g).real.clip(min=0)).sum()
    want = ((f_r.mean(0) - f_g.mean(0)) ** 2).sum() + np.trace(cov_r + cov_g) - 2 * trace_sqrt
    assert final["val/fid"] == pytest.approx(want, rel=1e-4)
    assert final["val/sample_block_evals"] == 4 * 2  # 4 DDIM steps through 2 blocks
    grids = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert grids == ["step-000020.png", "step-000040.png"]  # the closing validation reused step 40's grid
    from PIL import Image

    with Image.open(tmp_path / "samples" / "step-000040.png") as img:  # 10 rows × 2 columns of 32-px digits
        assert img.size == (2 + 2 * 34, 2 + 10 * 34)
    assert int(task.ema.updates) == 40


def test_bad_options_are_clear_errors():
    with pytest.raises(LowbitError, match="the model has 10 classes but task.num_classes is 5"):
        Diffusion(_tiny_dit(), OPTIMIZER, SCHEDULER, 1, image_size=8, in_chans=1, num_classes=5)
    with pytest.raises(LowbitError, match=r"sampling steps must be an integer in \[1, 100\]"):
        Diffusion(_tiny_dit(), OPTIMIZER, SCHEDULER, 1, **SHAPE, timesteps=100, sample_steps=200)
    with pytest.raises(LowbitError, match="unknown task.fp_schedule 'cosine'; valid: constant, increasing, decreasing"):
        Diffusion(_tiny_dit(), OPTIMIZER, SCHEDULER, 1, **SHAPE, fp_schedule="cosine")
    with pytest.raises(LowbitError, match=r"budget must be an integer >= the number of sampling steps \(25\), got 10"):
        Diffusion(_tiny_dit(), OPTIMIZER, SCHEDULER, 1, **SHAPE, fp_budget=10)
    with pytest.raises(LowbitError, match="task.guidance_scale must be >= 0"):
        Diffusion(_tiny_dit(), OPTIMIZER, SCHEDULER, 1, **SHAPE, guidance_scale=-1.0)
    task = Diffusion(_tiny_dit(), OPTIMIZER, SCHEDULER, 1, **SHAPE)
    with pytest.raises(LowbitError, match="task.fid_samples > 0 needs an image data module"):
        task.fid(10)
