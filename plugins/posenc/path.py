"""PaTH: position encoding by accumulating Householder transformations (Yang et al. 2025,
"PaTH Attention: Position Encoding via Accumulating Householder Transformations", arXiv 2505.16381).

Each token t gives every head a Householder-like matrix (the paper's definition of PaTH)

    H_t = I − β_t w_t w_tᵀ,   w_t = v_t / ‖v_t‖ per head,   v_t = SiLU(ShortConv(W_w x)_t),
    β_t = 2·sigmoid(W_β x_t + b) ∈ (0, 2),

and the logit of query i and key j ≤ i is k_jᵀ (∏_{s=j+1..i} H_s) q_i = q_iᵀ H_i H_{i−1} ⋯ H_{j+1} k_j (an empty
product, I, for j = i), scaled by 1/sqrt(head_dim), then causal softmax and ·V. With β_t > 1, H_t has the
negative eigenvalue 1 − β_t; with β = 0 everywhere, PaTH is attention without positions (NoPE). W_w is
low-rank (rank 32) and followed by a causal depthwise convolution of width 3 and a SiLU, as in the authors'
code (flash-linear-attention's ``PaTHAttention``, whose init, N(0, 0.02) weights and zero biases, is also GPT-2's).

Training uses the paper's blockwise algorithm (sec. 3, efficient training): a chunk's product of Householders
in the compact WY form I − Wᵀ A⁻¹ diag(β) W, A = I + strictly-lower(diag(β) W Wᵀ) (the UT transform: one
triangular solve); queries and keys carried to their chunk's boundaries; each earlier chunk's product applied
to the queries one chunk at a time. It yields the *correction* Δ_ij = q_iᵀk_j − logit_ij, every term of which
carries a β, and the attention is ``scaled_dot_product_attention`` of q, k, v with −Δ/sqrt(d) as an additive
mask: with β = 0 its output is the NoPE attention's bit for bit.

The projections live on each attention layer (``attach``: ``attn.path``) as ordinary ``nn.Linear`` and
``nn.Conv1d`` modules, so they shard, checkpoint and quantize with their block; the Householder products
are computed in float32 (float64 for float64 inputs), outside autocast.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
from lowbit.nn.posenc import PositionalEncoding

__all__ = [
    "PaTH",
    "PaTHProjections",
    "path_attention",
    "path_attention_reference",
    "path_logit_corrections",
    "path_logits_reference",
]

# w = v / sqrt(‖v‖² + eps): unit as the paper defines it, and 0 (H = I) for v = 0 rather than NaN. The authors'
# code guards with 1e-6, negligible at their widths (‖v‖² ~ 1e-4) but not at GPT-2-initialised small ones here.
NORM_EPS = 1e-12


# ---- functions -----------------------------------------------------------------------------------


def path_logits_reference(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Unscaled PaTH logits by definition: q_iᵀ H_i ⋯ H_{j+1} k_j with explicit d×d matrices, O(T²·d²).

    q, k, w (B, nh, T, d), beta (B, nh, T) → (B, nh, T, T), −inf above the diagonal (keys after the query).
    For tests on tiny sizes (the attention logit that defines PaTH, Yang et al. 2025).
    """
    B, nh, T, d = q.shape
    eye = torch.eye(d, dtype=q.dtype, device=q.device)
    householder = eye - beta[..., None, None] * w[..., :, None] * w[..., None, :]  # (B, nh, T, d, d): H_t
    rows = []
    for i in range(T):
        row = q.new_full((B, nh, T), float("-inf"))
        product = eye.expand(B, nh, d, d)  # H_i ⋯ H_{j+1}, empty for j = i
        for j in range(i, -1, -1):
            row[..., j] = torch.einsum("bhd,bhde,bhe->bh", q[:, :, i], product, k[:, :, j])
            product = product @ householder[:, :, j]  # the next key back is carried through H_j too
        rows.append(row)
    return torch.stack(rows, dim=-2)


def path_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, beta: torch.Tensor
) -> torch.Tensor:
    """softmax(logits / sqrt(d))·V with the logits of ``path_logits_reference``; (B, nh, T, d)."""
    logits = path_logits_reference(q, k, w, beta) / math.sqrt(q.shape[-1])
    return torch.softmax(logits, dim=-1) @ v


