"""A stock timm ViT through the registry, converted to NVFP4 by name globs, trains with a finite loss."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
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
