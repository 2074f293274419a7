"""Diffusion math: schedules against their closed forms, the forward process, DDIM recovering x₀ with the
true noise, the timestep sub-sequence, and FPDM's iteration budget reallocation."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import LowbitError
from lowbit.tasks.ddpm import (
    cosine_alpha_bar,
    ddim_sample,
    ddim_step,
    ddim_timesteps,
    iteration_budget,
    noise_schedule,
    q_sample,
)


@pytest.mark.parametrize("T", [10, 1000])
def test_cosine_alpha_bar_is_the_closed_form(T):
    alpha_bar = torch.cumprod(1 - noise_schedule("cosine", T), 0)
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2
    for t in range(T - 1):  # the last β is clipped to 0.999 (ᾱ_{T−1} would be exactly 0)
        assert alpha_bar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9, abs=1e-15)
    assert noise_schedule("cosine", T)[-1].item() == 0.999
    torch.testing.assert_close(cosine_alpha_bar(torch.tensor([0.0, 0.5])), torch.tensor([1.0, f(T / 2) / f(0)]))


@pytest.mark.parametrize("T", [50, 1000])
def test_linear_alpha_bar_is_the_product_of_the_scaled_betas(T):
    scale = 1000 / T
    betas = [scale * 1e-4 + (scale * 0.02 - scale * 1e-4) * s / (T - 1) for s in range(T)]
    alpha_bar = torch.cumprod(1 - noise_schedule("linear", T), 0)
    prod = 1.0
    for t, beta in enumerate(betas):
        prod *= 1 - beta
        assert alpha_bar[t].item() == pytest.approx(prod, rel=1e-9)
    assert alpha_bar[-1].item() < 1e-4  # the chain ends (almost) at pure noise, whatever T


def test_q_sample_is_the_forward_process():
    alphas_cumprod = torch.cumprod(1 - noise_schedule("cosine", 100), 0)
    x0, noise, t = torch.randn(4, 1, 3, 3), torch.randn(4, 1, 3, 3), torch.tensor([0, 10, 50, 99])
    want = torch.stack(
        [alphas_cumprod[s].sqrt() * x0[i] + (1 - alphas_cumprod[s]).sqrt() * noise[i] for i, s in enumerate(t)]
    )
    torch.testing.assert_close(q_sample(x0, t, noise, alphas_cumprod), want.float())


@pytest.mark.parametrize(("eta", "steps"), [(0.0, 10), (0.0, 100), (1.0, 7)])
def test_ddim_with_the_true_noise_recovers_x0_exactly(eta, steps):
    torch.manual_seed(0)
    T = 100
    alphas_cumprod = torch.cumprod(1 - noise_schedule("linear", T), 0)
    x0 = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    x_T = q_sample(x0, torch.full((5,), T - 1), torch.randn_like(x0), alphas_cumprod)

    def true_eps(x, t, i):  # the noise that makes x the forward process of x0 at t
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    out = ddim_sample(true_eps, x_T, alphas_cumprod, steps, eta, torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-9)


def test_ddim_step_formula_and_clipping():
    x_t, eps = torch.tensor([[0.3, -2.0]]), torch.tensor([[0.5, 0.1]])
    a_t, a_prev, eta, z = 0.4, 0.7, 0.5, torch.tensor([[1.0, -1.0]])
    x_prev, x0 = ddim_step(x_t, eps, a_t, a_prev, eta, z)
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)
    x0_want = (x_t - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    torch.testing.assert_close(x0, x0_want)
    torch.testing.assert_close(x_prev, math.sqrt(a_prev) * x0_want + math.sqrt(1 - a_prev - sigma**2) * eps + sigma * z)
    _, clipped = ddim_step(x_t, eps, a_t, a_prev, clip=(-1.0, 1.0))
    assert clipped.min() >= -1 and clipped.max() <= 1
    with pytest.raises(LowbitError, match="eta > 0 needs noise"):
        ddim_step(x_t, eps, a_t, a_prev, eta=0.5)


def test_ddim_timesteps():
    assert ddim_timesteps(1000, 5) == [999, 749, 500, 250, 0]
    assert ddim_timesteps(10, 10) == list(range(9, -1, -1)) and ddim_timesteps(10, 1) == [9]
    for bad in (0, 11, 2.5):
        with pytest.raises(LowbitError, match=r"sampling steps must be an integer in \[1, 10\]"):
            ddim_timesteps(10, bad)


def test_bad_schedules_are_clear_errors():
    with pytest.raises(LowbitError, match="unknown task.schedule 'sqrt'; valid: cosine, linear"):
        noise_schedule("sqrt", 10)
    with pytest.raises(LowbitError, match="task.timesteps must be an integer >= 2, got 1"):
        noise_schedule("linear", 1)
    with pytest.raises(
        LowbitError, match="unknown iteration schedule 'random'; valid: constant, increasing, decreasing"
    ):
        iteration_budget(10, 5, "random")
    with pytest.raises(LowbitError, match=r"budget must be an integer >= the number of sampling steps \(5\), got 4"):
        iteration_budget(4, 5)


@settings(max_examples=60, deadline=None)
@given(
    steps=st.integers(1, 60),
    extra=st.integers(0, 500),
    schedule=st.sampled_from(["constant", "increasing", "decreasing"]),
)
def test_iteration_budget_sums_to_the_budget(steps, extra, schedule):
    counts = iteration_budget(steps + extra, steps, schedule)
    assert len(counts) == steps and sum(counts) == steps + extra and min(counts) >= 1
    if schedule == "increasing":  # largest t first: non-increasing along the sampling order, up to rounding
        assert all(a >= b - 1 for a, b in zip(counts, counts[1:]))
    if schedule == "decreasing":
        assert all(a <= b + 1 for a, b in zip(counts, counts[1:]))
    if schedule == "constant":
        assert max(counts) - min(counts) <= 1


def test_iteration_budget_follows_the_linear_weights():
    # 4 steps, 4 + 20 iterations: the 20 go as 20·w/Σw with w = 1.5, 1.1667, 0.8333, 0.5 (largest t first)
    assert iteration_budget(24, 4, "increasing") == [1 + 8, 1 + 6, 1 + 4, 1 + 2]  # 7.5, 5.83, 4.17, 2.5 → rounded
    assert iteration_budget(24, 4, "decreasing") == [3, 5, 7, 9]
    assert iteration_budget(24, 4, "constant") == [6, 6, 6, 6]
