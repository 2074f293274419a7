"""GPT: shapes, causality, weight tying, init, clear errors."""

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.models.gpt import GPT


def test_gpt_is_causal_and_shapes_are_right():
    torch.manual_seed(0)
    model = GPT(vocab_size=256, dim=32, n_layers=2, n_heads=4, max_len=16, posenc="none")
    idx = torch.randint(0, 256, (2, 12))
    logits = model(idx)
    assert logits.shape == (2, 12, 256)
    changed = idx.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 256
    torch.testing.assert_close(model(changed)[:, :7], logits[:, :7], rtol=0, atol=0)
    assert not torch.allclose(model(changed)[:, 7:], logits[:, 7:])


def test_weight_tying_and_residual_init():
    torch.manual_seed(0)
    tied = GPT(dim=64, n_layers=4, n_heads=4, posenc="none")
    assert tied.lm_head.weight is tied.tok_emb.weight
    untied = GPT(dim=64, n_layers=4, n_heads=4, posenc="none", tie_weights=False)
    assert untied.num_params() == tied.num_params() + 256 * 64
    proj = torch.cat([b.attn.proj.weight.flatten() for b in untied.trunk.blocks])
    qkv = torch.cat([b.attn.qkv.weight.flatten() for b in untied.trunk.blocks])
    assert proj.std().item() == pytest.approx(0.02 / (2 * 4) ** 0.5, rel=0.05)
    assert qkv.std().item() == pytest.approx(0.02, rel=0.05)


def test_gpt_backward_reaches_every_parameter():
    model = GPT(dim=32, n_layers=2, n_heads=2, max_len=8, posenc="none")
    model(torch.randint(0, 256, (2, 8))).logsumexp(-1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_bad_shapes_are_clear_errors():
    with pytest.raises(LowbitError, match="model.dim 30 is not divisible by model.n_heads 4"):
        GPT(dim=30, n_heads=4, posenc="none")
