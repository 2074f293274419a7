"""Gaussian diffusion as pure functions: noise schedules, the forward process, DDIM sampling, and FPDM's
reallocation of a fixed-point iteration budget across timesteps.

Timesteps are t = 0 … T−1 with ᾱ_t = Π_{s≤t} (1 − β_s) (the ADM / DiT convention). Training noises
x₀ into x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε (Ho et al. 2020, eq. 4) and regresses ε. Sampling is DDIM
(Song et al. 2021, eq. 12) on an evenly spaced sub-sequence of the timesteps, down to ᾱ = 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lowbit.errors import LowbitError

__all__ = [
    "BUDGET_SCHEDULES",
    "SCHEDULES",
    "cosine_alpha_bar",
    "ddim_sample",
    "ddim_step",
    "ddim_timesteps",
    "iteration_budget",
    "noise_schedule",
    "q_sample",
]

SCHEDULES = ("cosine", "linear")
BUDGET_SCHEDULES = ("constant", "increasing", "decreasing")
_COSINE_S = 0.008  # Nichol & Dhariwal's offset, so β is not tiny near t = 0
_MAX_BETA = 0.999  # and their clip, so the last steps stay invertible


def cosine_alpha_bar(u: torch.Tensor, s: float = _COSINE_S) -> torch.Tensor:
    """f(u) / f(0) with f(u) = cos²((u + s)/(1 + s) · π/2), u = t/T in [0, 1] (Nichol & Dhariwal 2021, eq. 17)."""
    f = lambda v: torch.cos((v + s) / (1 + s) * math.pi / 2) ** 2
    return f(u) / f(torch.zeros_like(u))


def noise_schedule(kind: str, timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """β_t for t = 0 … T−1 in float64.

    ``linear``: evenly from β_start to β_end (Ho et al. 2020 §4: 1e-4 → 0.02 for T = 1000), both scaled by
    1000/T so any T keeps the same signal-to-noise path (Nichol & Dhariwal 2021, ADM's ``get_named_beta_schedule``).
    ``cosine``: β_t = min(1 − ᾱ((t+1)/T)/ᾱ(t/T), 0.999) with ᾱ of ``cosine_alpha_bar`` (Nichol & Dhariwal 2021, §3.2).
    """
    if kind not in SCHEDULES:
        raise LowbitError(f"unknown task.schedule '{kind}'; valid: {', '.join(SCHEDULES)}")
    if isinstance(timesteps, bool) or not isinstance(timesteps, int) or timesteps < 2:
        raise LowbitError(f"task.timesteps must be an integer >= 2, got {timesteps!r}")
    if kind == "linear":
        scale = 1000 / timesteps
        return torch.linspace(scale * beta_start, scale * beta_end, timesteps, dtype=torch.float64).clamp(max=_MAX_BETA)
    u = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps  # (T+1,)
    alpha_bar = cosine_alpha_bar(u)
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=_MAX_BETA)


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε for x₀, ε (B, ...) and t (B,) (Ho et al. 2020, eq. 4)."""
    a = alphas_cumprod.to(x0.device)[t].to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))  # (B, 1, ...)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def ddim_timesteps(timesteps: int, steps: int) -> list[int]:
    """``steps`` timesteps evenly spaced over [0, T−1], largest first (DDIM's sub-sequence τ, Song et al. 2021 §4.2)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= timesteps:
        raise LowbitError(f"sampling steps must be an integer in [1, {timesteps}] (task.timesteps), got {steps!r}")
    if steps == 1:
        return [timesteps - 1]
    ts = torch.linspace(0, timesteps - 1, steps, dtype=torch.float64).round().long().tolist()
    return sorted(set(ts), reverse=True)


def ddim_step(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    alpha_bar_t: float,
    alpha_bar_prev: float,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    clip: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step (Song et al. 2021, eq. 12): (x_prev, x̂₀).

    x̂₀ = (x_t − √(1−ᾱ_t) ε̂)/√ᾱ_t,  σ = η √((1−ᾱ_prev)/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_prev),
    x_prev = √ᾱ_prev x̂₀ + √(1−ᾱ_prev−σ²) ε̂ + σ z.  η = 0: deterministic DDIM; η = 1: DDPM's posterior variance.
    ``clip`` = (lo, hi) clamps x̂₀ to the data range and re-derives ε̂ from it (ADM's ``clip_denoised``).
    """
    x0 = (x_t - math.sqrt(1 - alpha_bar_t) * eps) / math.sqrt(alpha_bar_t)
    if clip is not None:
        x0 = x0.clamp(*clip)
        eps = (x_t - math.sqrt(alpha_bar_t) * x0) / math.sqrt(1 - alpha_bar_t)
    sigma = eta * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)) * math.sqrt(1 - alpha_bar_t / alpha_bar_prev)
    x_prev = math.sqrt(alpha_bar_prev) * x0 + math.sqrt(max(1 - alpha_bar_prev - sigma**2, 0.0)) * eps
    if sigma > 0:
        if noise is None:
            raise LowbitError("ddim_step with eta > 0 needs noise for the stochastic part")
        x_prev = x_prev + sigma * noise
    return x_prev, x0


