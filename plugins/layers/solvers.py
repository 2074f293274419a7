"""Fixed-point solvers for deep equilibrium layers: damped iteration, Anderson, Broyden.

Every solver finds z* = f(z*) for a batch z of shape (B, ...), working on the flattened
(B, D) view so each sample is its own problem (per-sample least squares in Anderson,
per-sample inverse-Jacobian estimates in Broyden). Residuals are per sample:

    abs_res = ‖f(z) − z‖,    rel_res = ‖f(z) − z‖ / (‖f(z)‖ + eps)

The solver stops when every sample's best residual (``stop_mode`` "rel" or "abs") is at most
``tol``, or after ``max_iter`` evaluations of f, and returns the lowest-residual iterate of each
sample together with that iterate's residuals, so what is reported is exactly ‖f(z) − z‖ of what
is returned. A solver that breaks down — a non-finite f(z), a residual above
``divergence_factor`` × its initial value, a singular or exploding Anderson system — does not
raise: it restarts damped fixed-point iteration from the best iterates for the rest of the
budget and says so (``fallback``, ``reason``). Solvers run under ``torch.no_grad()``; f may
still call ``torch.autograd.grad`` on a graph built outside (the DEQ adjoint solve does).

Every solver takes these keyword ``options`` besides its own: ``max_iter`` (50), ``tol`` (1e-4),
``stop_mode`` ("rel"), ``fallback_damping`` (0.5: the damped iteration that takes over on breakdown)
and ``divergence_factor`` (1e3).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lowbit.errors import LowbitError

__all__ = ["SOLVERS", "SolverResult", "anderson", "broyden", "fixed_point", "get_solver", "residuals"]

_REL_EPS = 1e-9  # keeps rel_res finite where f(z) = 0
_GRAM_FLOOR = 1e-150  # keeps λ s > 0 for a sample that is exactly at its fixed point (G = 0)
_MAX_ANDERSON_COEFF = 1e6  # Σ|α| beyond this is a (near-)singular mixing system, not extrapolation
_MAX_KKT_COND = 1e12  # 2-norm condition of the normalised KKT system; float64 keeps ~4 digits beyond it


@dataclass
class SolverResult:
    """What a solver found: the best iterate per sample and its residuals."""

    z: torch.Tensor  # (B, ...) lowest-residual iterate of each sample
    abs_res: torch.Tensor  # (B,) ‖f(z) − z‖ at z
    rel_res: torch.Tensor  # (B,) ‖f(z) − z‖ / (‖f(z)‖ + eps) at z
    fz: torch.Tensor  # (B, ...) f(z), already computed: one more plain step for free
    iters: int  # evaluations of f, fallback included
    converged: bool  # every sample met tol
    fallback: bool = False  # the solver broke down and damped iteration took over
    reason: str = ""  # "nan", "diverged" or "singular" when fallback
    trace: list[float] = field(default_factory=list)  # max over the batch of the stop residual, per evaluation


def residuals(z: torch.Tensor, fz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample absolute and relative residuals of z (B, ...) with fz = f(z): two (B,) tensors."""
    diff = (fz - z).flatten(1)
    abs_res = diff.norm(dim=1)
    rel_res = abs_res / (fz.flatten(1).norm(dim=1) + _REL_EPS)
    return abs_res, rel_res


