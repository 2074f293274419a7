"""Class-conditional image diffusion: DDPM noise-prediction training, DDIM sampling with classifier-free
guidance from EMA weights, validation loss, sample grids and FID.

Training (Ho et al. 2020, Alg. 1): t ~ U{0, …, T−1}, ε ~ N(0, I), x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε, loss
‖ε − ε̂(x_t, t, y)‖² (mean). The model drops labels to its null class itself (``class_dropout``).
Sampling: DDIM (Song et al. 2021, eq. 12) with ``sample_steps`` steps and ``eta``, guided as
ε̂ = ε̂(x, ∅) + s (ε̂(x, y) − ε̂(x, ∅)) (Ho & Salimans 2022, eq. 6) with s = ``guidance_scale``.
Validation and sampling use the EMA weights. For a fixed-point model (FPDM) the sampler reuses each
timestep's solution as the next one's initial guess (``warm_start``, FPDM §3.3) and can spread a
total of ``fp_budget`` solver iterations over the timesteps (``fp_schedule``: constant, increasing,
decreasing; FPDM §3.3 and ``ddpm.iteration_budget``).

Logged: ``train/loss``, ``lr``, ``deq/*`` (fixed-point models: iterations, residuals, fallbacks); ``val/loss``
(fixed t and ε per batch, so validations compare), ``val/deq_iters`` and ``val/deq_rel_res`` (fixed-point
models), ``val/sample_block_evals`` (transformer blocks one sample trajectory costs);
``val/fid`` against the validation split (``lowbit.metrics.fid``) in the run's final validation, or at
every validation with ``fid_during_fit``. Sample grids (a row per class) go to
``<run_dir>/samples/step-NNNNNN.png`` and to W&B when a WandbLogger is attached.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from lowbit.errors import LowbitError
from lowbit.tasks.base import Task
from lowbit.tasks.ddpm import BUDGET_SCHEDULES, ddim_sample, ddim_timesteps, iteration_budget, noise_schedule, q_sample
from lowbit.tasks.ema import EMA
from lowbit.tasks.equilibrium import flush_deq_fallbacks, log_val_deq_stats, note_deq_fallbacks, with_deq_terms
from lowbit.tasks.optim import configure
from lowbit.tasks.schedule import step_scheduler

__all__ = ["Diffusion", "SamplingStats"]


@dataclass
class SamplingStats:
    """What one sampling run cost: DDIM steps, transformer blocks per trajectory, solver iterations per step."""

    steps: int
    block_evals: int  # per sample trajectory (guidance doubles the batch, not the depth)
    fp_iters: list[int] = field(default_factory=list)  # fixed-point models: solver evaluations at each step
    fp_caps: list[int | None] = field(default_factory=list)  # the per-step iteration caps of the budget
    fp_rel_res: list[float] = field(default_factory=list)  # max relative residual of each step's solve
    fallbacks: int = 0


class Diffusion(Task):
    """Train an ε-prediction model ``model(x_t, t, y) → ε̂`` (``dit``, ``fpdm``) on labelled images.

    Args:
        model, optimizer, scheduler, max_steps: as every task (built by the run).
        image_size, in_chans, num_classes: the data's (samples are drawn at this shape).
        schedule, timesteps, beta_start, beta_end: the noise schedule (``cosine`` or ``linear``) and T.
        ema_decay, ema_warmup: the EMA of the weights used for validation and sampling.
        sample_steps, eta, guidance_scale: the DDIM sampler and classifier-free guidance scale.
        clip_x0: clamp DDIM's x̂₀ to the data's pixel range [0, 1] (standardised as the data module does).
        samples_per_class: columns of the sample grid saved at each validation.
        fid_samples, fid_during_fit: generated images for FID (0 = off); at every validation or only the final one.
        fp_budget, fp_schedule, warm_start: fixed-point models only (see the module docstring).
        sample_seed: seed of the sampling noise and of the validation t and ε.
    """

    lowbit_plugin_api = 1
    throughput_unit = "images"
    flops_per_batch: int | None = None  # set it for perf/mfu (Lightning's ThroughputMonitor); unknown by default

    def __init__(
        self,
        model: nn.Module,
        optimizer: Mapping[str, Any],
        scheduler: Mapping[str, Any],
        max_steps: int,
        *,
        image_size: int,
        in_chans: int,
        num_classes: int,
        schedule: str = "cosine",
        timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        ema_decay: float = 0.999,
        ema_warmup: bool = True,
        sample_steps: int = 25,
        eta: float = 0.0,
        guidance_scale: float = 1.5,
        clip_x0: bool = True,
        samples_per_class: int = 4,
        fid_samples: int = 256,
        fid_during_fit: bool = False,
        fp_budget: int | None = None,
        fp_schedule: str = "constant",
        warm_start: bool = True,
        sample_seed: int = 0,
    ) -> None:
        super().__init__()
        model_classes = getattr(model, "num_classes", num_classes)
        if model_classes != num_classes:
            raise LowbitError(
                f"the model has {model_classes} classes but task.num_classes is {num_classes}; make model.num_classes match the data"
            )
        if guidance_scale < 0:
            raise LowbitError(f"task.guidance_scale must be >= 0 (1 = no guidance), got {guidance_scale}")
        if fp_schedule not in BUDGET_SCHEDULES:
            raise LowbitError(f"unknown task.fp_schedule '{fp_schedule}'; valid: {', '.join(BUDGET_SCHEDULES)}")
        if fid_samples < 0 or samples_per_class < 0:
            raise LowbitError(
                f"task.fid_samples and task.samples_per_class must be >= 0, got {fid_samples} and {samples_per_class}"
            )
        self.model = model
        self.optimizer_cfg, self.scheduler_cfg, self.max_steps = dict(optimizer), dict(scheduler), max_steps
        self.image_shape = (in_chans, image_size, image_size)
        self.num_classes, self.timesteps = num_classes, timesteps
        self.register_buffer(
            "alphas_cumprod",
            torch.cumprod(1 - noise_schedule(schedule, timesteps, beta_start, beta_end), 0),
            persistent=False,
        )
        n_steps = len(ddim_timesteps(timesteps, sample_steps))  # checks sample_steps now, not at the first validation
        if fp_budget is not None:
            iteration_budget(fp_budget, n_steps, fp_schedule)  # and the budget (at least one iteration per step)
        self.sample_steps, self.eta, self.guidance_scale, self.clip_x0 = sample_steps, eta, guidance_scale, clip_x0
        self.samples_per_class, self.fid_samples, self.fid_during_fit = samples_per_class, fid_samples, fid_during_fit
        self.fp_budget, self.fp_schedule, self.warm_start = fp_budget, fp_schedule, warm_start
        self.sample_seed = sample_seed
        self.ema = EMA(model, ema_decay, ema_warmup)
        self.val_loss = MeanMetric()
        self._ema_step = -1
        self._grid_evals: float | None = None  # block evaluations of the last grid's sampling
        self._grid_path: Path | None = None  # where that grid went
        self.last_sampling: SamplingStats | None = None  # what the latest call of ``sample`` cost
        self._data: Any = None  # the data module fid(datamodule=...) was given (the bench); else the trainer's
        self._fid_cache: dict[str, Any] = {}  # the feature network lives outside the module tree: never quantized

    # ---- training --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(x, t, y)

    def _noise_loss(self, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        x_t = q_sample(x0, t, noise, self.alphas_cumprod)  # (B, C, H, W)
        return F.mse_loss(self.model(x_t, t, y).float(), noise.float())

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x0, y = batch  # (B, C, H, W), (B,)
        t, noise = self._draws(x0)
        loss = self._noise_loss(x0, y, t, noise)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)  # the global batch's mean
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return with_deq_terms(self, self.model, loss)

    def _draws(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps and noise for this rank's slice of the global batch: drawn for all ``world`` slices
        from the (same on every rank) generator, this rank's kept, so ranks draw distinct noise and a
        run on W processes draws what one process with the whole batch draws."""
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self._trainer is not None else (0, 1)
        b = x0.shape[0]
        t = torch.randint(0, self.timesteps, (world * b,), device=x0.device)[rank * b : (rank + 1) * b]
        noise = torch.randn((world * b, *x0.shape[1:]), dtype=x0.dtype, device=x0.device)[rank * b : (rank + 1) * b]
        return t, noise

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        note_deq_fallbacks(self, self.model)  # a fixed-point model's solver breakdowns, noticed every 50 steps
        if self.global_step != self._ema_step:  # once per optimizer step, also with gradient accumulation
            self._ema_step = self.global_step
            self.ema.update(self.model)

    def on_train_end(self) -> None:
        flush_deq_fallbacks(self)

    # ---- validation --------------------------------------------------------------------------------
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x0, y = batch
        gen = torch.Generator().manual_seed(self.sample_seed * 1_000_003 + batch_idx)  # the same t, ε every validation
        t = torch.randint(0, self.timesteps, (x0.shape[0],), generator=gen).to(x0.device)
        noise = torch.randn(x0.shape, generator=gen).to(x0.device, x0.dtype)
        with self.ema.swapped(self.model):
            loss = self._noise_loss(x0, y, t, noise)
        self.val_loss.update(loss, weight=x0.shape[0])
        log_val_deq_stats(self, self.model)

    def on_validation_epoch_end(self) -> None:
        self.log("val/loss", self.val_loss.compute(), prog_bar=True, sync_dist=True)  # torchmetrics' global mean
        self.val_loss.reset()
        if self.trainer.sanity_checking:
            return
        path = Path(self.trainer.default_root_dir) / "samples" / f"step-{self.global_step:06d}.png"
        if self.samples_per_class > 0 and (self._grid_evals is None or self._grid_path != path):
            # the same EMA weights at the same step give the same grid: the closing validation reuses it.
            # Every rank samples (FSDP's forward is collective), rank 0 writes.
            labels = torch.arange(self.num_classes, device=self.device).repeat_interleave(self.samples_per_class)
            images, stats = self.sample(labels)
            self._grid_evals, self._grid_path = float(stats.block_evals), path
            if self.trainer.is_global_zero:
                self._save_grid(images, path)
        # every rank samples the same labels from the same EMA weights and seeds, so each holds the same
        # value: sync_dist averages equal numbers (and Lightning does not warn that an epoch-end value is unsynced)
        if self._grid_evals is not None:
            self.log("val/sample_block_evals", self._grid_evals, sync_dist=True)
        final = self.trainer.state.fn == "validate"  # run.train's closing trainer.validate, not a validation during fit
        if self.fid_samples > 0 and (self.fid_during_fit or final):
            self.log("val/fid", self.fid(self.fid_samples), sync_dist=True)

    # ---- sampling ------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        labels: torch.Tensor,
        *,
        steps: int | None = None,
        eta: float | None = None,
        guidance_scale: float | None = None,
        fp_budget: int | None = None,
        fp_schedule: str | None = None,
        warm_start: bool | None = None,
        use_ema: bool = True,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, SamplingStats]:
        """Images (B, C, H, W) for class ``labels`` (B,) by guided DDIM, and what it cost; options default to the task's."""
        steps = self.sample_steps if steps is None else steps
        eta = self.eta if eta is None else eta
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        fp_budget = self.fp_budget if fp_budget is None else fp_budget
        fp_schedule = self.fp_schedule if fp_schedule is None else fp_schedule
        warm_start = self.warm_start if warm_start is None else warm_start
        generator = generator or torch.Generator().manual_seed(self.sample_seed)
        n_steps = len(ddim_timesteps(self.timesteps, steps))
        fixed_point = getattr(self.model, "fixed_point", False)
        caps: list[int | None] = [None] * n_steps
        if fixed_point and fp_budget is not None:
            caps = list(iteration_budget(int(fp_budget), n_steps, fp_schedule))
        stats = SamplingStats(steps=n_steps, block_evals=0, fp_caps=caps if fixed_point else [])
        state: dict[str, torch.Tensor | None] = {"z": None}
        labels = labels.to(self.device)
        null = torch.full_like(labels, getattr(self.model, "null_class", self.num_classes))

        def eps_fn(x: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
            guided = scale != 1.0
            x_in, t_in, y_in = (
                (torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null])) if guided else (x, t, labels)
            )
            if fixed_point:
                z0 = state["z"] if warm_start else None
                out, state["z"] = self.model(x_in, t_in, y_in, z0=z0, iters=caps[i], return_z=True)
                deq = self.model.deq_stats()
                stats.fp_iters.append(int(deq["deq/iters"]))
                stats.fp_rel_res.append(deq["deq/rel_res_max"])
                stats.fallbacks += int(deq["deq/fallbacks"])
                stats.block_evals += self.model.explicit_blocks + stats.fp_iters[-1]
            else:
                out = self.model(x_in, t_in, y_in)
                stats.block_evals += getattr(self.model, "blocks_per_step", 0)
            if not guided:
                return out
            cond, uncond = out.float().chunk(2)
            return uncond + scale * (cond - uncond)  # Ho & Salimans 2022, eq. 6

        x_T = torch.randn((len(labels), *self.image_shape), generator=generator).to(self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            with self._precision_context(), self.ema.swapped(self.model) if use_ema else nullcontext():
                clip = self._pixel_range() if self.clip_x0 else None
                images = ddim_sample(eps_fn, x_T, self.alphas_cumprod, steps, eta, generator, clip)
        finally:
            self.model.train(was_training)
        self.last_sampling = stats
        return images, stats

    def fid(
        self,
        n: int,
        *,
        datamodule: Any = None,
        batch_size: int = 256,
        generator: torch.Generator | None = None,
        **sample_options: Any,
    ) -> float:
        """FID of ``n`` generated images (labels cycling over the classes) against the validation split.

        ``datamodule`` defaults to the trainer's; ``sample_options`` go to ``sample`` (steps, fp_budget, ...).
        """
        from lowbit.metrics.fid import feature_net, frechet_distance, stack_dataset

        if datamodule is not None:
            self._data = datamodule
        data = self._data if self._data is not None else getattr(self._trainer, "datamodule", None)
        if data is None or not hasattr(data, "splits"):
            raise LowbitError(
                "task.fid_samples > 0 needs an image data module with train/val splits (digits, imagefolder); or set task.fid_samples=0"
            )
        net = self._fid_cache.get("net")
        if net is None:
            net = self._fid_cache["net"] = feature_net(data, echo=print)
        net = net.to(self.device)
        real, _ = stack_dataset(data.val_set)
        labels = torch.arange(n) % self.num_classes
        generator = generator or torch.Generator().manual_seed(self.sample_seed + 1)
        fake = [self.sample(chunk, generator=generator, **sample_options)[0] for chunk in labels.split(batch_size)]
        return frechet_distance(real, fake, net)

    # ---- helpers -------------------------------------------------------------------------------------
    def _precision_context(self):
        trainer = self._trainer
        return trainer.precision_plugin.forward_context() if trainer is not None else nullcontext()

    def _data_stats(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The data module's standardisation (mean, std) as (C,) tensors, or None when it has none."""
        data = self._data if self._data is not None else getattr(self._trainer, "datamodule", None)
        mean, std = getattr(data, "mean", None), getattr(data, "std", None)
        if mean is None or std is None:
            return None
        C = self.image_shape[0]
        as_tensor = lambda v: torch.tensor([float(v)] * C if isinstance(v, (int, float)) else [float(u) for u in v])
        return as_tensor(mean), as_tensor(std)

    def _pixel_range(self) -> tuple[float, float] | None:
        """Pixels 0 and 1, standardised by the data's mean/std: the range x̂₀ is clamped to."""
        stats = self._data_stats()
        if stats is None:
            return None
        mean, std = stats
        return float(((0 - mean) / std).min()), float(((1 - mean) / std).max())

    def _display(self, images: torch.Tensor) -> torch.Tensor:
        """Back to [0, 1] pixels: the data's mean/std when it has them, else each image's range."""
        stats = self._data_stats()
        if stats is not None:
            mean, std = (v.to(images.device)[:, None, None] for v in stats)
            return (images.float() * std + mean).clamp(0, 1)
        lo = images.flatten(1).min(1).values[:, None, None, None]
        hi = images.flatten(1).max(1).values[:, None, None, None]
        return (images - lo) / (hi - lo).clamp_min(1e-8)

    def _save_grid(self, images: torch.Tensor, path: Path) -> None:
        from torchvision.utils import save_image

        pixels = self._display(images).cpu()
        zoom = max(1, 32 // pixels.shape[-1])  # small digits are enlarged, nearest-neighbour
        pixels = F.interpolate(pixels, scale_factor=zoom, mode="nearest")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(pixels, path, nrow=self.samples_per_class, padding=2, pad_value=1.0)
        for logger in self.loggers:
            if type(logger).__name__ == "WandbLogger":  # by name: importing wandb stays lazy
                logger.log_image(key="samples", images=[str(path)], step=self.global_step, caption=["a row per class"])

    def configure_optimizers(self):
        return configure(self.model, self.optimizer_cfg, self.scheduler_cfg, self.max_steps)

    def lr_scheduler_step(self, scheduler, metric) -> None:
        step_scheduler(scheduler, self.global_step, metric)  # timm schedulers are stepped by the step count