def ddim_sample(
    eps_fn: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
    x_T: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    steps: int,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    clip: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Run DDIM from x_T (B, ...) down to x̂₀; ``eps_fn(x_t, t (B,), step_index)`` predicts ε (Song et al. 2021, §4).

    The last step goes to ᾱ = 1, so it returns the final x̂₀. η > 0 draws z from ``generator``;
    ``clip`` = (lo, hi) keeps every x̂₀ in the data range (see ``ddim_step``).
    """
    if eta < 0:
        raise LowbitError(f"task.eta must be >= 0, got {eta}")
    alphas_cumprod = alphas_cumprod.double().cpu()
    ts = ddim_timesteps(len(alphas_cumprod), steps)
    x = x_T
    for i, t in enumerate(ts):
        t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        eps = eps_fn(x, t_batch, i).to(x.dtype)
        prev = float(alphas_cumprod[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        noise = None
        if eta > 0 and i + 1 < len(ts):
            noise = torch.randn(x.shape, generator=generator, device="cpu").to(x.device, x.dtype)
        x, _ = ddim_step(x, eps, float(alphas_cumprod[t]), prev, eta if i + 1 < len(ts) else 0.0, noise, clip)
    return x


def iteration_budget(
    budget: int, steps: int, schedule: str = "constant", ratio: tuple[float, float] = (0.5, 1.5)
) -> list[int]:
    """Fixed-point iterations per sampling step, largest timestep first, summing to ``budget`` exactly.

    FPDM §3.3 ("smoothing computation across timesteps") spreads a fixed total over timesteps: every
    step gets one iteration, and the other budget − steps go in proportion to weights linear in the
    timestep from ratio[0] to ratio[1] (``increasing``: more iterations at larger t, i.e. early, noisy
    steps), the reverse (``decreasing``), or equal (``constant``), as the authors' ``LinearController``.
    Rounding is by largest remainder, so the sum is exact.
    """
    if schedule not in BUDGET_SCHEDULES:
        raise LowbitError(f"unknown iteration schedule '{schedule}'; valid: {', '.join(BUDGET_SCHEDULES)}")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < steps:
        raise LowbitError(
            f"fixed-point iteration budget must be an integer >= the number of sampling steps ({steps}), got {budget!r}"
        )
    lo, hi = ratio
    by_t = torch.linspace(lo, hi, steps, dtype=torch.float64)  # smallest t first
    if schedule == "constant":
        by_t = torch.ones(steps, dtype=torch.float64)
    elif schedule == "decreasing":
        by_t = by_t.flip(0)
    weights = by_t.flip(0)  # largest t first: the sampling order
    share = (budget - steps) * weights / weights.sum()
    counts = share.floor().long()
    left = budget - steps - int(counts.sum())
    remainder = (share - counts).tolist()
    # the leftovers go to the largest remainders; ties to the larger share, so the two linear schedules mirror
    order = sorted(range(steps), key=lambda i: (-remainder[i], -float(share[i]), i))
    counts[order[:left]] += 1
    return [1 + int(c) for c in counts]
