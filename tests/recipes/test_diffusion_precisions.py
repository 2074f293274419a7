"""Every precision plugin inside the fpdm_dit recipe (whose adaLN blocks are DiT's, plus the fixed-point
cell): the run builds, converting Linear layers, and a training forward/backward gives finite gradients."""

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.config import compose
from lowbit.plugins.precision.int4 import int4_layers
from lowbit.quant.convert import quant_layers
from lowbit.quant.qat import FakeQuant, qat_layers
from lowbit.registry import registry
from lowbit.run import build

# custom quantizes nothing until told what: give it an MXFP8 forward; int4's Hadamard blocks of 32 do not
# divide the patch embedding's 4 inputs (2×2 patches, 1 channel)
EXTRA = {
    "custom": ["precision.fprop.x={preset: mxfp8_e4m3}", "precision.fprop.w={preset: mxfp8_e4m3}"],
    "int4": ["precision.keep=[head,patch_embed.*]"],
}
# the gradient's cosine to BF16's: INT4 with one learned step per tensor perturbs each GEMM more than the
# FP4 block formats (relative error 0.25 vs mxfp4's 0.18), and leverage score sampling drops half of the
# weight gradient's rows (unbiased, not exact): 0.87 without sampling, 0.81 with it on this seed
MIN_COSINE = {"int4": 0.75}


def _build(precision: str):
    """The fpdm_dit smoke run with ``precision``, its model initialised alike for every precision."""
    overrides = ["recipe=fpdm_dit", f"precision={precision}", *EXTRA.get(precision, []), "posenc=rope", "debug=smoke"]
    torch.manual_seed(0)
    return build(compose(overrides).cfg)


def _gradient_with_nonzero_output(built, model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient, flattened, of an MSE step after the zero-initialised parameters (adaLN-Zero's
    output layer, the biases) are drawn from N(0, 0.02²): ε̂ ≠ 0, so real numbers flow back through the quantized
    GEMMs and the fixed-point cell. Seeded: the same draws (and SR bits) whatever ran before."""
    torch.manual_seed(1)
    model.zero_grad()
    quantizers = [m for m in model.modules() if isinstance(m, FakeQuant)]  # QAT's: their parameters stay as built
    own = {id(p) for q in quantizers for p in q.parameters()}
    with torch.no_grad():
        for p in model.parameters():
            if id(p) not in own and not p.any():
                p.normal_(0.0, 0.02)
        for quantizer in quantizers:  # ranges learned from data start from this network, not from the fresh one
            if hasattr(quantizer, "initialized"):
                quantizer.initialized.fill_(False)
    x, t = torch.randn(4, 1, 8, 8), torch.randint(0, 1000, (4,))
    with built.precision.forward_context():
        eps = model(x, t, torch.arange(4))
    (eps.float() - torch.randn_like(x)).square().mean().backward()
    return {name: p.grad.flatten() for name, p in model.named_parameters()}


@functools.cache
def _bf16_gradient() -> dict[str, torch.Tensor]:
    built = _build("bf16")
    return _gradient_with_nonzero_output(built, built.task.model.train())


@pytest.mark.parametrize("precision", registry.names("precision"))
def test_every_precision_plugin_trains_fpdm(precision):
    built = _build(precision)
    # quantized GEMMs, QAT's fake-quantized ones, or INT4's own
    converted = quant_layers(built.task) | qat_layers(built.task) | int4_layers(built.task)
    assert bool(converted) == (precision != "bf16")
    if converted:  # the weight-tied cell is converted once, and every solver iteration goes through it
        assert any(name.startswith("model.fixed_point_layer.f.block.") for name in converted)
    model = built.task.model.train()
    x, t, y = torch.randn(4, 1, 8, 8), torch.randint(0, 1000, (4,)), torch.arange(4)
    with built.precision.forward_context():
        eps = model(x, t, y)
    assert eps.shape == x.shape and model.deq_stats()["deq/iters"] >= 1
    assert not eps.any()  # adaLN-Zero: a fresh model predicts ε̂ = 0 exactly, in every precision
    (eps.float().square().mean() + 1.0).backward()  # + const: the fresh model's output is 0 (adaLN-Zero)
    # so every derivative of mean(ε̂²) = 2·mean(ε̂·∂ε̂/∂θ) is exactly 0, through the quantized backward too
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and not p.grad.any() for p in model.parameters())
    # with ε̂ ≠ 0 the gradient is finite, nonzero, and points where BF16's does: cosine 0.956 (mxfp4) to 0.996 on
    # this seed; FP4 GEMMs at ~20 dB SNR perturb each GEMM's result by ~10%, far from turning it to 0.9
    grads, want = _gradient_with_nonzero_output(built, model), _bf16_gradient()
    got = torch.cat(list(grads.values()))
    assert torch.isfinite(got).all() and got.norm() > 0
    shared = torch.cat([grads[name] for name in want])  # the network's own parameters (QAT adds its quantizers')
    assert F.cosine_similarity(shared, torch.cat(list(want.values())), dim=0) > MIN_COSINE.get(precision, 0.9)
