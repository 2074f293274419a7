"""A stock timm ViT through the registry, converted to NVFP4 by name globs, trains with a finite loss."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
from lowbit.models.timm import TimmModel
from lowbit.nn.posenc import positions_2d
from lowbit.quant import QuantLinear, convert_linears, quant_layers
from lowbit.registry import registry

TINY = {
    "name": "timm",
    "model_name": "vit_tiny_patch16_224",
    "img_size": 16,
    "patch_size": 4,
    "in_chans": 1,
    "num_classes": 10,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
}


def test_timm_vit_builds_through_the_registry():
    torch.manual_seed(0)
    model = registry.build("models", TINY)
    assert model.net.patch_embed.grid_size == (4, 4) and model.net.head.out_features == 10
    assert model(torch.randn(3, 1, 16, 16)).shape == (3, 10)
    # timm's vit_tiny layout at width 32: patch conv, cls token, 4×4+1 positions, blocks with 4× MLPs, norms, head
    d, L, h = 32, 2, 128
    block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * h + h) + (h * d + d)
    assert model.num_params() == (16 * d + d) + d + 17 * d + L * block + 2 * d + (d * 10 + 10)


def test_timm_vit_converts_to_nvfp4_and_trains_two_steps():
    torch.manual_seed(0)
    model = registry.build("models", TINY)
    nvfp4 = registry.build("precision", "nvfp4", device_type="cpu").recipe
    report = convert_linears(model, nvfp4, keep=["head", "patch_embed.*"])
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert set(report.converted) == set(quant_layers(model)) == linears - {"net.head"}
    assert report.kept == ["net.head"] and not report.misfit
    assert isinstance(model.net.blocks[1].mlp.fc2, QuantLinear)
    images, labels = torch.randn(8, 1, 16, 16), torch.arange(8) % 10
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    start = model.net.blocks[0].attn.qkv.weight.detach().clone()
    for _ in range(2):
        loss = F.cross_entropy(model(images), labels)
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert not torch.equal(model.net.blocks[0].attn.qkv.weight, start)  # master weights moved


def test_timm_errors_are_one_line():
    with pytest.raises(LowbitError, match="unknown timm model 'vit_nope'"):
        registry.build("models", {"name": "timm", "model_name": "vit_nope"})
    with pytest.raises(LowbitError, match="pretrained=true: lowbit trains timm models from scratch"):
        registry.build("models", {**TINY, "kwargs": {"pretrained": True}})


def test_attn_bias_reaches_timm_attention_for_every_grid_with_the_prefix_tokens_unbiased():
    """model.attn_bias=lookhere: the same logits as handing timm the padded bias by hand, at the training grid
    and a larger one, under bf16 autocast too; a learned bias (kerple) trains with the model."""
    torch.manual_seed(0)
    options = dict(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=4)
    kwargs = {"pos_embed": "none", "dynamic_img_size": True}
    model = TimmModel(**options, kwargs=kwargs, attn_bias="lookhere")
    lh, n = model.attn_bias, model.net.num_prefix_tokens
    assert n == 1 and lh.n_heads == 4
    for side in (16, 24):
        images = torch.randn(2, 1, side, side)
        patches = positions_2d(side // 4, side // 4)
        by_hand = model.net(images, attn_mask=F.pad(lh.bias(patches, patches), (n, 0, n, 0)))
        torch.testing.assert_close(model(images), by_hand, rtol=0, atol=0)
        assert not torch.allclose(model(images), model.net(images))  # the bias changes the output
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model(torch.randn(2, 1, 24, 24)).float()).all()
    kerple = TimmModel(**options, kwargs=kwargs, attn_bias="kerple")
    kerple(torch.randn(2, 1, 16, 16)).square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in kerple.attn_bias.parameters())
    assert any(k.startswith("attn_bias.") for k in kerple.state_dict())


def test_attn_bias_errors_are_one_line():
    with pytest.raises(LowbitError, match="model.attn_bias needs a timm ViT .*'resnet18' is not one"):
        TimmModel(model_name="resnet18", in_chans=1, num_classes=10, attn_bias="alibi")
    with pytest.raises(LowbitError, match="model.attn_bias RoPE adds no attention bias; use one that does"):
        TimmModel(img_size=16, patch_size=4, num_classes=10, depth=1, attn_bias="rope")
    with pytest.raises(LowbitError, match="lookhere needs at least 4 heads"):
        TimmModel(img_size=16, patch_size=4, num_classes=10, depth=1, num_heads=2, embed_dim=32, attn_bias="lookhere")
