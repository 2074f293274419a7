"""Fixed-point solvers: right answers per sample, honest residuals, fallbacks instead of crashes."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import LowbitError
from lowbit.plugins.layers.solvers import SOLVERS, anderson, fixed_point, get_solver, residuals

DOTTIE = 0.7390851332151607  # the fixed point of cos
NAMES = sorted(SOLVERS)
F64 = torch.float64


def contractive_linear(batch: int, dim: int, norm: float = 0.8, seed: int = 0):
    """A per-sample map z ↦ A_b z + b_b with ‖A_b‖₂ = norm, and its exact fixed point (I − A)⁻¹ b."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(batch, dim, dim, dtype=F64, generator=gen)
    A = A * (norm / torch.linalg.matrix_norm(A, ord=2))[:, None, None]  # (B, D, D)
    b = torch.randn(batch, dim, dtype=F64, generator=gen)  # (B, D)
    exact = torch.linalg.solve(torch.eye(dim, dtype=F64) - A, b)  # (B, D)
    return (lambda z: torch.bmm(A, z[:, :, None])[:, :, 0] + b), exact


@pytest.mark.parametrize("name", NAMES)
def test_cos_fixed_point_every_sample(name):
    z0 = torch.linspace(-2.0, 3.0, 12, dtype=F64).reshape(4, 3)  # (B, D), different starts
    res = SOLVERS[name](torch.cos, z0, max_iter=200, tol=1e-12, stop_mode="abs")
    assert res.converged and not res.fallback
    assert torch.allclose(res.z, torch.full_like(z0, DOTTIE), rtol=0, atol=1e-11)
    assert res.abs_res.shape == (4,) and float(res.abs_res.max()) <= 1e-12


@pytest.mark.parametrize("name", NAMES)
def test_contractive_linear_map_per_sample(name):
    f, exact = contractive_linear(batch=5, dim=8)
    res = SOLVERS[name](f, torch.zeros(5, 8, dtype=F64), max_iter=400, tol=1e-12, stop_mode="abs")
    assert res.converged and not res.fallback
    torch.testing.assert_close(res.z, exact, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", NAMES)
def test_multidimensional_state_is_per_sample(name):
    # z (B, T, C): residuals are over all non-batch dims; a batch solves like its samples one by one
    f, exact = contractive_linear(batch=3, dim=12, seed=1)
    f3 = lambda z: f(z.reshape(3, 12)).reshape(3, 4, 3)
    res = SOLVERS[name](f3, torch.zeros(3, 4, 3, dtype=F64), max_iter=400, tol=1e-12, stop_mode="abs")
    assert res.z.shape == (3, 4, 3)
    torch.testing.assert_close(res.z.reshape(3, 12), exact, rtol=0, atol=1e-10)


def test_acceleration_needs_fewer_evaluations():
    # symmetric A with eigenvalues in [-0.5, 0.97]: plain iteration needs ~log(1e-10)/log(0.97) ≈ 750 steps
    gen = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(4, 16, 16, dtype=F64, generator=gen))
    A = Q @ torch.diag_embed(torch.linspace(-0.5, 0.97, 16, dtype=F64).expand(4, 16)) @ Q.transpose(1, 2)
    b = torch.randn(4, 16, dtype=F64, generator=gen)
    f = lambda z: torch.bmm(A, z[:, :, None])[:, :, 0] + b
    z0 = torch.zeros(4, 16, dtype=F64)
    iters = {n: SOLVERS[n](f, z0, max_iter=2000, tol=1e-10, stop_mode="abs").iters for n in NAMES}
    assert iters["fixed_point"] > 600
    assert iters["anderson"] < iters["fixed_point"] / 4
    assert iters["broyden"] < iters["fixed_point"] / 10