def _chunked(t: torch.Tensor, size: int, count: int) -> torch.Tensor:
    """(B, nh, T, ...) → (B, nh, count, size, ...), zero-padded at the end: a padded token has w = 0, β = 0 (H = I)."""
    pad = count * size - t.shape[2]
    if pad:
        t = F.pad(t, (0, 0) * (t.dim() - 3) + (0, pad))
    return t.reshape(*t.shape[:2], count, size, *t.shape[3:])


def _correction_blocks(
    q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, beta: torch.Tensor, chunk_size: int
) -> list[torch.Tensor]:
    """Δ of ``path_logit_corrections`` by blocks of C = chunk_size: ``blocks[s]`` (B, nh, n − s, C, C) holds, for
    query chunks I = s..n−1, the block against key chunk I − s (``blocks[0]``: each chunk against itself, 0 above
    its diagonal). Slices, not writes into one tensor: autograd would copy that tensor's gradient once per write."""
    B, nh, T, d = q.shape
    size = max(1, min(chunk_size, T))
    n = -(-T // size)
    qc, kc, wc = (_chunked(t, size, n) for t in (q, k, w))  # (B, nh, n, C, d)
    wb = _chunked(beta[..., None], size, n) * wc  # rows β_t w_t
    strictly_lower = torch.ones(size, size, dtype=torch.bool, device=q.device).tril(-1)
    gram = (wb @ torch.cat([wc, kc], dim=-2).transpose(-1, -2)).masked_fill(~strictly_lower.repeat(1, 2), 0.0)
    ww, s = gram.split(size, dim=-1)  # β_s w_s·w_t for t < s; S_tj = β_t w_t·k_j for t > j
    unit_lower = ww + torch.eye(size, dtype=q.dtype, device=q.device)
    solved = torch.linalg.solve_triangular(unit_lower, torch.cat([wb, s], dim=-1), upper=False, unitriangular=True)
    u, x = solved.split([d, size], dim=-1)  # U = A⁻¹ diag(β) W, X = A⁻¹ S
    a, local = ((qc @ wc.transpose(-1, -2)).tril() @ solved).split([d, size], dim=-1)  # q_i·w_s summed over s ≤ i
    b = x.transpose(-1, -2) @ wc
    q_hat, k_hat = qc - a, kc - b  # carried to their chunk's start and end

    # query chunk I against key chunk J = I − step: Δ = a·k + q̂·b + c·k̂, c = q̂ − q̂ P_{I−1} ⋯ P_{J+1} (0 for step 1)
    left, right = torch.cat([a, q_hat], dim=-1), torch.cat([kc, b], dim=-1)  # (B, nh, n, C, 2d)
    blocks = [local]
    carried = None  # c of query chunks step.. after each step, (B, nh, n − step, C, d)
    for step in range(1, n):
        term = left[:, :, step:] @ right[:, :, : n - step].transpose(-1, -2)  # (B, nh, n − step, C, C)
        if step >= 2:  # carry q̂ − c on through chunk I − step + 1's product I − Wᵀ U
            previous = None if carried is None else carried[:, :, 1:]
            ahead = q_hat[:, :, step:] if previous is None else q_hat[:, :, step:] - previous
            between = slice(1, n - step + 1)
            reach = (ahead @ wc[:, :, between].transpose(-1, -2)) @ u[:, :, between]
            carried = reach if previous is None else previous + reach
            term = term + carried @ k_hat[:, :, : n - step].transpose(-1, -2)
        blocks.append(term)
    return blocks


def _assemble(blocks: list[torch.Tensor], future: float, dtype: torch.dtype) -> torch.Tensor:
    """(B, nh, n·C, n·C) in ``dtype``: the blocks on and below the diagonal blocks, ``future`` above the diagonal."""
    B, nh, n, C, _ = blocks[0].shape
    out = torch.full((B, nh, n * C, n * C), future, dtype=dtype, device=blocks[0].device)
    grid = out.view(B, nh, n, C, n, C)  # [:, :, I, :, J, :] is block (I, J)
    upper = torch.ones(C, C, dtype=torch.bool, device=out.device).triu(1)
    for step, block in enumerate(blocks):
        block = block.masked_fill(upper, future) if step == 0 else block
        grid.diagonal(offset=-step, dim1=2, dim2=4).copy_(block.permute(0, 1, 3, 4, 2))
    return out


def _take(grad: torch.Tensor, count: int, size: int) -> list[torch.Tensor]:
    """Views of the output's ``grad`` (B, nh, T, T): the gradients of ``_assemble``'s blocks of C = ``size``."""
    B, nh, T, _ = grad.shape
    if count * size != T:
        grad = F.pad(grad, (0, count * size - T, 0, count * size - T))
    grid = grad.contiguous().view(B, nh, count, size, count, size)
    grads = [grid.diagonal(offset=-step, dim1=2, dim2=4).permute(0, 1, 4, 2, 3) for step in range(count)]
    grads[0] = grads[0].tril()  # above the diagonal the output is ``future``, not the block
    return grads


class _Assembled(torch.autograd.Function):
    """``_assemble`` with a backward (``_take``): one fill and one write per element, where slices written
    into one tensor would each copy its whole gradient, and concatenations the whole output twice."""

    @staticmethod
    def forward(ctx, future, dtype, *blocks):
        ctx.count, ctx.size, ctx.block_dtype = len(blocks), blocks[0].shape[-1], blocks[0].dtype
        return _assemble(list(blocks), future, dtype)

    @staticmethod
    def backward(ctx, grad):
        return (None, None, *(g.to(ctx.block_dtype) for g in _take(grad, ctx.count, ctx.size)))


def path_logit_corrections(
    q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, beta: torch.Tensor, chunk_size: int = 64
) -> torch.Tensor:
    """Δ (B, nh, T, T) with q_iᵀ H_i ⋯ H_{j+1} k_j = q_iᵀk_j − Δ_ij for j ≤ i (0 above the diagonal), in float32
    (float64 for float64 inputs).

    The blockwise algorithm of Yang et al. 2025 (sec. 3) over chunks of ``chunk_size`` tokens (the last
    one zero-padded: w = 0, β = 0 there, so H = I). Per chunk, the UT transform, A = I + strictly-lower(diag(β) W Wᵀ)
    and U = A⁻¹ diag(β) W, gives the chunk's product H_last ⋯ H_first = I − Wᵀ U; the queries are carried back
    to their chunk's start, q̂ = q − a with a = tril(Q Wᵀ) U, the keys on to their chunk's end, k̂ = k − b with
    b = Xᵀ W, X = A⁻¹ strictly-lower(diag(β) W Kᵀ). Within a chunk Δ = tril(Q Wᵀ) X; query chunk I against an
    earlier key chunk J, with the queries carried on through the chunks between, q̂ − c = q̂ P_{I−1} ⋯ P_{J+1}
    (c grown one chunk product P at a time): Δ = a·k + q̂·b + c·k̂. Every term carries a β: with β = 0, Δ is 0.
    """
    T, exact = q.shape[-2], torch.promote_types(q.dtype, torch.float32)
    blocks = _correction_blocks(q.to(exact), k.to(exact), w.to(exact), beta.to(exact), chunk_size)
    return _Assembled.apply(0.0, exact, *blocks)[:, :, :T, :T]


class _PaTHAttention(torch.autograd.Function):
    """Causal attention with the additive mask −Δ/sqrt(d) (+ ``bias``), given by its blocks.

    Forward: SDPA's fused kernel with the mask in q's dtype (for a mask that needs a gradient SDPA would take
    its math kernel, ~10× slower on CPUs). Backward: softmax attention's, recomputed in float32 from q, k, v
    and the blocks, in differentiable ops (so a double backward, DEQ's Jacobian regulariser, works)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, *blocks):
        mask = _assemble(list(blocks), float("-inf"), q.dtype)[:, :, : q.shape[-2], : q.shape[-2]]
        if bias is not None:  # it holds the causal −inf already
            mask = mask + bias.to(q.dtype)
        ctx.save_for_backward(q, k, v, bias, *blocks)
        # detached: SDPA picks its math kernel for inputs that require grad, even with grad mode off
        return F.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), attn_mask=mask)

    @staticmethod
    def backward(ctx, dy):
        q, k, v, bias, *blocks = ctx.saved_tensors
        B, nh, T, d = q.shape
        exact, scale = torch.promote_types(q.dtype, torch.float32), 1.0 / math.sqrt(d)
        with torch.autocast(q.device.type, enabled=False):
            mask = _Assembled.apply(float("-inf"), exact, *blocks)[:, :, :T, :T]
            if bias is not None:
                mask = mask + bias.to(exact)
            q32, k32, v32, dy32 = (t.to(exact).flatten(0, 1) for t in (q, k, v, dy))  # (B·nh, T, d)
            scores = torch.baddbmm(mask.flatten(0, 1), q32, k32.transpose(-1, -2), alpha=scale)
            p = torch.softmax(scores, dim=-1)  # (B·nh, T, T)
            dp = dy32 @ v32.transpose(-1, -2)
            # softmax's backward p ⊙ (dp − rowsum(p ⊙ dp)): the mask's gradient; in place unless it is recorded
            if torch.is_grad_enabled():
                ds = p * (dp - (p * dp).sum(-1, keepdim=True))
            else:
                ds = dp.mul_(p)
                ds.addcmul_(p, ds.sum(-1, keepdim=True), value=-1.0)
            dq, dk = (ds @ k32) * scale, (ds.transpose(-1, -2) @ q32) * scale
            dv = p.transpose(-1, -2) @ dy32
            ds = ds.view(B, nh, T, T)
            block_grads = _take(ds, len(blocks), blocks[0].shape[-1])
            bias_grad = ds.sum_to_size(bias.shape).to(bias.dtype) if ctx.needs_input_grad[3] else None
        dq, dk, dv = (t.view(B, nh, T, d).to(q.dtype) for t in (dq, dk, dv))
        return dq, dk, dv, bias_grad, *block_grads


def path_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    beta: torch.Tensor,
    chunk_size: int = 64,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal PaTH attention (B, nh, T, d): SDPA of q, k, v with −Δ/sqrt(d) as an additive mask.

    q, k, v (B, nh, T, d) in the compute dtype; w (B, nh, T, d), beta (B, nh, T). Δ is computed in float32
    (float64 for float64 inputs) with autocast off; SDPA gets the mask in q's dtype. ``attn_mask``: an
    additive (…, T, T) mask that already holds the causal −inf (the trunk's folded bias), else causal.
    """
    exact = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        # Δ is linear in q: the blocks of −Δ/sqrt(d) from −q/sqrt(d)
        scaled_q = q.to(exact) * (-1.0 / math.sqrt(q.shape[-1]))
        blocks = _correction_blocks(scaled_q, k.to(exact), w.to(exact), beta.to(exact), chunk_size)
        return _PaTHAttention.apply(q, k, v, attn_mask, *blocks)


def _check_count(option: str, value: object, least: int, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise LowbitError(f"path {option} must be an integer ≥ {least} ({hint}), got {value!r}")


# ---- modules -------------------------------------------------------------------------------------


class PaTHProjections(nn.Module):
    """One attention layer's w_t and β_t from its input x (B, T, D): ``w`` (low-rank or full ``nn.Linear``),
    ``conv`` (causal depthwise ``nn.Conv1d`` + SiLU, or None) and ``beta`` (``nn.Linear`` to one logit per head).

    Initialised as the authors' model (and GPT-2's init, which re-draws the same): N(0, 0.02) weights, zero bias.
    """

    def __init__(self, dim: int, n_heads: int, w_rank: int, conv_size: int) -> None:
        super().__init__()
        self.n_heads, self.conv_size = n_heads, conv_size
        if w_rank:
            self.w = nn.Sequential(nn.Linear(dim, w_rank, bias=False), nn.Linear(w_rank, dim, bias=False))
        else:
            self.w = nn.Linear(dim, dim, bias=False)
        self.conv = nn.Conv1d(dim, dim, conv_size, groups=dim, bias=False) if conv_size else None
        self.beta = nn.Linear(dim, n_heads)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        """N(0, std) weights (the linear maps and the convolution), zero biases."""
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=std)
            else:
                nn.init.zeros_(p)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, D) → w (B, nh, T, hs) with unit rows, β (B, nh, T) in (0, 2); float32 (float64 for float64 x)."""
        B, T, D = x.shape
        exact = torch.promote_types(x.dtype, torch.float32)
        w = self.w(x)  # (B, T, D)
        if self.conv is not None:  # causal: token t mixes tokens t − conv_size + 1 .. t
            w = F.silu(self.conv(F.pad(w.transpose(1, 2), (self.conv_size - 1, 0)))).transpose(1, 2)
        w = w.to(exact).view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2)  # (B, nh, T, hs)
        w = w * torch.rsqrt(w.square().sum(-1, keepdim=True) + NORM_EPS)
        beta = 2 * torch.sigmoid(self.beta(x).to(exact)).transpose(1, 2)  # (B, nh, T)
        return w, beta

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}"


class PaTH(PositionalEncoding):
    """Data-dependent multiplicative encoding: accumulated Householder products between query and key
    (Yang et al. 2025, arXiv 2505.16381; the equations are in this module's docstring). Causal text models only.

    Args (context): dim, n_heads, head_dim.
    Options:
        chunk_size: tokens per chunk of the blockwise algorithm (any length works; the last chunk is padded).
        w_rank: rank of the projection x → w (the authors' 32); 0 for a full dim×dim ``nn.Linear``.
        conv_size: width of the causal depthwise convolution (+ SiLU) on w (the authors' 3); 0 for none.
    ``attach`` gives each attention layer its ``path`` projections; ``attend`` computes its attention.
    """

    lowbit_plugin_api = 1
    pos_dims = (1,)

    def __init__(
        self, dim: int, n_heads: int, head_dim: int, chunk_size: int = 64, w_rank: int = 32, conv_size: int = 3
    ) -> None:
        super().__init__()
        if n_heads * head_dim != dim:
            raise LowbitError(
                f"path needs dim = n_heads·head_dim, got dim={dim}, n_heads={n_heads}, head_dim={head_dim}"
            )
        _check_count("chunk_size", chunk_size, 1, "64 as in the authors' code")
        _check_count("w_rank", w_rank, 0, "32 as in the authors' code; 0 = a full-rank projection")
        _check_count("conv_size", conv_size, 0, "3 as in the authors' code; 0 = no convolution")
        self.dim, self.n_heads, self.head_dim = dim, n_heads, head_dim
        self.chunk_size, self.w_rank, self.conv_size = chunk_size, w_rank, conv_size

    def attach(self, attn: nn.Module) -> None:
        """Give an attention layer its projections as ``attn.path`` (a ``PaTHProjections``)."""
        attn.path = PaTHProjections(self.dim, self.n_heads, self.w_rank, self.conv_size)

    def bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> None:
        """No additive bias; checks the positions are 1-D (the trunk calls this once per forward)."""
        self.check_positions(q_pos)
        self.check_positions(k_pos)
        return None

    def attend(
        self,
        attn: nn.Module,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None,
        causal: bool,
    ) -> torch.Tensor:
        """q, k, v (B, nh, T, hs) and the layer's input x (B, T, D) → the PaTH attention output (B, nh, T, hs)."""
        if not causal:
            raise LowbitError(
                "path is defined for causal attention only (keys j ≤ i, products H_i ⋯ H_{j+1}); "
                "use it in a causal LM (gpt, deq_gpt) and another posenc for bidirectional models"
            )
        projections = getattr(attn, "path", None)
        if not isinstance(projections, PaTHProjections):
            raise LowbitError(
                f"path found no projections on {type(attn).__name__}: the model must call "
                "lowbit.nn.attention.attach_posenc(trunk, posenc) after building its trunk"
            )
        w, beta = projections(x)  # (B, nh, T, hs), (B, nh, T)
        return path_attention(q, k, v, w, beta, self.chunk_size, attn_mask)

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}, chunk_size={self.chunk_size}, w_rank={self.w_rank}, conv_size={self.conv_size}"
