"""INT4 training: the Hadamard quantizer in the forward, bit splitting and leverage score sampling in
the backward (Xi, Li, Chen, Zhu, "Training Transformers with 4-bit Integers", NeurIPS 2023, arXiv
2306.11987; reference code github.com/xijiu9/Train_Transformers_with_INT4, HEAD a3244e2).

For a Linear layer Y = X Wᵀ + b, X (N, D) tokens x in_features, W (C, D), G = ∇Y (N, C):

fprop (HQ, paper §3.3, Eq. 3). X and W are both multiplied on the right by H = BlockDiag(H_k, ...),
the orthonormal Sylvester Hadamard matrix of ``hadamard_block`` = 2^k contiguous in_features (default
32, the paper's typical k = 5; the paper's per-layer search of k, App. A.5, is not done here). XH and
WH are rounded to INT4 with one learned step size per tensor (LSQ, Esser et al. 2020): codes
X̂ = clamp(round(XH / s_X), -8, 7), the range the reference code clamps to (the paper's §3.1 writes
Q_N = Q_P = 7, i.e. [-7, 7]), rounded to nearest even (``lowbit.numerics``' INT4; the reference's CUDA
kernel rounds ties away from zero, its Python path to even: they differ at exact ties only). Y = (X̂ Ŵᵀ) · (s_X s_W) + b: H cancels as H Hᵀ = I.
The steps start at s = 2 mean|XH| / √7 (and likewise for W) at the first training forward where the
tensor is nonzero (the reference's initialization, on the Hadamard-transformed tensor); they are kept
positive by |s|. The paper's cold start (App. A.4: steps reset by the heuristic for "the first few
iterations" of pretraining) is not done: its length is not given and its code is not released.

Backward. G is bit split once (paper §4.2 Eq. 5, exactly as the reference's WG.cu:25-47): m = max|G|,
s↓ = m / 98, s↑ = 14 s↓, upper U = clamp(round(G / s↑), -6, 6) (nearest), lower L = clamp(SR((G - s↑U)
/ s↓), -6, 6) (stochastic rounding, unbiased); Ĝ = s↑U + s↓L. Each half keeps the reference's ±6 (13
levels, not INT4's 16), so entries above 91 s↓ (about 0.93 m) saturate at 90 s↓: a small bias the
reference has too; elsewhere |Ĝ - G| <= s↓, and E[Ĝ] = G wherever the residual stays within ±6. SR is
lowbit's (``round_to_integer``: counter-hashed bits), not the reference's curand uniforms: the same rule.
  dgrad: ∇X = [I_X ∘ (Ĝ (s_W Ŵ))] Hᵀ, I_X = 1(-8 <= XH / s_X <= 7) (the LSQ straight-through mask).
    Every row of Ĝ is used: the reference switches dgrad's sampling off (DG.cu:362-365).
  wgrad: ∇W = [I_W ∘ (Ĝ_ssᵀ (s_X X̂))] Hᵀ with leverage score sampling (LSS, §4.2 Eq. 6-7, App. A.2)
    over the 2N stacked rows [s↑U; s↓L] paired with [X̂; X̂]: scores c_i = |row i of the stacked G| ·
    |row of s_X X̂|, probabilities p_i ∝ c_i with Σp = N (half of the rows kept in expectation; Σp is
    the number of nonzero rows when fewer than N are), p clamped to 1 and the rest rescaled until no p
    exceeds 1 (App. A.2), independent Bernoulli draws, kept rows weighted 1/p_i: an unbiased estimate.
    ``lss=false`` is the reference code as released and run (WG.cu:445, App. A.6): every row, weight 1.
  steps: ∇s_X = g_X Σ δ_X ∘ (Ĝ s_W Ŵ), ∇s_W = g_W Σ δ_W ∘ (Ĝ_ssᵀ s_X X̂) with LSQ's δ (round(v) - v
    inside the range, -8 below, 7 above; v = XH / s_X) on the unmasked products and g = 1 / √(7 n), n
    the elements of the tensor (paper App. A.3; per tensor for activations too, not LSQ's per sample).
  bias: ∇b = Σ_rows G, in FP32.
Stochastic rounding and the Bernoulli draws come from one CPU ``torch.Generator`` per layer and
backward, seeded from (``seed``, the layer's backward count, layer index, rank) with
``lowbit.callbacks.rounding.step_seed``, or from ``layer.sr_generator`` when one is set: reproducible,
and the counts are in the plugin's state (the checkpoint), so a resumed run draws as the uninterrupted one.

Kept in high precision: bias and its gradient, norms, softmax and the attention matmuls (only
``nn.Linear`` layers are converted; the reference leaves the attention BMMs in FP16 too), the
embeddings (the reference fake-quantizes them with LSQ+HQ: not done here) and the ``keep`` list
(``DEFAULT_KEEP``: ``lm_head``/``head``, the paper's full-precision classifier). The m of the split and
the LSS budget are each rank's own (the reference is one process); the activation step's initial value
is the mean over ranks. Everything is emulated in FP32 (codes as float tensors, every INT4 product exact
in FP32) on any device; no Triton. The layers are not ``QuantLinear``s: the health callback and ``lowbit
export`` do not see them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lowbit.autocast import AutocastPrecision
from lowbit.callbacks.rounding import step_seed
from lowbit.distributed import all_reduce_max, all_reduce_mean, set_parameter, world
from lowbit.errors import LowbitError
from lowbit.numerics import INT4, hadamard_matrix
from lowbit.quant.convert import DEFAULT_KEEP, ConversionReport, replace_linears

__all__ = [
    "Int4Linear",
    "Int4Precision",
    "bit_split",
    "block_hadamard",
    "int4_layers",
    "lsq_codes",
    "lss_probabilities",
    "lss_row_weights",
]

QMIN, QMAX = INT4.qmin, INT4.qmax  # -8, 7: the reference code's clamp (the paper writes ±7)
SPLIT_LEVELS = 14  # B = 2^4 - 2: s↑ = 14 s↓ (WG.cu: bins = B² = 196 over [-m, m])
SPLIT_CLAMP = 6  # B / 2 - 1: each half of the split is clamped to [-6, 6]
_TINY = torch.finfo(torch.float32).tiny


# ---- functions ----------------------------------------------------------------------------------


@functools.cache
def _hadamard(block: int, device: str) -> torch.Tensor:
    return hadamard_matrix(block, device=device)


def block_hadamard(x: torch.Tensor, block: int, *, transpose: bool = False) -> torch.Tensor:
    """x @ BlockDiag(H_block, ...) along the last dim (Hᵀ with ``transpose``): each run of ``block``
    contiguous features times the orthonormal Sylvester Hadamard matrix (paper §3.3)."""
    h = _hadamard(block, str(x.device))
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)  # (..., D / block, block)
    return (blocks @ (h.t() if transpose else h)).reshape(x.shape)


def lsq_codes(v: torch.Tensor) -> torch.Tensor:
    """INT4 codes of v = XH / s: clamp(round(v), -8, 7), round to nearest even, as float32."""
    return INT4.encode(v).float()


def _initial_step(h: torch.Tensor) -> torch.Tensor:
    """LSQ's initial step of a Hadamard-transformed tensor: 2 mean|h| / √Q_P (reference quantize.py:604-615)."""
    return 2 * h.abs().mean() / math.sqrt(QMAX)