class _Tracker:
    """Per-sample best iterate, stopping rule and breakdown checks shared by all solvers.

    ``step(z, fz)`` is called once per evaluation of f with flat (B, D) tensors and returns
    None to go on, "converged", "budget", or a breakdown reason ("nan", "diverged").
    """

    def __init__(self, max_iter: int, tol: float, stop_mode: str, divergence_factor: float) -> None:
        self.max_iter, self.tol, self.stop_mode = max_iter, tol, stop_mode
        self.divergence_factor = divergence_factor
        self.evals = 0
        self.trace: list[float] = []
        self.best_z: torch.Tensor | None = None  # (B, D)
        self.best_fz: torch.Tensor | None = None  # (B, D) f(best_z), so a fallback needs no re-evaluation
        self.best_abs = self.best_rel = self.best_crit = self.abs0 = None  # (B,) each

    def step(self, z: torch.Tensor, fz: torch.Tensor) -> str | None:
        self.evals += 1
        abs_res, rel_res = residuals(z, fz)  # (B,) each
        crit = rel_res if self.stop_mode == "rel" else abs_res
        finite = torch.isfinite(fz).all(dim=1) & torch.isfinite(crit)
        if self.best_z is None:  # first evaluation: the start is the best so far, whatever it is
            inf = torch.full_like(crit, float("inf"))
            self.best_z, self.best_fz = z.clone(), z.clone()
            self.best_abs, self.best_rel, self.best_crit = inf.clone(), inf.clone(), inf.clone()
            self.abs0 = torch.where(finite, abs_res, inf)
        better = finite & (crit < self.best_crit)
        self.best_z = torch.where(better[:, None], z, self.best_z)
        self.best_fz = torch.where(better[:, None], fz, self.best_fz)
        self.best_abs = torch.where(better, abs_res, self.best_abs)
        self.best_rel = torch.where(better, rel_res, self.best_rel)
        self.best_crit = torch.where(better, crit, self.best_crit)
        diverged = abs_res > self.divergence_factor * self.abs0.clamp_min(torch.finfo(abs_res.dtype).eps)
        flags = torch.stack([crit.max(), (self.best_crit <= self.tol).all(), finite.all(), diverged.any()])
        worst, converged, all_finite, any_diverged = flags.tolist()  # one device sync per evaluation
        self.trace.append(worst)
        if converged:
            return "converged"
        if not all_finite:
            return "nan"
        if any_diverged:
            return "diverged"
        if self.evals >= self.max_iter:
            return "budget"
        return None

    def result(self, shape: torch.Size, fallback: bool, reason: str) -> SolverResult:
        return SolverResult(
            z=self.best_z.reshape(shape),
            fz=self.best_fz.reshape(shape),
            abs_res=self.best_abs,
            rel_res=self.best_rel,
            iters=self.evals,
            converged=bool((self.best_crit <= self.tol).all()),
            fallback=fallback,
            reason=reason,
            trace=self.trace,
        )


# ---- the iterations, on flat (B, D) tensors; each returns the tracker's last status -----------
def _damped_steps(g: Callable, z: torch.Tensor, tracker: _Tracker, damping: float) -> str:
    """z ← (1−τ) z + τ f(z) (Krasnosel'skii–Mann iteration; τ = 1 is plain iteration)."""
    while True:
        fz = g(z)
        status = tracker.step(z, fz)
        if status is not None:
            return status
        z = fz if damping == 1.0 else torch.lerp(z, fz, damping)


