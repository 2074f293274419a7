"""Every precision plugin inside the fpdm_dit recipe (whose adaLN blocks are DiT's, plus the fixed-point
cell): the run builds, converting Linear layers, and a training forward/backward gives finite gradients."""

import pytest
import torch

from lowbit.config import compose
from lowbit.quant.convert import quant_layers
from lowbit.registry import registry
from lowbit.run import build

# custom quantizes nothing until told what: give it an MXFP8 forward
EXTRA = {"custom": ["precision.fprop.x={preset: mxfp8_e4m3}", "precision.fprop.w={preset: mxfp8_e4m3}"]}


@pytest.mark.parametrize("precision", registry.names("precision"))
def test_every_precision_plugin_trains_fpdm(precision):
    overrides = ["recipe=fpdm_dit", f"precision={precision}", *EXTRA.get(precision, []), "posenc=rope", "debug=smoke"]
    built = build(compose(overrides).cfg)
    converted = quant_layers(built.task)
    assert bool(converted) == (precision != "bf16")
    if converted:  # the weight-tied cell is converted once, and every solver iteration goes through it
        assert any(name.startswith("model.fixed_point_layer.f.block.") for name in converted)
    model = built.task.model.train()
    x, t, y = torch.randn(4, 1, 8, 8), torch.randint(0, 1000, (4,)), torch.arange(4)
    with built.precision.forward_context():
        eps = model(x, t, y)
    assert eps.shape == x.shape and model.deq_stats()["deq/iters"] >= 1
    (eps.float().square().mean() + 1.0).backward()  # + const: the fresh model's output is 0 (adaLN-Zero)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
