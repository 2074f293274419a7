"""QuantLinear's backend dispatch on a machine without CUDA: ``auto`` emulates (no lowbit kernel runs,
Triton is never imported), ``triton`` is a one-line error when the layer is built."""

import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lowbit.errors import LowbitError
from lowbit.quant import GemmRecipe, QuantLinear

NVFP4 = {
    "fprop": {"x": "nvfp4", "w": "nvfp4_2d"},
    "dgrad": {"dy": {"preset": "nvfp4", "rounding": "sr"}, "w": "nvfp4_2d"},
    "wgrad": {"dy": {"preset": "nvfp4", "rounding": "sr"}, "x": "nvfp4", "rht": 16},
}


class _LowbitOps(TorchDispatchMode):
    """Records every ``lowbit::`` custom op that runs."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "lowbit":
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _forward_backward(backend: str) -> tuple[list[torch.Tensor], list[str]]:
    torch.manual_seed(0)
    linear = nn.Linear(64, 96)
    layer = QuantLinear.from_linear(linear, GemmRecipe.from_dict(NVFP4), backend=backend)
    x = torch.randn(40, 64, requires_grad=True)
    with _LowbitOps() as ops:
        torch.manual_seed(3)
        y = layer(x)
        y.backward(torch.randn_like(y))
    return [y.detach(), x.grad, layer.weight.grad], ops.seen


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU auto runs the kernels")
def test_auto_on_cpu_is_emulate():
    auto, ran = _forward_backward("auto")
    emulate, _ = _forward_backward("emulate")
    assert ran == []  # no lowbit kernel op ran
    assert all(torch.equal(a, b) for a, b in zip(auto, emulate))


def test_cpu_tensors_never_import_triton():
    code = (
        "import sys, torch\n"
        "from lowbit.quant import GemmRecipe, QuantLinear\n"
        "layer = QuantLinear(64, 32, recipe=GemmRecipe.from_dict({'fprop': {'x': 'mxfp4', 'w': 'mxfp4'}}))\n"
        "layer(torch.randn(8, 64, requires_grad=True)).sum().backward()\n"
        "assert 'triton' not in sys.modules and 'lowbit.kernels.dispatch' not in sys.modules\n"
        "print('lean')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "lean", out.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_triton_backend_without_cuda_is_a_clear_error():
    with pytest.raises(
        LowbitError,
        match="^QuantLinear backend 'triton' needs a CUDA GPU and none is available; use backend auto or emulate$",
    ):
        QuantLinear(64, 96, recipe=GemmRecipe.from_dict(NVFP4), backend="triton")
    with pytest.raises(LowbitError, match="backend 'triton' needs a CUDA GPU"):
        QuantLinear.from_linear(nn.Linear(64, 96), GemmRecipe.from_dict(NVFP4), backend="triton")
