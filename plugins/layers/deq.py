"""Deep equilibrium layer: z* = f(z*, x) found by a solver, with implicit or phantom gradients.

A weight-tied block f, called as ``f(z, x)`` with input injection x, becomes one layer whose
output is its fixed point (Bai, Kolter, Koltun 2019, "Deep Equilibrium Models", arXiv 1909.01377).
The forward solve runs without autograd, so training memory does not grow with the iterations.
Gradients, by ``grad``:

- ``"implicit"`` — implicit function theorem (Bai et al. 2019, Thm. 1): the output is f(z*, x)
  re-evaluated once with autograd on, and backward swaps the incoming ∂L/∂z* for the solution
  of the adjoint fixed point g = (∂f/∂z)ᵀ g + ∂L/∂z*, found by its own solver with vector-Jacobian
  products through that one saved evaluation.
- ``"phantom"`` — phantom gradients (Geng et al. 2021, "On Training Implicit Models", arXiv
  2111.05177, the unrolling-based form): k damped steps z ← (1−τ) z + τ f(z, x) from the detached z*,
  backpropagated through those k steps only.
- ``"fpdm"`` — stochastic Jacobian-free backpropagation of Fixed Point Diffusion Models (Bai &
  Melas-Kyriazi 2024, arXiv 2401.08741, "S-JFB"): in training, n ~ U{nograd_iters_range}
  solver iterations without gradient from the initial z, then m ~ U{grad_iters_range} plain
  steps z ← f(z, x) with gradient; outside training the usual solve.

A warm start z0 (the previous diffusion timestep's solution, FPDM Sec. 3.3 "solution reuse")
replaces the zero initialisation; ``last_z`` holds the latest solution for that. Jacobian
regularisation (Bai, Koltun, Kolter 2021, "Stabilizing Equilibrium Models by Jacobian
Regularization", arXiv 2106.14342) puts a Hutchinson estimate of ‖∂f/∂z‖_F² / D at z*
into ``jac_loss`` for the task to add to its loss. ``last_stats`` / ``stats_dict()`` report
iterations, residuals and solver fallbacks of every forward (and backward) for logging.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.plugins.layers.solvers import SOLVERS, SolverResult, get_solver, residuals

__all__ = ["DEQ", "GRAD_MODES", "DEQStats", "hutchinson_jacobian_frobenius"]

GRAD_MODES = ("implicit", "phantom", "fpdm")
_INITS = ("zeros", "input")
_PROBES = ("rademacher", "gaussian")


# ---- functions ---------------------------------------------------------------------------------
def hutchinson_jacobian_frobenius(
    fz: torch.Tensor,
    z: torch.Tensor,
    probes: int = 1,
    dist: str = "rademacher",
    create_graph: bool = True,
) -> torch.Tensor:
    """Hutchinson estimate of ‖∂f/∂z‖_F² per sample, shape (B,), from fz = f(z) with z requiring grad.

    E_ε ‖εᵀ J‖² = tr(J Jᵀ) = ‖J‖_F² for ε with E[εεᵀ] = I, Rademacher or Gaussian (Hutchinson
    1989; Bai et al. 2021 train on it). ``create_graph`` keeps the estimate differentiable, to train on it.
    """
    if dist not in _PROBES:
        raise LowbitError(f"Hutchinson probe distribution {dist!r} is not valid; valid: {', '.join(_PROBES)}")
    total = fz.new_zeros(fz.shape[0])
    for _ in range(probes):
        eps = torch.randint_like(fz, 2) * 2 - 1 if dist == "rademacher" else torch.randn_like(fz)  # E[εεᵀ] = I
        (vjp,) = torch.autograd.grad(fz, z, eps, retain_graph=True, create_graph=create_graph)  # εᵀJ, like z
        total = total + vjp.flatten(1).pow(2).sum(dim=1)
    return total / probes


def _tensors(x: Any) -> list[torch.Tensor]:
    """The tensors in an input injection (a tensor, or a tuple/list of them and other values)."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for t in x if isinstance(t, torch.Tensor)]
    return []


