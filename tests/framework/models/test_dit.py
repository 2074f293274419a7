"""DiT: shapes, adaLN-Zero at init, patchify/unpatchify, embeddings by formula, every 2-D posenc, errors."""

import math

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.models.dit import DiT, LabelEmbedder, timestep_embedding
from lowbit.registry import registry

SMALL = dict(image_size=8, patch_size=2, in_chans=1, num_classes=10, dim=32, n_layers=2, n_heads=4)
POSENCS = registry.names("posenc")
TWO_D = [name for name in POSENCS if 2 in registry.load("posenc", name).pos_dims]
ONE_D_ONLY = [name for name in POSENCS if name not in TWO_D]


def wake(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Give the zero-initialised adaLN modulations and the output layer small random weights."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "adaLN_modulation" in name or name.startswith("final."):
            p.data = std * torch.randn(p.shape, generator=gen)
    return model


def batch(b: int = 3, size: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, 1, size, size, generator=gen),
        torch.randint(0, 1000, (b,), generator=gen),
        torch.arange(b) % 10,
    )


def test_fresh_dit_predicts_zero_noise_and_backward_reaches_every_parameter():
    torch.manual_seed(0)
    model = DiT(**SMALL, posenc="rope")
    x, t, y = batch()
    assert torch.equal(model(x, t, y), torch.zeros_like(x))  # adaLN-Zero: blocks are identities, output layer zero
    wake(model)
    eps = model(x, t, y)
    assert eps.shape == x.shape and eps.abs().max() > 0
    eps.square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == ["y_embed.table.weight"] or missing == []  # rows of unused classes get no gradient
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_every_fresh_block_is_the_identity_inside_the_model():
    model = DiT(**SMALL, posenc="rope")
    x, t, y = batch()
    h, c, pos, mask = model.embed(x, t, y)
    for block in model.blocks:
        assert torch.equal(block(h, c, pos, model.posenc, mask), h)


def test_unpatchify_inverts_the_patch_order():
    model = DiT(**{**SMALL, "in_chans": 3}, posenc="none")
    x = torch.randn(2, 3, 8, 8)
    p = 2
    tokens = x.reshape(2, 3, 4, p, 4, p).permute(0, 2, 4, 1, 3, 5).reshape(2, 16, 3 * p * p)  # PatchEmbed's flattening
    assert torch.equal(model.unpatchify(tokens, 8, 8), x)


def test_timestep_embedding_formula():
    t = torch.tensor([0.0, 1.0, 37.5, 999.0])
    emb = timestep_embedding(t, 6, max_period=10000.0)
    freqs = [10000 ** (-i / 3) for i in range(3)]
    want = [[math.cos(v * f) for f in freqs] + [math.sin(v * f) for f in freqs] for v in t.tolist()]
    torch.testing.assert_close(emb, torch.tensor(want), rtol=1e-5, atol=1e-5)
    assert timestep_embedding(t, 7).shape == (4, 7) and torch.equal(timestep_embedding(t, 7)[:, -1], torch.zeros(4))


def test_label_dropout_uses_the_null_row_in_training_only():
    torch.manual_seed(0)
    emb = LabelEmbedder(10, 8, dropout=0.3)
    y = torch.arange(4000) % 10
    emb.train()
    dropped = (emb(y) == emb.table.weight[10]).all(dim=1).float().mean().item()
    assert abs(dropped - 0.3) < 0.03
    emb.eval()
    torch.testing.assert_close(emb(y), emb.table.weight[y])
    model = DiT(**SMALL, posenc="none")
    assert model.null_class == 10 and model.y_embed.table.num_embeddings == 11
    x, t, _ = batch()
    wake(model).eval()
    torch.testing.assert_close(model(x, t, None), model(x, t, torch.full((3,), 10)))  # y=None is unconditional


@pytest.mark.parametrize("posenc", TWO_D)
def test_every_2d_posenc_trains_and_runs_on_other_sizes(posenc):
    torch.manual_seed(0)
    model = wake(DiT(**SMALL, posenc=posenc))
    x, t, y = batch()
    model(x, t, y).square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad():
        bigger = model(torch.randn(2, 1, 12, 12), t[:2], y[:2])  # a 6×6 grid
    assert bigger.shape == (2, 1, 12, 12) and torch.isfinite(bigger).all()


@pytest.mark.parametrize("posenc", ONE_D_ONLY)
def test_a_1d_only_posenc_is_one_clear_error(posenc):
    with pytest.raises(LowbitError, match="takes 1-D \\(text\\) positions only; a DiT needs one that takes 2-D"):
        DiT(**SMALL, posenc=posenc)


def test_bad_options_are_clear_errors():
    with pytest.raises(LowbitError, match="ALiBi has causal=true; a DiT attends both ways: set posenc.causal=false"):
        DiT(**SMALL, posenc={"name": "alibi", "causal": True})
    with pytest.raises(LowbitError, match="model.image_size 9 is not divisible by model.patch_size 2"):
        DiT(**{**SMALL, "image_size": 9})
    with pytest.raises(LowbitError, match="model.class_dropout must be in \\[0, 1\\), got 1.0"):
        DiT(**SMALL, class_dropout=1.0)
    with pytest.raises(LowbitError, match="unknown model.norm 'batchnorm'; valid: layernorm, rmsnorm"):
        DiT(**SMALL, norm="batchnorm")
    with pytest.raises(LowbitError, match="DiT got 9x8 images; height and width must divide by patch_size 2"):
        DiT(**SMALL, posenc="none")(torch.randn(1, 1, 9, 8), torch.zeros(1), None)


def test_registry_builds_it_with_the_run_posenc():
    model = registry.build("models", {"name": "dit", **SMALL}, posenc={"name": "rope", "layout": "interleaved"})
    assert isinstance(model, DiT) and model.blocks_per_step == 2 and model.posenc.layout == "interleaved"