def _anderson_steps(g: Callable, z0: torch.Tensor, tracker: _Tracker, m: int, lam: float, beta: float) -> str:
    """Anderson acceleration (Walker & Ni 2011, Alg. AA; the DEQ tutorial's batched form).

    With G_i = f(x_i) − x_i over the last n ≤ m iterates, solve per sample
        min_α ‖Σ α_i G_i‖² + λ s ‖α‖²   s.t.  Σ α_i = 1
    through its KKT system [[0, 1ᵀ], [1, GGᵀ + λsI]] [ν; α] = [1; 0], then mix
        x_{k+1} = β Σ α_i f(x_i) + (1 − β) Σ α_i x_i.
    s = mean_i ‖G_i‖² makes λ scale-free: an absolute λ (the tutorial's) dominates GGᵀ as the
    residuals shrink and turns the method into slow averaging near the solution.
    """
    B, D = z0.shape
    X = z0.new_zeros(B, m, D)  # (B, m, D) ring buffer of iterates
    F = z0.new_zeros(B, m, D)  # (B, m, D) and of their images f(x)
    X[:, 0], F[:, 0] = z0, g(z0)
    if (status := tracker.step(X[:, 0], F[:, 0])) is not None:
        return status
    X[:, 1], F[:, 1] = F[:, 0], g(F[:, 0])
    if (status := tracker.step(X[:, 1], F[:, 1])) is not None:
        return status
    # the KKT system is solved in float64: it is tiny, and GGᵀ + λI is ill-conditioned in low precision
    H = torch.zeros(B, m + 1, m + 1, dtype=torch.float64, device=z0.device)  # (B, m+1, m+1)
    H[:, 0, 1:] = H[:, 1:, 0] = 1.0
    rhs = torch.zeros(B, m + 1, 1, dtype=torch.float64, device=z0.device)  # (B, m+1, 1)
    rhs[:, 0] = 1.0
    eye = torch.eye(m, dtype=torch.float64, device=z0.device)
    k = 2
    while True:
        n = min(k, m)
        G = F[:, :n] - X[:, :n]  # (B, n, D)
        gram = torch.bmm(G, G.transpose(1, 2)).double()  # (B, n, n)
        scale = gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(_GRAM_FLOOR)[:, None, None]  # (B, 1, 1)
        # GGᵀ/s: the same α (ν scales by 1/s), and a KKT matrix whose conditioning is scale-free
        H[:, 1 : n + 1, 1 : n + 1] = gram / scale + lam * eye[:n, :n]
        kkt = H[:, : n + 1, : n + 1]
        sol, info = torch.linalg.solve_ex(kkt, rhs[:, : n + 1])
        alpha = sol[:, 1 : n + 1, 0]  # (B, n)
        # singular: an exact zero pivot, a numerically rank-deficient system (rounding can hide an
        # exact singularity from LU), or coefficients that are not finite or explode
        coeff = alpha.abs().sum(dim=1).nan_to_num(nan=float("inf"))  # (B,)
        cond = torch.linalg.cond(kkt).nan_to_num(nan=float("inf"))  # (B,)
        if bool(((info != 0) | (coeff > _MAX_ANDERSON_COEFF) | (cond > _MAX_KKT_COND)).any()):
            return "singular"
        alpha = alpha.to(z0.dtype)[:, None]  # (B, 1, n)
        x_new = beta * torch.bmm(alpha, F[:, :n])[:, 0]  # (B, D)
        if beta != 1.0:
            x_new = x_new + (1 - beta) * torch.bmm(alpha, X[:, :n])[:, 0]
        f_new = g(x_new)
        X[:, k % m], F[:, k % m] = x_new, f_new
        if (status := tracker.step(x_new, f_new)) is not None:
            return status
        k += 1