# ---- stats -------------------------------------------------------------------------------------
@dataclass
class DEQStats:
    """One forward (and its backward) of a DEQ layer: what the solvers did and how close they got.

    Residuals are per sample at the solver's returned iterate (for ``fpdm`` in training: at the
    input of the last unrolled step), summarised as mean and max over the batch.
    """

    solver: str
    grad: str
    iters: int  # evaluations of f in the forward solve (+ unrolled steps with gradient)
    abs_res_mean: float
    abs_res_max: float
    rel_res_mean: float
    rel_res_max: float
    converged: bool  # every sample met tol
    fallbacks: int = 0  # solver breakdowns (forward + backward) handed to damped iteration
    fallback_reason: str = ""
    grad_iters: int = 0  # unrolled steps with gradient (phantom k, FPDM m)
    bwd_iters: int | None = None  # adjoint solve, filled in by backward (implicit only)
    bwd_rel_res_max: float | None = None
    bwd_abs_res_max: float | None = None
    jac_fro2: float | None = None  # Hutchinson ‖∂f/∂z‖_F² / D, batch mean, when regularising

    @property
    def fallback(self) -> bool:
        return self.fallbacks > 0

    def as_dict(self, prefix: str = "deq") -> dict[str, float]:
        """Float values keyed ``{prefix}/name``, ready for a logger."""
        out = {
            "iters": self.iters,
            "abs_res": self.abs_res_mean,
            "abs_res_max": self.abs_res_max,
            "rel_res": self.rel_res_mean,
            "rel_res_max": self.rel_res_max,
            "converged": self.converged,
            "fallbacks": self.fallbacks,
            "grad_iters": self.grad_iters,
        }
        if self.bwd_iters is not None:
            out.update(
                bwd_iters=self.bwd_iters, bwd_rel_res_max=self.bwd_rel_res_max, bwd_abs_res_max=self.bwd_abs_res_max
            )
        if self.jac_fro2 is not None:
            out["jac_fro2"] = self.jac_fro2
        return {f"{prefix}/{k}": float(v) for k, v in out.items()}


def _summary(abs_res: torch.Tensor, rel_res: torch.Tensor) -> dict[str, float]:
    return {
        "abs_res_mean": float(abs_res.mean()),
        "abs_res_max": float(abs_res.max()),
        "rel_res_mean": float(rel_res.mean()),
        "rel_res_max": float(rel_res.max()),
    }


