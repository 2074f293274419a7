"""ViT: shapes, patch embedding, backward, state dict, every 2-D posenc plugin, larger eval grids, errors, size."""

import pytest
import torch
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.models.vit import ViT, _PatchTokensOnly
from lowbit.nn.mlp import swiglu_hidden
from lowbit.nn.posenc import positions_2d
from lowbit.registry import registry

SMALL = dict(image_size=16, patch_size=4, in_chans=1, num_classes=10, dim=32, n_layers=2, n_heads=4)
POSENCS = registry.names("posenc")
TWO_D = [name for name in POSENCS if 2 in registry.load("posenc", name).pos_dims]
ONE_D_ONLY = [name for name in POSENCS if name not in TWO_D]


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_shapes_and_backward_reach_every_parameter(pool):
    torch.manual_seed(0)
    model = ViT(**SMALL, pool=pool, posenc="rope")
    images = torch.randn(3, 1, 16, 16)
    logits = model(images)
    assert logits.shape == (3, 10)
    logits.logsumexp(-1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert (model.cls_token is not None) == (pool == "cls")


def test_patch_embedding_is_a_strided_convolution():
    torch.manual_seed(0)
    model = ViT(**{**SMALL, "in_chans": 3}, posenc="none")
    images = torch.randn(2, 3, 16, 16)
    proj = model.patch_embed.proj
    conv = F.conv2d(images, proj.weight.view(32, 3, 4, 4), proj.bias, stride=4)  # (B, C, 4, 4)
    torch.testing.assert_close(model.patch_embed(images), conv.flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip_gives_identical_logits():
    torch.manual_seed(0)
    a = ViT(**SMALL, posenc="learned")
    torch.manual_seed(1)
    b = ViT(**SMALL, posenc="learned")
    images = torch.randn(2, 1, 16, 16)
    assert not torch.equal(a(images), b(images))
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b(images), a(images), rtol=0, atol=0)
    assert "posenc.table" in a.state_dict() and "patch_embed.proj.weight" in a.state_dict()


@pytest.mark.parametrize("posenc", TWO_D)
@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_every_2d_posenc_trains_and_evaluates_on_a_larger_grid(posenc, pool):
    torch.manual_seed(0)
    model = ViT(**SMALL, pool=pool, posenc=posenc)  # causal options get causal=False from the ViT
    images = torch.randn(2, 1, 16, 16)
    model(images).square().sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    with torch.no_grad():
        bigger = model(torch.randn(2, 1, 24, 24))  # a 6×6 grid instead of 4×4
    assert bigger.shape == (2, 10) and torch.isfinite(bigger).all()


@pytest.mark.parametrize("posenc", ONE_D_ONLY)
def test_a_1d_only_posenc_is_one_clear_error(posenc):
    with pytest.raises(LowbitError, match="takes 1-D \\(text\\) positions only; a ViT needs one that takes 2-D"):
        ViT(**SMALL, posenc=posenc)


def test_a_causal_posenc_is_one_clear_error():
    with pytest.raises(LowbitError, match="ALiBi has causal=true; a ViT attends both ways: set posenc.causal=false"):
        ViT(**SMALL, posenc={"name": "alibi", "causal": True})


def test_class_token_has_no_position():
    """Rotations skip the class token and the bias is zero in its row and column (timm's prefix tokens)."""
    torch.manual_seed(0)
    patch_pos = positions_2d(3, 3)
    alibi = registry.build("posenc", "alibi", n_heads=2, causal=False)
    bias = _PatchTokensOnly(alibi, patch_pos, 1).bias(None, None)  # (nh, 10, 10)
    assert bias.shape == (2, 10, 10)
    assert torch.equal(bias[:, 0], torch.zeros(2, 10)) and torch.equal(bias[:, :, 0], torch.zeros(2, 10))
    torch.testing.assert_close(bias[:, 1:, 1:], alibi.bias(patch_pos, patch_pos), rtol=0, atol=0)
    assert bias[0, 1, 9].item() == pytest.approx(-alibi.slopes[0].item() * 8**0.5)  # (0,0) to (2,2)

    rope = registry.build("posenc", "rope", head_dim=8, grid=(3, 3))
    q, k = torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 8)
    q_rot, k_rot = _PatchTokensOnly(rope, patch_pos, 1).rotate(q, k, None)
    assert torch.equal(q_rot[:, :, 0], q[:, :, 0]) and torch.equal(k_rot[:, :, 0], k[:, :, 0])
    q_ref, k_ref = rope.rotate(q[:, :, 1:], k[:, :, 1:], patch_pos)
    torch.testing.assert_close(q_rot[:, :, 1:], q_ref, rtol=0, atol=0)
    torch.testing.assert_close(k_rot[:, :, 1:], k_ref, rtol=0, atol=0)


def test_parameter_count_formula():
    d, L, p, C, K = 32, 2, 4, 1, 10
    h = swiglu_hidden(d)  # 96
    block = 2 * d + 3 * d * d + d * d + d * 2 * h + h * d  # two RMSNorms, qkv, proj, SwiGLU fc_in, fc_out
    expected = (C * p * p + 1) * d + L * block + d + (d * K + K)  # patch embedding, blocks, final norm, head
    assert ViT(**SMALL, pool="mean", posenc="rope").num_params() == expected == 27658
    assert ViT(**SMALL, pool="cls", posenc="rope").num_params() == expected + d  # the class token
    assert ViT(**SMALL, pool="mean", posenc="learned").num_params() == expected + 4 * 4 * d  # a 4×4×d table


def test_bad_shapes_are_clear_errors():
    with pytest.raises(LowbitError, match="model.image_size 18 is not divisible by model.patch_size 4"):
        ViT(**{**SMALL, "image_size": 18})
    with pytest.raises(LowbitError, match="model.dim 30 is not divisible by model.n_heads 4"):
        ViT(**{**SMALL, "dim": 30, "n_heads": 4})
    with pytest.raises(LowbitError, match="unknown model.pool 'max'; valid: cls, mean"):
        ViT(**SMALL, pool="max")
    with pytest.raises(LowbitError, match="ViT got 18x16 images; height and width must divide by patch_size 4"):
        ViT(**SMALL, posenc="none")(torch.randn(1, 1, 18, 16))
