"""adaLN-Zero: the modulation formula, identity at init, and the block by hand once it is awake."""

import torch
import torch.nn.functional as F

from lowbit.nn.adaln import AdaLNBlock, AdaLNFinal, modulate, plain_norm
from lowbit.nn.posenc import PositionalEncoding, positions_2d


def test_modulate_and_plain_norm_match_their_formulas():
    torch.manual_seed(0)
    x, shift, scale = torch.randn(2, 5, 8), torch.randn(2, 8), torch.randn(2, 8)
    torch.testing.assert_close(modulate(x, shift, scale), x * (1 + scale[:, None, :]) + shift[:, None, :])
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    torch.testing.assert_close(plain_norm("layernorm", x), (x - mean) / torch.sqrt(var + 1e-6))
    torch.testing.assert_close(plain_norm("rmsnorm", x), x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


def test_fresh_block_is_exactly_the_identity_and_fresh_final_layer_outputs_zero():
    torch.manual_seed(0)
    block, final = AdaLNBlock(16, 2), AdaLNFinal(16, 4)
    x, c, pos = torch.randn(3, 9, 16), torch.randn(3, 16), positions_2d(3, 3)
    assert torch.equal(block(x, c, pos, PositionalEncoding(), None), x)  # gates α = 0: both branches vanish
    assert torch.equal(final(x, c), torch.zeros(3, 9, 4))


def test_awake_block_matches_the_dit_equations():
    torch.manual_seed(0)
    block = AdaLNBlock(16, 2, norm="layernorm")
    torch.nn.init.normal_(block.adaLN_modulation[1].weight, std=0.3)
    x, c, pos = torch.randn(2, 4, 16), torch.randn(2, 16), positions_2d(2, 2)
    b1, g1, a1, b2, g2, a2 = block.adaLN_modulation(c).chunk(6, dim=-1)
    h = block.attn(modulate(F.layer_norm(x, (16,), eps=1e-6), b1, g1), pos, PositionalEncoding(), None, False)
    mid = x + a1[:, None] * h
    want = mid + a2[:, None] * block.mlp(modulate(F.layer_norm(mid, (16,), eps=1e-6), b2, g2))
    out = block(x, c, pos, PositionalEncoding(), None)
    torch.testing.assert_close(out, want)
    assert not torch.allclose(out, x)
