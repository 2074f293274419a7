"""DEQ layer: gradients (implicit, phantom, FPDM), memory, warm starts, fallbacks, stats, Jacobian regulariser."""

import pytest
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.plugins.layers.deq import DEQ, DEQStats, hutchinson_jacobian_frobenius
from lowbit.plugins.layers.solvers import residuals
from lowbit.registry import registry

F64 = torch.float64
SOLVER_NAMES = ["anderson", "broyden", "fixed_point"]


class TanhBlock(nn.Module):
    """f(z, x) = tanh(z Wᵀ + x Uᵀ + b) with ‖W‖₂ = ``contraction``: a contraction in z."""

    def __init__(self, dim: int = 6, contraction: float = 0.5, seed: int = 0, dtype=F64) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(dim, dim, generator=gen, dtype=dtype)
        self.W = nn.Parameter(contraction * w / torch.linalg.matrix_norm(w, ord=2))
        self.U = nn.Parameter(torch.randn(dim, dim, generator=gen, dtype=dtype) / dim**0.5)
        self.b = nn.Parameter(0.1 * torch.randn(dim, generator=gen, dtype=dtype))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.b)


class LinearBlock(nn.Module):
    """f(z, x) = z Aᵀ + x: its Jacobian in z is A."""

    def __init__(self, A: torch.Tensor) -> None:
        super().__init__()
        self.A = nn.Parameter(A.clone())

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return z @ self.A.T + x


class FlakyBlock(TanhBlock):
    """A TanhBlock whose ``nan_at``-th call returns NaN (a solver step that blows up)."""

    def __init__(self, nan_at: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.nan_at, self.calls = nan_at, 0

    def forward(self, z, x):
        self.calls += 1
        out = super().forward(z, x)
        return out * float("nan") if self.calls == self.nan_at else out


def inputs(batch: int = 3, dim: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed), dtype=F64)