def bit_split(
    g: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(upper, lower, s_up, s_down) with g ≈ s_up·upper + s_down·lower (paper §4.2 Eq. 5; reference
    WG.cu:25-47): m = max|g|, s_down = m / 98, s_up = 14 s_down, upper = clamp(round(g / s_up), -6, 6)
    to nearest, lower = clamp(SR((g - s_up·upper) / s_down), -6, 6), SR drawing from ``generator``."""
    g = g.float()
    m = g.abs().amax()
    s_down = torch.where(m > 0, m / (SPLIT_LEVELS * SPLIT_LEVELS / 2), torch.ones_like(m))  # all zero: any scale
    s_up = SPLIT_LEVELS * s_down
    upper = torch.clamp(torch.round(g / s_up), -SPLIT_CLAMP, SPLIT_CLAMP)
    residual = (g - s_up * upper) / s_down
    lower = torch.clamp(INT4.encode(residual, rounding="sr", generator=generator).float(), -SPLIT_CLAMP, SPLIT_CLAMP)
    return upper, lower, s_up, s_down


def lss_probabilities(scores: torch.Tensor, budget: float) -> torch.Tensor:
    """Keep probabilities p_i ∝ scores_i with Σp = budget and every p_i <= 1 (float64): p clamped to 1,
    the others rescaled to the budget again, repeated until none exceeds 1 (paper App. A.2; at most
    len(scores) passes). Σp is the number of nonzero scores where that is below the budget."""
    scores = scores.detach().double()
    total = scores.sum()
    if not bool(total > 0):
        return torch.zeros_like(scores)
    p = scores * (budget / total)
    for _ in range(scores.numel()):
        if not bool((p > 1).any()):
            break
        full = p >= 1
        rest = torch.where(full, 0.0, p)
        left, rest_total = budget - float(full.sum()), rest.sum()
        if left <= 0 or not bool(rest_total > 0):  # every nonzero row kept: nothing left to rescale
            p = torch.where(full, 1.0, rest)
            break
        p = torch.where(full, 1.0, rest * (left / rest_total))
    return p.clamp(max=1.0)


def lss_row_weights(scores: torch.Tensor, budget: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """m_i / p_i for independent m_i ~ Bernoulli(p_i), p = ``lss_probabilities(scores, budget)``: a kept
    row's weight 1/p_i (unbiased), a dropped row's 0; float32 on ``scores``' device. The uniforms come
    from ``generator`` (on its device; torch's global generator when None)."""
    p = lss_probabilities(scores, budget)
    device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(p.shape, generator=generator, device=device, dtype=torch.float64).to(p.device)
    kept = u < p  # p = 1: always; p = 0: never
    return torch.where(kept, 1.0 / p.clamp_min(torch.finfo(torch.float64).tiny), 0.0).float()


def _lsq_delta(v: torch.Tensor) -> torch.Tensor:
    """LSQ's d(x_hat / s)/ds per element (Esser et al. 2020 Eq. 3): round(v) - v inside [-8, 7], -8 below, 7 above."""
    return torch.where(v < QMIN, float(QMIN), torch.where(v > QMAX, float(QMAX), torch.round(v) - v))


def _inside(v: torch.Tensor) -> torch.Tensor:
    """The straight-through mask I = 1(-8 <= v <= 7), float32."""
    return ((v >= QMIN) & (v <= QMAX)).float()


class _Int4Gemms(torch.autograd.Function):
    """The three GEMMs of an Int4Linear (see the module docstring): fprop on HQ INT4 codes, dgrad and
    wgrad on the bit-split gradient (wgrad LSS-sampled), LSQ step-size gradients. FP32 throughout."""

    @staticmethod
    def forward(ctx: Any, x, weight, bias, x_step, w_step, layer: Int4Linear):  # x (N, D), weight (C, D)
        with torch.autocast(x.device.type, enabled=False):
            s_x, s_w = x_step.detach().float(), w_step.detach().float()
            v_x = block_hadamard(x.detach().float(), layer.hadamard_block) / s_x  # (N, D): XH / s_X
            v_w = block_hadamard(weight.detach().float(), layer.hadamard_block) / s_w  # (C, D): WH / s_W
            y = (lsq_codes(v_x) @ lsq_codes(v_w).t()) * (s_x * s_w)  # (N, C): integer GEMM, exact in FP32
            if bias is not None:
                y = y + bias.detach().float()
        ctx.layer, ctx.has_bias, ctx.x_dtype, ctx.w_dtype = layer, bias is not None, x.dtype, weight.dtype
        ctx.save_for_backward(v_x, v_w, s_x, s_w)  # codes are clamp(round(v)): not saved twice
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor):
        v_x, v_w, s_x, s_w = ctx.saved_tensors
        layer: Int4Linear = ctx.layer
        need_x, need_w, need_b, need_sx, need_sw = ctx.needs_input_grad[:5]
        with torch.autocast(dy.device.type, enabled=False):
            g = dy.float()  # (N, C)
            generator = layer.backward_generator()
            upper, lower, s_up, s_down = bit_split(g, generator)
            g_hat = s_up * upper + s_down * lower  # (N, C): dgrad uses every row
            dx = dw = db = dsx = dsw = None
            if need_x or need_sx:
                dx_h = g_hat @ (s_w * lsq_codes(v_w))  # (N, D): Ĝ s_W Ŵ, in the Hadamard domain
                if need_x:
                    dx = block_hadamard(_inside(v_x) * dx_h, layer.hadamard_block, transpose=True).to(ctx.x_dtype)
                if need_sx:
                    dsx = (_lsq_delta(v_x) * dx_h).sum().reshape(1) / math.sqrt(QMAX * v_x.numel())
            if need_w or need_sw:
                x_deq = s_x * lsq_codes(v_x)  # (N, D): s_X X̂
                g_sampled = layer.sampled_gradient(s_up * upper, s_down * lower, x_deq, generator)
                dw_h = g_sampled.t() @ x_deq  # (C, D)
                if need_w:
                    dw = block_hadamard(_inside(v_w) * dw_h, layer.hadamard_block, transpose=True).to(ctx.w_dtype)
                if need_sw:
                    dsw = (_lsq_delta(v_w) * dw_h).sum().reshape(1) / math.sqrt(QMAX * v_w.numel())
            if ctx.has_bias and need_b:
                db = g.sum(0)
        return dx, dw, db, dsx, dsw, None


# ---- modules ------------------------------------------------------------------------------------


class Int4Linear(nn.Linear):
    """``nn.Linear`` whose three GEMMs run as the paper's INT4 recipe (module docstring).

    Parameters: the ``nn.Linear``'s own ``weight`` and ``bias`` (a checkpoint moves between precisions),
    ``x_step`` and ``w_step`` (LSQ step sizes, shape (1,)); buffer ``initialized`` (2,) bool: whether
    each step was set from data. ``draws`` counts backward passes (the random stream's position).
    """

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, hadamard_block: int = 32, lss: bool = True, seed: int = 0, index: int = 0
    ) -> Int4Linear:
        """An Int4Linear sharing ``linear``'s parameters (no copy: tied weights stay tied)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight, layer.bias = linear.weight, linear.bias
        _check_block(hadamard_block)
        if layer.in_features % hadamard_block:
            raise LowbitError(
                f"hadamard_block {hadamard_block} does not divide in_features {layer.in_features}; "
                f"valid: {_valid_blocks(layer.in_features)}"
            )
        device = linear.weight.device
        layer.x_step = nn.Parameter(torch.ones(1, device=device))
        layer.w_step = nn.Parameter(torch.ones(1, device=device))
        layer.register_buffer("initialized", torch.zeros(2, dtype=torch.bool, device=device))
        layer.hadamard_block, layer.lss, layer.seed, layer.index = hadamard_block, bool(lss), int(seed), index
        layer.draws = 0
        layer.sr_generator = None  # set to draw from a generator of your own (tests); None: the seeded stream
        layer.sets_parameters_in_forward = True  # the first training forward sets the steps (FSDP2: set_parameter)
        return layer

    def no_weight_decay(self) -> set[str]:
        """The step sizes are not decayed (decay would pull them toward clipping everything)."""
        return {"x_step", "w_step"}

    def backward_generator(self) -> torch.Generator:
        """The generator of one backward's draws: ``sr_generator`` when set, else a CPU generator seeded
        from (seed, backward count, layer index, rank), the same numbers on every device."""
        draws, self.draws = self.draws, self.draws + 1
        if self.sr_generator is not None:
            return self.sr_generator
        generator = torch.Generator(device="cpu")
        generator.manual_seed(step_seed(self.seed, draws, self.index, world()[0]))
        return generator

    def sampled_gradient(
        self, g_up: torch.Tensor, g_down: torch.Tensor, x_deq: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        """The wgrad's left operand (N, C): g_up + g_down (``lss`` off), or each of the 2N stacked rows
        [g_up; g_down] weighted m_i / p_i (LSS: scores |g row| · |x_deq row|, Σp = N)."""
        if not self.lss:
            return g_up + g_down
        n = g_up.shape[0]
        x_norm = x_deq.norm(dim=1)  # (N,): the paired rows of [X̂; X̂] are the same
        scores = torch.cat([g_up.norm(dim=1) * x_norm, g_down.norm(dim=1) * x_norm])  # (2N,)
        weights = lss_row_weights(scores, n, generator)
        return g_up * weights[:n, None] + g_down * weights[n:, None]

    def _step(self, name: str, flag: int, t: torch.Tensor, *, activation: bool) -> torch.Tensor:
        """The step of ``t`` this forward uses: the learned one once set; before, LSQ's initial value from
        ``t`` itself, stored at the first training forward where ``t`` is nonzero."""
        param = getattr(self, name)
        if bool(self.initialized[flag]):
            return param
        with torch.no_grad():
            step = _initial_step(block_hadamard(t.detach().float(), self.hadamard_block))
            reduced = activation and world()[1] > 1  # an activation's step: the mean over every rank's batch
            if reduced:
                step = all_reduce_mean(step)
            nonzero = all_reduce_max(step.gt(0).float()) if reduced else step.gt(0)
            if self.training and bool(nonzero):
                set_parameter(self, name, step.reshape(1))
                self.initialized[flag] = True
                return param
        # evaluated before training (the sanity check), or an all-zero tensor (adaLN-Zero): nothing kept, and
        # the parameter gets a zero gradient (DDP expects one from every parameter)
        return step.reshape(1) + 0 * param

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_step = self._step("x_step", 0, x, activation=True)
        w_step = self._step("w_step", 1, self.weight, activation=False)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        x_step = x_step.abs().clamp_min(_TINY)  # steps kept positive, as the reference's .abs()
        w_step = w_step.abs().clamp_min(_TINY)
        y = _Int4Gemms.apply(x.reshape(-1, self.in_features), self.weight, self.bias, x_step, w_step, self)
        return y.reshape(*x.shape[:-1], self.out_features).to(dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, hadamard_block={self.hadamard_block}, lss={self.lss}"


def int4_layers(module: nn.Module) -> dict[str, Int4Linear]:
    """The Int4Linear layers of a module, by fully-qualified name."""
    return {name: m for name, m in module.named_modules() if isinstance(m, Int4Linear)}


def _check_block(block: Any) -> int:
    if isinstance(block, bool) or not isinstance(block, int) or block < 1 or block & (block - 1):
        raise LowbitError(f"int4 hadamard_block must be a power of two (1, 2, 4, ..., 32, 64, ...), got {block!r}")
    return block


def _valid_blocks(width: int) -> str:
    """The powers of two dividing ``width``, as a list to read."""
    return ", ".join(str(1 << k) for k in range((width & -width).bit_length()))


# ---- precision plugin ---------------------------------------------------------------------------


class Int4Precision(AutocastPrecision):
    """INT4 training (Xi et al. 2023): HQ + LSQ INT4 forward, bit-split gradients with leverage score
    sampling in the weight gradient (module docstring). Every eligible ``nn.Linear`` becomes an
    ``Int4Linear``; a layer whose in_features ``hadamard_block`` does not divide is an error.

    Args:
        hadamard_block: the Hadamard blocks' size, a power of two dividing every converted layer's in_features.
        lss: leverage score sampling in wgrad (the paper's method); false keeps every row (the reference code).
        keep, keep_last_blocks: high-precision layers, as the other precisions (``DEFAULT_KEEP``: the head).
        seed: seeds the stochastic rounding and the sampling, with the layer and its backward count.
        device_type, mode: the autocast of ``AutocastPrecision`` (the INT4 GEMMs compute in FP32 regardless).
    """

    lowbit_plugin_api = 1
    name = "int4"

    def __init__(
        self,
        *,
        hadamard_block: int = 32,
        lss: bool = True,
        keep: Sequence[str] = DEFAULT_KEEP,
        keep_last_blocks: int | float = 0,
        seed: int = 0,
        device_type: str | None = None,
        mode: str = "auto",
    ) -> None:
        super().__init__(device_type=device_type, mode=mode)
        self.hadamard_block = _check_block(hadamard_block)
        if not isinstance(lss, bool):
            raise LowbitError(f"int4 lss must be true or false, got {lss!r}")
        self.lss, self.seed = lss, int(seed)
        self.keep, self.keep_last_blocks = list(keep), keep_last_blocks
        self.report = ConversionReport()
        self._layers: dict[str, Int4Linear] = {}
        self._pending_draws: dict[str, int] | None = None

    @property
    def description(self) -> str:
        r = self.report
        total = len(r.converted) + len(r.kept) + len(r.misfit)
        what = f"{self.name} (HQ-{self.hadamard_block} + LSQ forward, bit split{' + LSS' if self.lss else ''} backward)"
        if not total:
            return f"{what} (not applied yet), {self.compute}"
        return f"{what}: {len(r.converted)} of {total} Linear layers quantized, {self.compute}"

    def convert_module(self, module: nn.Module) -> nn.Module:
        self._check_widths(module)
        report = replace_linears(
            module,
            lambda linear: Int4Linear.from_linear(
                linear, hadamard_block=self.hadamard_block, lss=self.lss, seed=self.seed
            ),
            {"in": self.hadamard_block},
            keep=self.keep,
            keep_last_blocks=self.keep_last_blocks,
            skip=Int4Linear,
        )
        if report.converted or not self.report.converted:  # a second call (Lightning's) finds nothing new
            self.report = report
        self._layers = int4_layers(module)
        for index, layer in enumerate(self._layers.values()):  # module order: the same on every rank and run
            layer.index = index
        if self._pending_draws is not None:
            self._apply_draws(self._pending_draws)
            self._pending_draws = None
        return module

    def _check_widths(self, module: nn.Module) -> None:
        """Before anything changes: every layer to convert has in_features the block divides, or one error."""
        eligible = _eligible(module, self.keep, self.keep_last_blocks)
        misfit = [(name, m.in_features) for name, m in eligible if m.in_features % self.hadamard_block]
        if not misfit:
            return
        name, width = misfit[0]
        more = f" (and {len(misfit) - 1} more layers)" if len(misfit) > 1 else ""
        common = math.gcd(*(m.in_features for _, m in eligible))
        raise LowbitError(
            f"precision 'int4': hadamard_block {self.hadamard_block} does not divide in_features {width} of Linear "
            f"layer '{name}'{more}; blocks dividing every converted layer: {_valid_blocks(common)} "
            "(or keep the layer in high precision: precision.keep)"
        )

    # ---- state: each layer's backward count, so that a resumed run draws as the uninterrupted one -------
    def state_dict(self) -> dict[str, Any]:
        return {
            "hadamard_block": self.hadamard_block,
            "lss": self.lss,
            "seed": self.seed,
            "draws": {name: layer.draws for name, layer in self._layers.items()},
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        draws = dict(state_dict.get("draws", {}))
        if self._layers:
            self._apply_draws(draws)
        else:  # restored before conversion: applied when the layers exist
            self._pending_draws = draws

    def _apply_draws(self, draws: Mapping[str, int]) -> None:
        for name, count in draws.items():
            if name in self._layers:
                self._layers[name].draws = int(count)


def _eligible(module: nn.Module, keep: Sequence[str], keep_last_blocks: int | float) -> list[tuple[str, nn.Linear]]:
    """The Linear layers the converter would take, widths aside: a dry run of ``replace_linears`` that
    replaces each layer by itself (no width rule, so nothing is reported as a misfit)."""
    report = replace_linears(
        module, lambda linear: linear, {}, keep=keep, keep_last_blocks=keep_last_blocks, skip=Int4Linear
    )
    return [(name, module.get_submodule(name)) for name in report.converted]
