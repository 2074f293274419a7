"""Quantized all-gather (lowbit.quant.gather): what the ranks send decodes to exactly the weight the
plain all-gather's quantization gives, in fewer bytes; the layers that cannot take it say why.

FSDP2 itself runs in tests/framework/test_distributed.py (two processes); here each "rank" is a row
slice of one weight, the hooks are called as FSDP2 calls them, and the all-gather is a concatenation.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lowbit.quant.gather as gather
from lowbit.numerics import fake_quantize, get_spec, tensor_amax
from lowbit.quant.convert import convert_linears
from lowbit.quant.gather import GatheredQuantWeight, ShardedQuantWeight, eligible, quantize_all_gathers
from lowbit.quant.linear import QuantLinear
from lowbit.quant.recipe import GemmRecipe

SPECS = {"fp8": "fp8_e4m3_tensor", "nvfp4": "nvfp4_2d"}
NVFP4 = {"fprop": {"x": "nvfp4", "w": "nvfp4_2d"}, "dgrad": {"dy": "nvfp4", "w": "nvfp4_2d"}}


def _adversarial(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.logspace(-6, 3, cols).roll(seed % cols)
    w[: rows // 4, :16] = 0.0  # an all-zero block
    w[rows // 2, 3] = -448.0 * 2**5  # an outlier that sets the tensor scale
    w[-1, -1] = 2.0**-140  # a subnormal
    return w


def _gather(w: torch.Tensor, spec_name: str, ranks: int, monkeypatch) -> tuple[torch.Tensor, int]:
    """(the decoded all-gathered weight, the bytes one rank sends) for ``w`` split over ``ranks``."""
    info = gather._Info(get_spec(spec_name))
    monkeypatch.setattr(gather, "_amax_over", lambda mesh, t: tensor_amax(w))  # the all-reduce of the shards' amax
    shards = [ShardedQuantWeight(part, info) for part in w.chunk(ranks)]
    sent = [s.fsdp_pre_all_gather(None, w.shape, w.stride(), None, None) for s in shards]
    outputs = tuple(torch.cat(parts) for parts in zip(*(inputs for inputs, _ in sent)))
    assert all(torch.equal(m, n) for m, n in zip(sent[0][1][2:], sent[-1][1][2:]) if m is not None)  # same scale
    gathered, inner = shards[0].fsdp_post_all_gather(outputs, sent[0][1], torch.float32)
    assert isinstance(gathered, GatheredQuantWeight) and gathered._data is inner[0]
    return gathered._data, sum(t.numel() * t.element_size() for t in sent[0][0])


@pytest.mark.parametrize("fmt", SPECS)
@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_the_gathered_codes_decode_to_the_quantized_whole_weight_bit_for_bit(fmt, ranks, monkeypatch):
    w = _adversarial(128, 96, seed=ranks)
    values, sent = _gather(w, SPECS[fmt], ranks, monkeypatch)
    want = fake_quantize(w, SPECS[fmt])
    assert torch.equal(values, want) and torch.equal(values, fake_quantize(w, SPECS[fmt], compile=True))
    numel = w.numel() // ranks
    # FP8: a byte an element (scale not sent); NVFP4: half a byte and one E4M3 scale per 16x16 block
    assert sent == (numel if fmt == "fp8" else numel // 2 + numel // 256)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4).map(lambda k: 32 * k), st.integers(1, 3).map(lambda k: 16 * k), st.integers(0, 2**16))
def test_nvfp4_gather_is_exact_on_random_shapes_and_scales(rows, cols, seed):
    with pytest.MonkeyPatch.context() as mp:
        w = _adversarial(rows, cols, seed) * 2.0 ** (seed % 40 - 20)
        assert torch.equal(_gather(w, "nvfp4_2d", 2, mp)[0], fake_quantize(w, "nvfp4_2d"))


def test_a_layer_fed_the_gathered_weight_computes_what_it_computes_from_the_master_weight():
    torch.manual_seed(0)
    layer = QuantLinear(64, 32, recipe=GemmRecipe.from_dict(NVFP4), backend="emulate")
    x = torch.randn(8, 64, requires_grad=True)
    y = layer(x)
    y.square().sum().backward()
    grads = x.grad.clone(), layer.weight.grad.clone()
    info = gather._Info(get_spec("nvfp4_2d"))
    master = layer.weight
    layer.weight = torch.nn.Parameter(GatheredQuantWeight(fake_quantize(master.detach(), "nvfp4_2d"), info))
    x.grad = None
    y2 = layer(x)
    y2.square().sum().backward()
    assert torch.equal(y2, y) and torch.equal(x.grad, grads[0])
    assert type(layer.weight.grad) is torch.Tensor and torch.equal(layer.weight.grad, grads[1])  # dW: plain, same


def test_layers_that_cannot_gather_quantized_say_why():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 48))
    convert_linears(model, GemmRecipe.from_dict(NVFP4), keep=[], backend="emulate")
    for layer in model:
        layer.quantized_all_gather = True
    assert eligible(model[0], 2) is None and eligible(model[0], 4) is None
    assert eligible(model[1], 2) == "48 rows do not split into 2 shards of whole 16-row blocks"
    mx = QuantLinear(64, 64, recipe=GemmRecipe.from_dict({"fprop": {"w": "mxfp4"}, "dgrad": {"w": "mxfp4"}}))
    assert eligible(mx, 2) == "its weight blocks (1, 32) are not square, so fprop's Q(W) and dgrad's Q(Wᵀ) differ"
    sr = QuantLinear(64, 64, recipe=GemmRecipe.from_dict({"fprop": {"w": {"preset": "nvfp4_2d", "rounding": "sr"}}}))
    assert "differently" in eligible(sr, 2) or "stochastic" in eligible(sr, 2)
    report = quantize_all_gathers(model, 2)
    assert report == {"0": None, "1": "48 rows do not split into 2 shards of whole 16-row blocks"}
    assert isinstance(model[0].weight.data, ShardedQuantWeight) and type(model[1].weight.data) is torch.Tensor
    state = model.state_dict()  # checkpoints hold plain tensors
    assert type(state["0.weight"]) is torch.Tensor and torch.equal(state["0.weight"], model[0].weight._data)


def test_a_tied_weight_is_gathered_in_full_precision():
    head = torch.nn.Linear(64, 64, bias=False)
    model = torch.nn.ModuleDict({"embed": torch.nn.Embedding(64, 64), "head": head})
    model["embed"].weight = head.weight
    convert_linears(model, GemmRecipe.from_dict(NVFP4), keep=[], backend="emulate")
    model["head"].quantized_all_gather = True
    assert quantize_all_gathers(model, 2) == {
        "head": "its weight is tied to another module's, which uses it unquantized"
    }