def test_reported_residuals_and_iteration_count_are_exact():
    # f(z) = z/2 + 1 from 0: z_n = 2(1 − 2⁻ⁿ), ‖f(z_n) − z_n‖ = 2⁻ⁿ; 2⁻¹⁰ ≤ 1e-3 first at n = 10,
    # found by the 11th evaluation (z_0 ... z_10)
    f = lambda z: 0.5 * z + 1.0
    res = fixed_point(f, torch.zeros(2, 1, dtype=F64), max_iter=100, tol=1e-3, stop_mode="abs")
    assert res.iters == 11 and res.converged
    torch.testing.assert_close(res.z, torch.full((2, 1), 2 * (1 - 2.0**-10), dtype=F64))
    torch.testing.assert_close(res.abs_res, torch.full((2,), 2.0**-10, dtype=F64))
    # with tol = 0 it runs the whole budget and reports ‖f(z) − z‖ of what it returns
    g, _ = contractive_linear(batch=3, dim=5)
    res = fixed_point(g, torch.zeros(3, 5, dtype=F64), max_iter=7, tol=0.0)
    abs_res, rel_res = residuals(res.z, g(res.z))
    assert res.iters == 7 and not res.converged and len(res.trace) == 7
    torch.testing.assert_close(res.abs_res, abs_res, rtol=1e-12, atol=0)
    torch.testing.assert_close(res.rel_res, rel_res, rtol=1e-12, atol=0)
    torch.testing.assert_close(rel_res, abs_res / g(res.z).norm(dim=1), rtol=1e-6, atol=0)


def test_damping_matches_hand_iteration():
    f = lambda z: -0.9 * z + 1.0
    res = fixed_point(f, torch.zeros(1, 1, dtype=F64), max_iter=4, tol=0.0, damping=0.5, stop_mode="abs")
    z = 0.0
    for _ in range(3):  # 4 evaluations: the residual of z_3 is known after the 4th
        z = 0.5 * z + 0.5 * (-0.9 * z + 1.0)
    assert res.iters == 4
    assert res.z.item() == pytest.approx(z, abs=1e-15)  # residuals shrink, so the last iterate is the best


@pytest.mark.parametrize("name", NAMES)
def test_lowest_residual_iterate_is_kept_per_sample(name):
    calls = {"n": 0}

    def f(z):  # cos, except that the last evaluation throws sample 0 far off (a finite, bad step)
        calls["n"] += 1
        out = torch.cos(z)
        if calls["n"] == 6:
            out[0] = z[0] + 1.0
        return out

    res = SOLVERS[name](f, torch.zeros(2, 3, dtype=F64), max_iter=6, tol=0.0, stop_mode="abs")
    assert res.iters == 6
    # what is returned is the best iterate of each sample, with its own residual
    torch.testing.assert_close(res.abs_res, residuals(res.z, torch.cos(res.z))[0], rtol=1e-12, atol=0)
    assert float(res.abs_res[0]) < 0.5  # not the perturbed last step (residual √3)


@pytest.mark.parametrize("name", NAMES)
def test_nan_falls_back_and_still_converges(name):
    calls = {"n": 0}

    def f(z):
        calls["n"] += 1
        return torch.full_like(z, float("nan")) if calls["n"] == 3 else torch.cos(z)

    res = SOLVERS[name](f, torch.zeros(3, 2, dtype=F64), max_iter=200, tol=1e-10, stop_mode="abs")
    assert res.fallback and res.reason == "nan"
    assert res.converged and torch.isfinite(res.z).all()
    torch.testing.assert_close(res.z, torch.full_like(res.z, DOTTIE), rtol=0, atol=1e-9)


def test_singular_anderson_system_falls_back():
    # sample 0 starts at its fixed point: its residual history G is exactly 0, and with λ = 0 the
    # KKT system [[0, 1ᵀ], [1, GGᵀ]] is exactly singular
    def f(z):
        out = torch.cos(z)
        out[0] = z[0]
        return out

    z0 = torch.zeros(3, 2, dtype=F64)
    res = anderson(f, z0, max_iter=100, tol=1e-10, stop_mode="abs", lam=0.0)
    assert res.fallback and res.reason == "singular" and res.converged
    assert res.z[0].abs().max() == 0 and torch.allclose(res.z[1:], torch.full((2, 2), DOTTIE, dtype=F64), atol=1e-9)
    # the default (scale-relative) regularisation keeps the same batch regular
    res = anderson(f, z0, max_iter=100, tol=1e-10, stop_mode="abs")
    assert not res.fallback and res.converged


