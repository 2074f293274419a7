"""The converter: globs, last-blocks rules, shape fallback, idempotence, tied weights, timm models."""

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from lowbit.config import compose
from lowbit.errors import LowbitError
from lowbit.models.gpt import GPT
from lowbit.quant import GemmRecipe, QuantLinear, block_prefixes, convert_linears, quant_layers
from lowbit.run import build

NVFP4 = GemmRecipe.from_dict(
    {"fprop": {"x": "nvfp4", "w": "nvfp4_2d"}, "wgrad": {"dy": "nvfp4", "x": "nvfp4", "rht": 16}}
)


def _gpt(n_layers=6, dim=64):
    return GPT(dim=dim, n_layers=n_layers, n_heads=2, max_len=32, posenc="none", tie_weights=True)


def test_nothing_is_converted_without_a_quantized_precision():
    built = build(compose(["recipe=bf16_llm", "debug=smoke"]).cfg)
    assert quant_layers(built.task) == {}
    assert not any(isinstance(m, QuantLinear) for m in built.task.modules())


def test_a_quantized_recipe_converts_the_trunk_and_keeps_the_head():
    built = build(compose(["recipe=nvfp4_llm", "debug=smoke", "precision.keep_last_blocks=0"]).cfg)
    names = set(quant_layers(built.task))
    linears = {n for n, m in built.task.named_modules() if isinstance(m, nn.Linear)}
    assert names == linears - {"model.lm_head"}
    assert "model.trunk.blocks.0.attn.qkv" in names


def test_keep_globs_and_last_blocks():
    model = _gpt()
    report = convert_linears(model, NVFP4, keep=["lm_head", "trunk.blocks.0.*"], keep_last_blocks=2)
    kept_blocks = {n.split(".")[2] for n in report.kept if n.startswith("trunk.blocks.")}
    assert kept_blocks == {"0", "4", "5"}
    assert "lm_head" in report.kept
    assert {n.split(".")[2] for n in report.converted} == {"1", "2", "3"}
    assert set(quant_layers(model)) == set(report.converted)


@pytest.mark.parametrize("keep,expected", [(0.15, 1), (0.34, 2), (0.0, 0), (3, 3), (10, 6)])
def test_last_blocks_as_a_fraction_or_a_count(keep, expected):
    model = _gpt()
    report = convert_linears(model, NVFP4, keep=["lm_head"], keep_last_blocks=keep)
    kept = {int(n.split(".")[2]) for n in report.kept if n.startswith("trunk.blocks.")}
    assert kept == set(range(6 - expected, 6))


def test_bad_keep_last_blocks():
    with pytest.raises(LowbitError, match="keep_last_blocks must be a count >= 0 or a fraction"):
        convert_linears(_gpt(), NVFP4, keep_last_blocks=-1)


def test_layers_that_do_not_fit_are_kept_and_listed_in_one_warning():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 40), nn.Linear(40, 64))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = convert_linears(model, NVFP4)
    assert report.converted == ["0"] and report.misfit == ["1 (40x64)", "2 (64x40)"]
    messages = [str(w.message) for w in caught if "high precision" in str(w.message)]
    assert len(messages) == 1 and "1 (40x64)" in messages[0] and "2 (64x40)" in messages[0]


def test_converting_twice_is_harmless_and_tied_weights_stay_tied():
    model = _gpt()
    first = convert_linears(model, NVFP4)
    second = convert_linears(model, NVFP4)
    assert first.converted and not second.converted
    assert model.lm_head.weight is model.tok_emb.weight


def test_block_prefixes_find_the_block_list():
    assert block_prefixes(_gpt(n_layers=3)) == ["trunk.blocks.0", "trunk.blocks.1", "trunk.blocks.2"]
    assert block_prefixes(nn.Linear(2, 2)) == []


def test_a_stock_timm_vit_converts_and_trains():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        num_classes=10,
        depth=3,
        embed_dim=64,
        num_heads=2,
    )
    reference = copy.deepcopy(model)  # the same weights, left in high precision
    report = convert_linears(model, NVFP4, keep=["head"], keep_last_blocks=1)
    assert "head" in report.kept and any(n.startswith("blocks.2.") for n in report.kept)
    assert "blocks.0.attn.qkv" in report.converted and "blocks.1.mlp.fc2" in report.converted
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    with torch.no_grad():
        high_precision = float(nn.functional.cross_entropy(reference(x), y))
    losses = []
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    # the converted model computes the high-precision model's function up to FP4 noise: NVFP4 operands are ~20 dB
    # SNR, which moves logits of std ~0.16 (head N(0, 0.02²) on 64 normalised features) by ~0.02; seed 0: 0.014
    assert losses[0] == pytest.approx(high_precision, abs=0.05)
    # a fresh 10-way head is near uniform: ln 10 ± 0.15 (the logits' spread over a batch of 8; seed 0: 2.247)
    assert losses[0] == pytest.approx(math.log(10), abs=0.15)
    # and it learns the fixed batch: each AdamW step lowers the loss, 0.59 in all on this seed (deterministic)
    assert losses[0] > losses[1] > losses[2] and losses[0] - losses[2] > 0.3


@pytest.mark.parametrize(
    "model_name,options,head",
    [
        # a timm ViT's classifier is `head`; 10 classes would not fit NVFP4's blocks, 16 would
        (
            "vit_tiny_patch16_224",
            {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 2},
            "head",
        ),
        # a pooling head (ConvNeXt, its MLPs as Linear layers): `head.fc`
        ("convnext_atto", {"dims": (16, 32, 48, 64), "depths": (1, 1, 1, 1), "conv_mlp": False}, "head.fc"),
    ],
)
@pytest.mark.parametrize("num_classes", [10, 16])
def test_precision_plugins_keep_a_timm_classifier_by_default(model_name, options, head, num_classes):
    import timm

    from lowbit.registry import registry

    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, num_classes=num_classes, **options)
    precision = registry.build("precision", "nvfp4", device_type="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # kept by name, so never reported as a misfit
        precision.convert_module(model)
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert precision.report.kept == [head] and not precision.report.misfit
    assert set(quant_layers(model)) == linears - {head} and len(linears) > 4
    assert type(model.get_submodule(head)) is nn.Linear
