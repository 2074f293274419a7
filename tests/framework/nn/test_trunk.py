"""The trunk: RMSNorm and SwiGLU by formula, attention against a naive reference, masks."""

import math

import pytest
import torch
import torch.nn.functional as F

from lowbit.nn.attention import SelfAttention
from lowbit.nn.mlp import SwiGLU, swiglu_hidden
from lowbit.nn.norm import RMSNorm
from lowbit.nn.posenc import PositionalEncoding, positions_1d, positions_2d
from lowbit.nn.transformer import Transformer, attention_mask


def test_rmsnorm_matches_formula():
    torch.manual_seed(0)
    norm = RMSNorm(8, eps=1e-6)
    norm.weight.data = torch.linspace(0.5, 2, 8)
    x = torch.randn(3, 5, 8)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected, rtol=1e-6, atol=1e-6)
    assert norm(x.bfloat16()).dtype == torch.bfloat16


def test_swiglu_matches_formula_and_hidden_rounds_to_32():
    assert swiglu_hidden(192) == 512 and swiglu_hidden(100) == 288 and swiglu_hidden(96, 4.0) == 384
    torch.manual_seed(0)
    mlp = SwiGLU(8, 32)
    x = torch.randn(2, 3, 8)
    w_gate, w_up = mlp.fc_in.weight[:32], mlp.fc_in.weight[32:]
    expected = (F.silu(x @ w_gate.T) * (x @ w_up.T)) @ mlp.fc_out.weight.T
    torch.testing.assert_close(mlp(x), expected)


def _naive_attention(attn, x, bias, causal):
    B, T, C = x.shape
    q, k, v = (x @ attn.qkv.weight.T).split(C, dim=2)
    heads = lambda t: t.view(B, T, attn.n_heads, -1).transpose(1, 2)  # (B, nh, T, hs)
    q, k, v = heads(q), heads(k), heads(v)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, nh, T, T)
    if bias is not None:
        scores = scores + bias
    if causal:
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)
    return y @ attn.proj.weight.T


class _LinearBias(PositionalEncoding):
    """A test encoding with an additive bias −|i−j|·slope_h."""

    def bias(self, q_pos, k_pos):
        slopes = torch.tensor([0.5, 0.25])[:, None, None]
        return -slopes * (q_pos[:, None] - k_pos[None, :]).abs().float()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_attention_matches_naive_reference(causal, with_bias):
    torch.manual_seed(0)
    attn = SelfAttention(8, n_heads=2)
    x = torch.randn(2, 6, 8)
    pos = positions_1d(6)
    pe = _LinearBias() if with_bias else PositionalEncoding()
    bias = pe.bias(pos, pos)
    mask = attention_mask(bias, causal, 6, 6)
    torch.testing.assert_close(
        attn(x, pos, pe, mask, causal), _naive_attention(attn, x, bias, causal), rtol=1e-5, atol=1e-5
    )


def test_attention_mask_folds_causal_into_bias():
    bias = torch.zeros(2, 3, 3)
    mask = attention_mask(bias, causal=True, tq=3, tk=3)
    assert torch.isinf(mask[:, 0, 1:]).all() and (mask[:, 2] == 0).all()
    assert attention_mask(None, True, 3, 3) is None
    assert attention_mask(bias, False, 3, 3) is bias
    # a query block at the end of a longer key sequence (decoding): query i sits at position tk - tq + i
    tail = attention_mask(torch.zeros(1, 2, 4), True, 2, 4)
    assert torch.isinf(tail[0, 0, 3]) and not torch.isinf(tail[0, 1]).any()


def test_bias_is_built_once_per_forward():
    calls = []

    class Counting(_LinearBias):
        def bias(self, q_pos, k_pos):
            calls.append(1)
            return super().bias(q_pos, k_pos)

    trunk = Transformer(8, n_layers=3, n_heads=2)
    trunk(torch.randn(1, 5, 8), positions_1d(5), Counting(), causal=True)
    assert len(calls) == 1


def test_positions_2d_is_row_major():
    pos = positions_2d(2, 3)
    assert pos.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