def _broyden_matvec(U: torch.Tensor, VT: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(−I + U Vᵀ) x per sample: U (B, D, n), VT (B, n, D), x (B, D) -> (B, D)."""
    return -x + torch.bmm(U, torch.bmm(VT, x[:, :, None]))[:, :, 0]


def _broyden_rmatvec(U: torch.Tensor, VT: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """xᵀ (−I + U Vᵀ) per sample, as a (B, D) tensor."""
    return -x + torch.bmm(VT.transpose(1, 2), torch.bmm(U.transpose(1, 2), x[:, :, None]))[:, :, 0]


def _broyden_steps(g: Callable, z0: torch.Tensor, tracker: _Tracker) -> str:
    """Good Broyden on g(z) = f(z) − z with a low-rank inverse Jacobian (Bai et al. 2019, DEQ code).

    B_k ≈ (∂g/∂z)⁻¹ starts at −I and takes rank-one updates
        B_{k+1} = B_k + (Δz − B_k Δg) Δzᵀ B_k / (Δzᵀ B_k Δg)
    kept as −I + U Vᵀ (no line search); the step is z ← z − B_k g(z).
    """
    B, D = z0.shape
    cap = max(tracker.max_iter, 1)
    U = z0.new_zeros(B, D, cap)  # (B, D, cap) columns u_i
    VT = z0.new_zeros(B, cap, D)  # (B, cap, D) rows v_iᵀ
    z, fz = z0, g(z0)
    gz = fz - z  # (B, D)
    if (status := tracker.step(z, fz)) is not None:
        return status
    update, n = gz, 0  # −B_0 g = g
    tiny = torch.finfo(z0.dtype).tiny
    while True:
        dz = update
        z = z + dz
        fz = g(z)
        gz_new = fz - z
        dg, gz = gz_new - gz, gz_new
        if (status := tracker.step(z, fz)) is not None:
            return status
        vT = _broyden_rmatvec(U[:, :, :n], VT[:, :n], dz)  # (B, D)
        u = dz - _broyden_matvec(U[:, :, :n], VT[:, :n], dg)  # (B, D)
        denom = (vT * dg).sum(dim=1, keepdim=True)  # (B, 1)
        ok = denom.abs() > tiny  # a sample with Δg = 0 (converged) keeps its estimate
        U[:, :, n] = torch.where(ok, u / torch.where(ok, denom, 1.0), 0.0)
        VT[:, n] = torch.where(ok, vT, 0.0)
        n += 1
        update = -_broyden_matvec(U[:, :, :n], VT[:, :n], gz)


# ---- public solvers ----------------------------------------------------------------------------
def _run(
    steps: Callable[[Callable, torch.Tensor, _Tracker], str],
    f: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    *,
    max_iter: int = 50,
    tol: float = 1e-4,
    stop_mode: str = "rel",
    fallback_damping: float = 0.5,
    divergence_factor: float = 1e3,
) -> SolverResult:
    """Flatten, iterate, and on breakdown continue damped iteration from the best iterates; the keywords
    are the options every solver takes (module doc)."""
    if max_iter < 1:
        raise LowbitError(f"solver max_iter must be a positive integer, got {max_iter}")
    if stop_mode not in ("rel", "abs"):
        raise LowbitError(f"solver stop_mode must be 'rel' or 'abs', got {stop_mode!r}")
    shape = z0.shape
    B = shape[0]

    def g(z_flat: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B, D)
        return f(z_flat.reshape(shape)).reshape(B, -1).to(z_flat.dtype)

    tracker = _Tracker(max_iter, tol, stop_mode, divergence_factor)
    with torch.no_grad():
        status = steps(g, z0.detach().reshape(B, -1), tracker)
        if status in ("converged", "budget"):
            return tracker.result(shape, fallback=False, reason="")
        if tracker.evals < max_iter:  # the rest of the budget goes to damped iteration from the best
            z = torch.lerp(tracker.best_z, tracker.best_fz, fallback_damping)
            _damped_steps(g, z, tracker, fallback_damping)
    return tracker.result(shape, fallback=True, reason=status)


def fixed_point(
    f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, *, damping: float = 1.0, **options: Any
) -> SolverResult:
    """Damped fixed-point iteration z ← (1−τ) z + τ f(z), τ = ``damping`` in (0, 1]; ``options``: module doc."""
    return _run(functools.partial(_damped_steps, damping=damping), f, z0, **options)


def anderson(
    f: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    *,
    m: int = 5,
    lam: float = 1e-4,
    beta: float = 1.0,
    **options: Any,
) -> SolverResult:
    """Anderson acceleration with history ``m``, Tikhonov ``lam`` and mixing ``beta`` (Walker & Ni 2011);
    ``options``: module doc."""
    if m < 2:
        raise LowbitError(f"anderson history m must be at least 2, got {m}")
    return _run(functools.partial(_anderson_steps, m=m, lam=lam, beta=beta), f, z0, **options)


def broyden(f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, **options: Any) -> SolverResult:
    """Good Broyden root finding on f(z) − z with a rank-``max_iter`` inverse Jacobian (Bai et al. 2019);
    ``options``: module doc."""
    return _run(_broyden_steps, f, z0, **options)


SOLVERS: dict[str, Callable[..., SolverResult]] = {
    "anderson": anderson,
    "broyden": broyden,
    "fixed_point": fixed_point,
}


def get_solver(name: str) -> Callable[..., SolverResult]:
    """The solver called ``name``; a clear error listing the valid ones otherwise."""
    if name not in SOLVERS:
        raise LowbitError(f"unknown DEQ solver {name!r}; valid: {', '.join(SOLVERS)}")
    return SOLVERS[name]