def test_near_singular_scalar_anderson_falls_back():
    # a scalar state and λ = 0: n ≥ 3 history columns of rank one make GGᵀ singular
    res = anderson(torch.cos, torch.zeros(2, 1, dtype=F64), max_iter=100, tol=1e-12, stop_mode="abs", lam=0.0)
    assert res.fallback and res.reason == "singular" and res.converged
    assert res.z.sub(DOTTIE).abs().max() < 1e-11


@pytest.mark.parametrize("name", NAMES)
def test_no_fixed_point_is_never_reported_as_solved(name):
    # z = z² + 1 has no real solution: iteration runs away, and the result must say so
    res = SOLVERS[name](lambda z: z * z + 1.0, torch.zeros(4, 3), max_iter=40, tol=1e-4)
    assert not res.converged
    assert float(res.rel_res.max()) > 0.1 and torch.isfinite(res.z).all()
    if name != "anderson":  # fixed_point and broyden run away past 1e3× the first residual
        assert res.fallback and res.reason in ("diverged", "nan")


def test_stop_mode_rel_versus_abs():
    f = lambda z: 0.5 * z + 1000.0  # fixed point 2000: relative residual is 2000× smaller than absolute
    rel = fixed_point(f, torch.zeros(1, 1, dtype=F64), max_iter=200, tol=1e-6, stop_mode="rel")
    ab = fixed_point(f, torch.zeros(1, 1, dtype=F64), max_iter=200, tol=1e-6, stop_mode="abs")
    assert rel.converged and ab.converged and rel.iters < ab.iters
    assert float(rel.rel_res.max()) <= 1e-6 < float(rel.abs_res.max())


def test_solver_runs_without_autograd_on_grad_inputs():
    w = torch.tensor(0.5, requires_grad=True)
    res = SOLVERS["anderson"](lambda z: w * z + 1.0, torch.zeros(2, 1), max_iter=50, tol=1e-6)
    assert not res.z.requires_grad and res.z.grad_fn is None
    torch.testing.assert_close(res.z, torch.full((2, 1), 2.0), rtol=1e-5, atol=0)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(LowbitError, match="unknown DEQ solver 'newton'; valid: anderson, broyden, fixed_point"):
        get_solver("newton")
    with pytest.raises(LowbitError, match="max_iter must be a positive integer, got 0"):
        fixed_point(torch.cos, torch.zeros(1, 1), max_iter=0)
    with pytest.raises(LowbitError, match="stop_mode must be 'rel' or 'abs'"):
        fixed_point(torch.cos, torch.zeros(1, 1), stop_mode="max")
    with pytest.raises(LowbitError, match="history m must be at least 2"):
        anderson(torch.cos, torch.zeros(1, 1), m=1)


@settings(max_examples=15, deadline=None)
@given(
    batch=st.integers(1, 4),
    dim=st.integers(1, 10),
    norm=st.floats(0.05, 0.9),
    seed=st.integers(0, 2**16),
    name=st.sampled_from(NAMES),
)
def test_any_contraction_is_solved(batch, dim, norm, seed, name):
    f, exact = contractive_linear(batch, dim, norm, seed)
    res = SOLVERS[name](f, torch.zeros(batch, dim, dtype=F64), max_iter=500, tol=1e-11, stop_mode="abs")
    assert res.converged
    err = float((res.z - exact).norm(dim=1).max())
    assert err <= 1e-11 / (1 - norm) * 1.01 + 1e-13  # ‖z − z*‖ ≤ ‖f(z) − z‖ / (1 − ‖A‖)
    assert math.isfinite(err)