def saved_bytes(fn):
    """Bytes autograd saves for backward while ``fn`` runs, and fn's result."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total, out


# ---- construction ----------------------------------------------------------------------------------
def test_registry_builds_deq():
    block = TanhBlock()
    deq = registry.build("layers", {"name": "deq", "solver": "anderson"}, f=block)
    assert isinstance(deq, DEQ) and deq.f is block and deq.solver == "anderson"
    assert DEQ.lowbit_plugin_api == 1
    with torch.no_grad():
        z = deq(inputs())
    torch.testing.assert_close(z, block(z, inputs()), rtol=0, atol=1e-2)  # default rel tol 1e-3
    with pytest.raises(LowbitError, match="has no option 'solvr'"):
        registry.build("layers", {"name": "deq", "solvr": "anderson"}, f=block)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"solver": "newton"}, r"unknown DEQ solver 'newton'; valid: anderson, broyden, fixed_point"),
        ({"backward_solver": "lbfgs"}, r"unknown DEQ backward_solver 'lbfgs'; valid: anderson, broyden, fixed_point"),
        ({"max_iter": 0}, r"max_iter must be a positive integer, got 0"),
        ({"max_iter": -5}, r"max_iter must be a positive integer, got -5"),
        ({"backward_max_iter": 0}, r"backward_max_iter must be a positive integer, got 0"),
        ({"grad": "unrolled"}, r"grad 'unrolled' is not valid; valid: implicit, phantom, fpdm"),
        ({"stop_mode": "max"}, r"stop_mode 'max' is not valid; valid: rel, abs"),
        ({"tol": -1e-3}, r"tol must be a finite number >= 0, got -0.001"),
        ({"phantom_damping": 0.0}, r"phantom_damping must be in \(0, 1\], got 0.0"),
        ({"grad_iters_range": (0, 3)}, r"grad_iters_range must be \[lo, hi\] integers with 1 <= lo <= hi"),
        ({"nograd_iters_range": (5, 2)}, r"nograd_iters_range must be \[lo, hi\] integers with 0 <= lo <= hi"),
        ({"anderson_m": 1}, r"anderson_m must be an integer >= 2, got 1"),
        ({"jac_reg_dist": "uniform"}, r"jac_reg_dist 'uniform' is not valid; valid: rademacher, gaussian"),
    ],
)
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(LowbitError, match=message) as err:
        DEQ(TanhBlock(), **options)
    assert "\n" not in str(err.value)


def test_block_must_keep_the_shape_of_z():
    deq = DEQ(lambda z, x: z.sum(dim=1), solver="fixed_point")
    with pytest.raises(LowbitError, match=r"must return a tensor shaped like z \(3, 6\), got \(3,\)"):
        deq(inputs())


def test_tuple_injection_and_input_initialisation():
    # f(z, (x, gain)): extra conditioning rides along with x; init="input" starts from x[0] = x
    block = TanhBlock()
    x, gain = inputs(), torch.tensor(0.5, dtype=F64, requires_grad=True)
    f = lambda z, xs: block(z, xs[0]) * xs[1]
    deq = DEQ(f, solver="fixed_point", max_iter=1, tol=0.0, init="input")
    out = deq((x, gain))
    torch.testing.assert_close(deq.last_z, x)  # one evaluation: the start is what comes back
    torch.autograd.grad(out.sum(), gain)  # gradient reaches a tensor inside the tuple


# ---- gradients -----------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_implicit_gradient_equals_long_unrolled_autograd(solver):
    block, x = TanhBlock(), inputs().requires_grad_()
    weight = inputs(seed=2)  # loss = Σ weight ⊙ z*
    deq = DEQ(block, solver=solver, max_iter=100, tol=1e-13, stop_mode="abs", backward_tol=1e-13)
    out = deq(x)
    params = [block.W, block.U, block.b, x]
    implicit = torch.autograd.grad((weight * out).sum(), params)

    z = torch.zeros_like(x)
    for _ in range(200):  # 0.5²⁰⁰: fully converged, differentiated step by step
        z = block(z, x)
    unrolled = torch.autograd.grad((weight * z).sum(), params)
    for got, want in zip(implicit, unrolled):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        assert (got - want).abs().max() < 1e-10  # in fact to solver precision
    stats = deq.last_stats
    assert stats.converged and stats.bwd_iters is not None and 0 < stats.bwd_iters <= 100
    assert stats.bwd_abs_res_max <= 1e-13


def test_implicit_backward_solver_options_are_its_own():
    block, x = TanhBlock(), inputs().requires_grad_()
    deq = DEQ(block, solver="broyden", max_iter=50, tol=1e-12, backward_solver="fixed_point", backward_max_iter=3)
    deq(x).sum().backward()
    assert deq.last_stats.bwd_iters == 3 and deq.stats_dict()["deq/bwd_iters"] == 3.0


def test_phantom_one_step_is_the_hand_formula():
    # z1 = (1−τ) z* + τ f(z*, x) with z* detached, f = tanh(a), a = z* Wᵀ + x Uᵀ + b, L = Σ c ⊙ z1:
    # ∂L/∂a = τ c ⊙ (1 − f²); ∂L/∂W = (∂L/∂a)ᵀ z*, ∂L/∂U = (∂L/∂a)ᵀ x, ∂L/∂b = Σ_batch ∂L/∂a, ∂L/∂x = (∂L/∂a) U
    tau = 0.3
    block, x, c = TanhBlock(), inputs().requires_grad_(), inputs(seed=3)
    deq = DEQ(block, solver="anderson", max_iter=100, tol=1e-12, grad="phantom", phantom_steps=1, phantom_damping=tau)
    z1 = deq(x)
    z_star = deq.last_z  # the solver's fixed point
    grads = torch.autograd.grad((c * z1).sum(), [block.W, block.U, block.b, x])
    with torch.no_grad():
        fz = torch.tanh(z_star @ block.W.T + x @ block.U.T + block.b)
        torch.testing.assert_close(z1, (1 - tau) * z_star + tau * fz)
        dL_da = tau * c * (1 - fz**2)  # (B, D)
        want = [dL_da.T @ z_star, dL_da.T @ x, dL_da.sum(0), dL_da @ block.U]
    for got, ref in zip(grads, want):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    assert deq.last_stats.grad_iters == 1


def test_phantom_k_steps_approach_the_implicit_gradient():
    block, x = TanhBlock(), inputs().requires_grad_()
    implicit = torch.autograd.grad(DEQ(block, tol=1e-12)(x).sum(), block.W)[0]
    errors = []
    for k in (1, 4, 16):
        deq = DEQ(block, tol=1e-12, grad="phantom", phantom_steps=k, phantom_damping=1.0)
        phantom = torch.autograd.grad(deq(x).sum(), block.W)[0]
        errors.append(float((phantom - implicit).norm() / implicit.norm()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-4  # Neumann series 1 + J + ... + J^{k−1}


# ---- memory ---------------------------------------------------------------------------------------
def test_implicit_memory_does_not_grow_with_iterations():
    block, x = TanhBlock(dim=16), inputs(dim=16, batch=8).requires_grad_()
    sizes = {}
    for iters in (10, 100):
        deq = DEQ(block, solver="anderson", max_iter=iters, tol=0.0, backward_max_iter=5)
        sizes[iters], out = saved_bytes(lambda deq=deq: deq(x))
        assert deq.last_stats.iters == iters  # tol = 0: every iteration ran
        out.sum().backward()
    assert sizes[10] == sizes[100] > 0

    def unrolled(iters):
        z = torch.zeros_like(x)
        for _ in range(iters):
            z = block(z, x)
        return z

    unrolled_10, _ = saved_bytes(lambda: unrolled(10))
    unrolled_100, _ = saved_bytes(lambda: unrolled(100))
    assert unrolled_100 > 9 * unrolled_10 and unrolled_10 > sizes[10]


def test_phantom_and_fpdm_memory_grows_with_grad_steps_only():
    block, x = TanhBlock(dim=16), inputs(dim=16, batch=8)
    size = {}
    for key, options in {
        "phantom2": {"grad": "phantom", "phantom_steps": 2},
        "phantom2_long": {"grad": "phantom", "phantom_steps": 2, "max_iter": 100},
        "phantom4": {"grad": "phantom", "phantom_steps": 4},
        "phantom8": {"grad": "phantom", "phantom_steps": 8},
        "fpdm_n3": {"grad": "fpdm", "nograd_iters_range": (3, 3), "grad_iters_range": (2, 2)},
        "fpdm_n30": {"grad": "fpdm", "nograd_iters_range": (30, 30), "grad_iters_range": (2, 2)},
    }.items():
        deq = DEQ(block, tol=0.0, **{"max_iter": 10, **options}).train()
        size[key], _ = saved_bytes(lambda deq=deq: deq(x))
    assert size["phantom2"] == size["phantom2_long"] == size["fpdm_n3"] == size["fpdm_n30"]
    per_step = (size["phantom4"] - size["phantom2"]) / 2  # linear in k, independent of max_iter
    assert per_step > 0 and size["phantom8"] - size["phantom2"] == 6 * per_step


# ---- FPDM stochastic training ----------------------------------------------------------------------
def test_fpdm_training_step_is_n_nograd_then_m_grad_iterations():
    block, x = TanhBlock(), inputs()
    deq = DEQ(block, solver="fixed_point", tol=0.0, grad="fpdm", nograd_iters_range=(3, 3), grad_iters_range=(2, 2))
    out = deq.train()(x)
    z = torch.zeros_like(x)
    with torch.no_grad():
        for _ in range(3):
            z = block(z, x)
    ref = block(block(z, x), x)  # two steps with gradient from the detached iterate
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    params = [block.W, block.U, block.b]
    for got, want in zip(torch.autograd.grad(out.sum(), params), torch.autograd.grad(ref.sum(), params)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    stats = deq.last_stats
    assert stats.iters == 5 and stats.grad_iters == 2 and stats.grad == "fpdm"
    z1 = block(z, x).detach()  # residual reported at the input of the last step
    torch.testing.assert_close(torch.tensor(stats.abs_res_max, dtype=F64), residuals(z1, ref.detach())[0].max())


def test_fpdm_iteration_counts_are_uniform_over_the_ranges():
    torch.manual_seed(0)
    deq = DEQ(
        TanhBlock(), solver="fixed_point", tol=0.0, grad="fpdm", nograd_iters_range=(0, 4), grad_iters_range=(1, 3)
    )
    deq.train()
    seen_n, seen_m = [], []
    for _ in range(80):
        deq(inputs())
        seen_m.append(deq.last_stats.grad_iters)
        seen_n.append(deq.last_stats.iters - deq.last_stats.grad_iters)
    assert set(seen_n) == {0, 1, 2, 3, 4} and set(seen_m) == {1, 2, 3}


def test_fpdm_outside_training_solves_to_tolerance():
    block, x = TanhBlock(), inputs()
    deq = DEQ(block, solver="anderson", tol=1e-10, max_iter=60, grad="fpdm", nograd_iters_range=(0, 1)).eval()
    with torch.no_grad():
        z = deq(x)
        fz = block(z, x)
    assert deq.last_stats.converged and deq.last_stats.grad_iters == 0
    assert float((fz - z).norm(dim=1).div(fz.norm(dim=1)).max()) <= 1e-10


# ---- warm start ----------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_warm_start_from_previous_solution_needs_fewer_iterations(solver):
    block = TanhBlock(contraction=0.9)
    x = inputs()
    x_next = x + 1e-3 * inputs(seed=7)  # the next, slightly different problem (next diffusion timestep)
    deq = DEQ(block, solver=solver, max_iter=200, tol=1e-10, stop_mode="abs")
    with torch.no_grad():
        deq(x)
        previous = deq.last_z
        deq(x_next)
        cold = deq.last_stats.iters
        z_warm = deq(x_next, z0=previous)
        warm = deq.last_stats.iters
        assert float((block(z_warm, x_next) - z_warm).norm(dim=1).max()) <= 1e-10
    assert deq.last_stats.converged
    assert warm < cold and warm <= 0.8 * cold, (warm, cold)


def test_reuse_solution_warm_starts_automatically_until_reset():
    block, x = TanhBlock(contraction=0.9), inputs()
    deq = DEQ(block, solver="fixed_point", max_iter=300, tol=1e-10, stop_mode="abs", reuse_solution=True)
    with torch.no_grad():
        deq(x)
        cold = deq.last_stats.iters
        deq(x)  # starts at the stored solution: converged from the first evaluation
        assert deq.last_stats.iters == 1
        deq.reset()
        deq(x)
        assert deq.last_stats.iters == cold


# ---- breakdowns ------------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_nan_in_the_block_falls_back_and_training_continues(solver):
    block = FlakyBlock(nan_at=3)
    x = inputs()
    deq = DEQ(block, solver=solver, max_iter=60, tol=1e-8).train()
    opt = torch.optim.SGD(block.parameters(), lr=0.1)
    before = block.W.detach().clone()
    loss = deq(x).pow(2).mean()
    loss.backward()
    opt.step()
    stats = deq.stats_dict()
    assert deq.last_stats.fallback and deq.last_stats.fallback_reason == "nan"
    assert stats["deq/fallbacks"] >= 1 and stats["deq/fallbacks_total"] >= 1
    assert deq.last_stats.converged  # damped iteration from the best iterate finished the job
    assert all(torch.isfinite(p).all() for p in block.parameters())
    assert not torch.equal(block.W, before)


def test_singular_anderson_system_falls_back_in_a_training_step():
    # λ = 0 and a one-dimensional state: three or more history columns make the system singular
    block, x = TanhBlock(dim=1), inputs(dim=1, batch=4)
    deq = DEQ(block, solver="anderson", anderson_lam=0.0, max_iter=80, tol=1e-12, stop_mode="abs").train()
    opt = torch.optim.SGD(block.parameters(), lr=0.1)
    deq(x).sum().backward()
    opt.step()
    assert deq.last_stats.fallback and deq.last_stats.fallback_reason == "singular"
    assert deq.last_stats.converged and all(torch.isfinite(p).all() for p in block.parameters())


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_non_contractive_block_is_visible_in_the_stats(solver):
    # f(z, x) = z² + 1 + x² has no real fixed point: never a silent wrong answer
    deq = DEQ(lambda z, x: z * z + 1.0 + x * x, solver=solver, max_iter=40, tol=1e-4)
    with torch.no_grad():
        deq(inputs().float())
    stats = deq.stats_dict()
    assert stats["deq/converged"] == 0.0 and stats["deq/rel_res_max"] > 0.1
    if solver != "anderson":  # iteration and Broyden run away: the solver gave up on them
        assert stats["deq/fallbacks"] == 1.0


# ---- stats -----------------------------------------------------------------------------------------
def test_stats_report_the_residual_of_the_solution():
    gen = torch.Generator().manual_seed(4)
    A = torch.randn(5, 5, generator=gen, dtype=F64)
    block = LinearBlock(0.7 * A / torch.linalg.matrix_norm(A, ord=2))
    x = inputs(batch=4, dim=5)
    deq = DEQ(block, solver="fixed_point", max_iter=12, tol=0.0)
    with torch.no_grad():
        z = deq(x)
        abs_res, rel_res = residuals(z, block(z, x))
    stats = deq.last_stats
    assert isinstance(stats, DEQStats) and stats.iters == 12 and not stats.converged and not stats.fallback
    assert stats.solver == "fixed_point" and stats.grad == "implicit"
    assert stats.abs_res_max == pytest.approx(float(abs_res.max()), rel=1e-12)
    assert stats.abs_res_mean == pytest.approx(float(abs_res.mean()), rel=1e-12)
    assert stats.rel_res_max == pytest.approx(float(rel_res.max()), rel=1e-12)
    assert stats.rel_res_mean == pytest.approx(float(rel_res.mean()), rel=1e-12)
    d = deq.stats_dict()
    assert {"deq/iters", "deq/abs_res", "deq/rel_res", "deq/fallbacks", "deq/converged"} <= set(d)
    assert all(type(v) is float for v in d.values())
    assert d["deq/iters"] == 12.0 and d["deq/abs_res"] == stats.abs_res_mean and d["deq/fallbacks"] == 0.0


def test_no_grad_forward_returns_the_solution_without_a_graph():
    block, x = TanhBlock(), inputs()
    deq = DEQ(block, solver="broyden", tol=1e-10)
    with torch.no_grad():
        z = deq(x)
    assert z.grad_fn is None and torch.equal(z, deq.last_z)
    assert deq.stats_dict()["deq/rel_res_max"] <= 1e-10
    z_b = DEQ(block, solver="broyden", tol=1e-10).eval()(x[1:2])  # one sample alone gives the same answer
    torch.testing.assert_close(z_b.detach(), z[1:2], rtol=0, atol=1e-9)


# ---- Jacobian regularisation ---------------------------------------------------------------------
@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_hutchinson_estimate_is_unbiased_for_a_linear_map(dist):
    torch.manual_seed(0)
    A = torch.randn(6, 6, dtype=F64)
    n = 4000  # independent samples, one probe each
    z = torch.randn(n, 6, dtype=F64, requires_grad=True)
    est = hutchinson_jacobian_frobenius(z @ A.T + 1.0, z, probes=1, dist=dist, create_graph=False)  # (n,)
    M = A @ A.T  # ‖εᵀA‖² = εᵀ(AAᵀ)ε
    exact = float((A**2).sum())
    off = float((M**2).sum() - (M.diagonal() ** 2).sum())
    var = 2 * off if dist == "rademacher" else 2 * float((M**2).sum())  # Hutchinson variances
    assert abs(float(est.mean()) - exact) < 5 * (var / n) ** 0.5
    if dist == "rademacher":
        assert float(est.var()) == pytest.approx(var, rel=0.15)


def test_jacobian_loss_in_training_is_weighted_and_differentiable():
    torch.manual_seed(0)
    A = torch.randn(6, 6, dtype=F64)
    A = 0.6 * A / torch.linalg.matrix_norm(A, ord=2)
    block, x = LinearBlock(A), inputs(batch=8)
    deq = DEQ(block, tol=1e-10, jac_reg_weight=2.0, jac_reg_probes=300).train()
    out = deq(x)
    exact = 2.0 * float((A**2).sum()) / 6  # weight × ‖A‖_F² / D
    assert float(deq.jac_loss.detach()) == pytest.approx(exact, rel=0.1)
    assert deq.stats_dict()["deq/jac_fro2"] == pytest.approx(exact / 2.0, rel=0.1)
    (out.sum() + deq.jac_loss).backward()
    grad_jac = 2.0 * 2 * A / 6  # ∂/∂A of weight·E‖εᵀA‖²/D
    assert torch.isfinite(block.A.grad).all()
    deq.eval()
    with torch.no_grad():
        deq(x)
    assert float(deq.jac_loss) == 0.0  # off outside training
    # the regulariser's gradient alone is 4A/D in expectation
    block.A.grad = None
    deq.train()(x)
    deq.jac_loss.backward()
    assert float((block.A.grad - grad_jac).norm() / grad_jac.norm()) < 0.15