# ---- autograd ----------------------------------------------------------------------------------
class _ImplicitBackward(torch.autograd.Function):
    """Identity on fz = f(z*, x) whose backward maps ∂L/∂fz to the adjoint solution g = Jᵀg + ∂L/∂fz.

    Only the graph of that one evaluation of f is kept; ``adjoint`` solves the fixed point with
    vector-Jacobian products through it, and g then flows on through f to its parameters and x.
    """

    @staticmethod
    def forward(ctx: Any, fz: torch.Tensor, adjoint: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        ctx.adjoint = adjoint
        return fz.view_as(fz)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.adjoint(grad), None


# ---- module ------------------------------------------------------------------------------------
class DEQ(nn.Module):
    """Equilibrium layer z* = f(z*, x) over a weight-tied block ``f(z, x) -> like z``, z and x (B, ...).

    Solvers: ``fixed_point`` (``damping`` τ), ``anderson`` (``anderson_m``, ``anderson_lam``,
    ``anderson_beta``), ``broyden``; all stop at ``tol`` on the per-sample ``stop_mode`` residual or
    after ``max_iter`` evaluations of f, and fall back to damped iteration (``fallback_damping``)
    when they break down. See the module docstring for ``grad`` and the papers.

    ``forward(x, z0=None)`` returns z* itself when no gradient is needed (eval, no_grad; with ``grad="fpdm"``
    f of it, the last evaluation's output: k evaluations are f^k(z0), as FPDM samples and trains), and a
    tensor carrying the chosen gradient otherwise: f(z*, x) for ``implicit`` (one more step, equal
    to z* up to the residual), the last unrolled step for ``phantom`` and ``fpdm``. Parameters are
    seen through f when f is an ``nn.Module`` (it becomes a submodule).
    """

    lowbit_plugin_api = 1

    def __init__(
        self,
        f: Callable[..., torch.Tensor],
        solver: str = "anderson",
        max_iter: int = 30,
        tol: float = 1e-3,
        stop_mode: str = "rel",
        *,
        damping: float = 1.0,
        anderson_m: int = 5,
        anderson_lam: float = 1e-4,
        anderson_beta: float = 1.0,
        fallback_damping: float = 0.5,
        divergence_factor: float = 1e3,
        grad: str = "implicit",
        backward_solver: str | None = None,
        backward_tol: float | None = None,
        backward_max_iter: int | None = None,
        phantom_steps: int = 5,
        phantom_damping: float = 0.5,
        nograd_iters_range: Sequence[int] = (0, 10),
        grad_iters_range: Sequence[int] = (1, 12),
        init: str = "zeros",
        reuse_solution: bool = False,
        jac_reg_weight: float = 0.0,
        jac_reg_probes: int = 1,
        jac_reg_dist: str = "rademacher",
    ) -> None:
        super().__init__()
        if not callable(f):
            raise LowbitError(f"DEQ needs a callable block f(z, x), got {type(f).__name__}")
        backward_solver = solver if backward_solver is None else backward_solver
        for what, name in (("solver", solver), ("backward_solver", backward_solver)):
            if name not in SOLVERS:
                raise LowbitError(f"unknown DEQ {what} {name!r}; valid: {', '.join(SOLVERS)}")
        _choice("grad", grad, GRAD_MODES)
        _choice("stop_mode", stop_mode, ("rel", "abs"))
        _choice("init", init, _INITS)
        _choice("jac_reg_dist", jac_reg_dist, _PROBES)
        backward_max_iter = max_iter if backward_max_iter is None else backward_max_iter
        for what, value in (
            ("max_iter", max_iter),
            ("backward_max_iter", backward_max_iter),
            ("phantom_steps", phantom_steps),
            ("jac_reg_probes", jac_reg_probes),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LowbitError(f"DEQ {what} must be a positive integer, got {value!r}")
        backward_tol = tol if backward_tol is None else backward_tol
        for what, value in (("tol", tol), ("backward_tol", backward_tol), ("jac_reg_weight", jac_reg_weight)):
            if not (isinstance(value, (int, float)) and value >= 0 and math.isfinite(value)):
                raise LowbitError(f"DEQ {what} must be a finite number >= 0, got {value!r}")
        for what, value in (
            ("damping", damping),
            ("phantom_damping", phantom_damping),
            ("fallback_damping", fallback_damping),
            ("anderson_beta", anderson_beta),
        ):
            if not (isinstance(value, (int, float)) and 0 < value <= 1):
                raise LowbitError(f"DEQ {what} must be in (0, 1], got {value!r}")
        if isinstance(anderson_m, bool) or not isinstance(anderson_m, int) or anderson_m < 2:
            raise LowbitError(f"DEQ anderson_m must be an integer >= 2, got {anderson_m!r}")
        if not (isinstance(anderson_lam, (int, float)) and anderson_lam >= 0):
            raise LowbitError(f"DEQ anderson_lam must be >= 0, got {anderson_lam!r}")
        if not (isinstance(divergence_factor, (int, float)) and divergence_factor > 1):
            raise LowbitError(f"DEQ divergence_factor must be > 1, got {divergence_factor!r}")

        self.f = f  # an nn.Module registers as a submodule, so its parameters are the layer's
        self.solver, self.backward_solver = solver, backward_solver
        self.max_iter, self.tol, self.stop_mode = max_iter, float(tol), stop_mode
        self.backward_max_iter, self.backward_tol = backward_max_iter, float(backward_tol)
        self.damping, self.fallback_damping, self.divergence_factor = damping, fallback_damping, divergence_factor
        self.anderson_m, self.anderson_lam, self.anderson_beta = anderson_m, anderson_lam, anderson_beta
        self.grad = grad
        self.phantom_steps, self.phantom_damping = phantom_steps, phantom_damping
        self.nograd_iters_range = _int_range("nograd_iters_range", nograd_iters_range, low=0)
        self.grad_iters_range = _int_range("grad_iters_range", grad_iters_range, low=1)
        self.init, self.reuse_solution = init, bool(reuse_solution)
        self.jac_reg_weight, self.jac_reg_probes, self.jac_reg_dist = (
            float(jac_reg_weight),
            jac_reg_probes,
            jac_reg_dist,
        )

        self.last_z: torch.Tensor | None = None  # latest solution, detached: pass it as z0 to warm-start
        self.last_stats: DEQStats | None = None
        self.jac_loss: torch.Tensor = torch.zeros(())  # weight × Hutchinson ‖J‖_F²/D; zero when off
        self.fallback_count = 0  # solver breakdowns over the layer's life

    # ---- public --------------------------------------------------------------------------------
    def forward(self, x: Any, z0: torch.Tensor | None = None) -> torch.Tensor:
        """Equilibrium of f(·, x) from z0 (default: ``init``, or ``last_z`` with ``reuse_solution``)."""
        z_init = self._initial_z(x, z0)  # (B, ...)
        f_x = self._bind(x)
        need_grad = torch.is_grad_enabled() and (
            any(t.requires_grad for t in _tensors(x)) or any(p.requires_grad for p in self.parameters())
        )
        need_jac = need_grad and self.training and self.jac_reg_weight > 0
        jac_at: tuple[torch.Tensor, torch.Tensor] | None = None  # (f(z), z) with a graph, for the regulariser

        if self.grad == "fpdm" and self.training and need_grad:
            out, z_last, stats, jac_at = self._forward_fpdm(f_x, z_init, need_jac)
        else:
            res = self._solve(self.solver, f_x, z_init, self.max_iter, self.tol)
            # FPDM's state after k evaluations is f^k(z_0), as S-JFB trains it (every evaluation counts: a
            # budget of one moves the state); a DEQ's answer is the lowest-residual iterate, whose residual
            # the stats report
            z_star = res.fz if self.grad == "fpdm" else res.z
            z_last = z_star
            stats = DEQStats(
                solver=self.solver,
                grad=self.grad,
                iters=res.iters,
                converged=res.converged,
                fallbacks=int(res.fallback),
                fallback_reason=res.reason,
                **_summary(res.abs_res, res.rel_res),
            )
            if not need_grad:
                out = z_star
            elif self.grad == "implicit":
                z_leaf = z_star.detach().requires_grad_()
                fz = f_x(z_leaf)  # the one evaluation whose graph backward uses
                out = _ImplicitBackward.apply(fz, self._adjoint(fz, z_leaf, stats))
                jac_at = (fz, z_leaf)
            elif self.grad == "phantom":
                out, jac_at, _ = self._unroll(f_x, z_star, self.phantom_steps, self.phantom_damping, need_jac)
                stats.grad_iters = self.phantom_steps
            else:  # fpdm outside training, or with no_grad iterations: the fewest grad steps it trains with
                steps = self.grad_iters_range[0]
                out, jac_at, _ = self._unroll(f_x, z_star, steps, 1.0, need_jac)
                stats.grad_iters = steps

        if need_jac and jac_at is not None:
            fz, z_leaf = jac_at
            est = hutchinson_jacobian_frobenius(fz, z_leaf, self.jac_reg_probes, self.jac_reg_dist)  # (B,)
            per_dim = est / z_leaf[0].numel()  # ‖J‖_F² / D, Bai et al. 2021's normalisation
            self.jac_loss = self.jac_reg_weight * per_dim.mean()
            stats.jac_fro2 = float(per_dim.detach().mean())
        else:
            self.jac_loss = torch.zeros((), device=z_init.device, dtype=z_init.dtype)

        self.fallback_count += stats.fallbacks
        self.last_z = z_last.detach()
        self.last_stats = stats
        return out

    def stats_dict(self, prefix: str = "deq") -> dict[str, float]:
        """The last forward's stats as floats (``deq/iters``, ``deq/abs_res``, ``deq/rel_res``, ``deq/fallbacks``, ...)."""
        if self.last_stats is None:
            return {}
        out = self.last_stats.as_dict(prefix)
        out[f"{prefix}/fallbacks_total"] = float(self.fallback_count)
        return out

    def reset(self) -> None:
        """Forget the stored solution (start of a new sampling trajectory)."""
        self.last_z = None

    def extra_repr(self) -> str:
        return (
            f"solver={self.solver}, max_iter={self.max_iter}, tol={self.tol}, stop_mode={self.stop_mode}, "
            f"grad={self.grad}, backward_solver={self.backward_solver}"
        )

    # ---- pieces --------------------------------------------------------------------------------
    def _bind(self, x: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        """z ↦ f(z, x), checking that f keeps z's shape."""

        def f_x(z: torch.Tensor) -> torch.Tensor:
            fz = self.f(z, x)
            if not isinstance(fz, torch.Tensor) or fz.shape != z.shape:
                got = tuple(fz.shape) if isinstance(fz, torch.Tensor) else type(fz).__name__
                raise LowbitError(f"DEQ block must return a tensor shaped like z {tuple(z.shape)}, got {got}")
            return fz

        return f_x

    def _initial_z(self, x: Any, z0: torch.Tensor | None) -> torch.Tensor:
        if z0 is not None:
            return z0.detach()
        tensors = _tensors(x)
        if not tensors:
            raise LowbitError(f"DEQ input must be a tensor or a tuple holding one, got {type(x).__name__}; or pass z0")
        ref = tensors[0]  # (B, ...) the default z takes x's shape
        last = self.last_z
        if self.reuse_solution and last is not None and last.shape == ref.shape and last.device == ref.device:
            return last.to(ref.dtype)
        return torch.zeros_like(ref) if self.init == "zeros" else ref.detach().clone()

    def _solver_options(self, name: str) -> dict[str, Any]:
        options: dict[str, Any] = {
            "stop_mode": self.stop_mode,
            "fallback_damping": self.fallback_damping,
            "divergence_factor": self.divergence_factor,
        }
        if name == "fixed_point":
            options["damping"] = self.damping
        elif name == "anderson":
            options.update(m=self.anderson_m, lam=self.anderson_lam, beta=self.anderson_beta)
        return options

    def _solve(self, name: str, f: Callable, z0: torch.Tensor, max_iter: int, tol: float) -> SolverResult:
        with torch.no_grad():
            return get_solver(name)(f, z0, max_iter=max_iter, tol=tol, **self._solver_options(name))

    def _adjoint(self, fz: torch.Tensor, z_leaf: torch.Tensor, stats: DEQStats) -> Callable:
        """Backward of the implicit layer: g = (∂f/∂z)ᵀ g + grad_out at z* (Bai et al. 2019, Thm. 1)."""

        def adjoint(grad_out: torch.Tensor) -> torch.Tensor:
            def vjp_plus_grad(g: torch.Tensor) -> torch.Tensor:
                (jt_g,) = torch.autograd.grad(fz, z_leaf, g, retain_graph=True)
                return jt_g + grad_out

            g0 = torch.zeros_like(grad_out)
            res = self._solve(self.backward_solver, vjp_plus_grad, g0, self.backward_max_iter, self.backward_tol)
            stats.bwd_iters = res.iters
            stats.bwd_abs_res_max = float(res.abs_res.max())
            stats.bwd_rel_res_max = float(res.rel_res.max())
            if res.fallback:
                stats.fallbacks += 1
                stats.fallback_reason = stats.fallback_reason or f"backward: {res.reason}"
                self.fallback_count += 1
            return res.z

        return adjoint

    def _unroll(
        self, f_x: Callable, z_start: torch.Tensor, steps: int, damping: float, need_jac: bool
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None, tuple[torch.Tensor, torch.Tensor]]:
        """``steps`` damped steps z ← (1−τ) z + τ f(z, x) with autograd, from z_start detached.

        Returns the last z, (f(z_start), z_start) for the Jacobian regulariser when asked, and the
        per-sample residuals at the input of the last step.
        """
        z = z_start.detach().requires_grad_(need_jac)
        jac_at = None
        for i in range(steps):
            fz = f_x(z)
            if i == 0 and need_jac:
                jac_at = (fz, z)
            if i == steps - 1:
                last_res = residuals(z.detach(), fz.detach())
            z = fz if damping == 1.0 else torch.lerp(z, fz, damping)
        return z, jac_at, last_res

    def _forward_fpdm(
        self, f_x: Callable, z_init: torch.Tensor, need_jac: bool
    ) -> tuple[torch.Tensor, torch.Tensor, DEQStats, tuple[torch.Tensor, torch.Tensor] | None]:
        """FPDM's stochastic Jacobian-free backpropagation, S-JFB (Bai & Melas-Kyriazi 2024): n solver evaluations with no
        gradient, n ~ U{nograd_iters_range}, then m ~ U{grad_iters_range} steps z ← f(z, x) with it.

        With ``solver="fixed_point"`` this is exactly the paper's z_{n+m} = f^{n+m}(z_0) with the
        gradient through the last m applications only.
        """
        n = _randint(*self.nograd_iters_range)
        m = _randint(*self.grad_iters_range)
        z, iters, fallbacks, reason = z_init, 0, 0, ""
        if n > 0:  # n evaluations of f; the last one's output is where the gradient steps start
            res = self._solve(self.solver, f_x, z_init, n, self.tol)
            z, iters, fallbacks, reason = res.fz, res.iters, int(res.fallback), res.reason
        out, jac_at, (abs_res, rel_res) = self._unroll(f_x, z, m, 1.0, need_jac)
        crit = rel_res if self.stop_mode == "rel" else abs_res
        stats = DEQStats(
            solver=self.solver,
            grad=self.grad,
            iters=iters + m,
            converged=bool((crit <= self.tol).all()),
            fallbacks=fallbacks,
            fallback_reason=reason,
            grad_iters=m,
            **_summary(abs_res, rel_res),
        )
        return out, out, stats, jac_at


# ---- helpers -------------------------------------------------------------------------------------
def _choice(what: str, value: Any, valid: Sequence[str]) -> None:
    if value not in valid:
        raise LowbitError(f"DEQ {what} {value!r} is not valid; valid: {', '.join(valid)}")


def _int_range(what: str, value: Any, low: int) -> tuple[int, int]:
    """(lo, hi) inclusive with low <= lo <= hi; a clear error otherwise."""
    ok = (
        isinstance(value, Sequence)  # tuple, list, or OmegaConf's ListConfig from a recipe
        and not isinstance(value, str)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    )
    if not ok or not (low <= value[0] <= value[1]):
        raise LowbitError(f"DEQ {what} must be [lo, hi] integers with {low} <= lo <= hi, got {value!r}")
    return int(value[0]), int(value[1])


def _randint(lo: int, hi: int) -> int:
    """Uniform on {lo, ..., hi} from torch's generator (seeded by the run's seed)."""
    return int(torch.randint(lo, hi + 1, ()).item())
