"""The amax kernel equals lowbit.numerics.tensor_amax (of the Hadamard-transformed rows with ``rht``)."""

import pytest
import torch

from lowbit.kernels.amax import amax
from lowbit.numerics import rht, tensor_amax


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_amax_equals_tensor_amax(dtype, adversarial, device, bits):
    x = adversarial(0, 48, 96).clamp(-6e4, 6e4).to(dtype)
    assert torch.equal(bits(amax(x.to(device))), bits(tensor_amax(x).float()))
    odd = (torch.randn(37, 53) * 3).to(dtype)
    assert torch.equal(bits(amax(odd.to(device))), bits(tensor_amax(odd).float()))


def test_zeros_give_plus_zero_and_nan_propagates(device, bits):
    assert bits(amax(-torch.zeros(32, 64, device=device))).item() == 0  # +0, as tensor_amax
    x = torch.randn(32, 64)
    x[7, 9] = float("nan")
    assert amax(x.to(device)).isnan()
    x[7, 9] = -float("inf")
    assert amax(x.to(device)).item() == float("inf")


def test_amax_of_the_transformed_rows(device, bits):
    x = torch.randint(-1000, 1000, (64, 128)).float() / 16  # dyadic: the 16-point transform is exact
    assert torch.equal(bits(amax(x.to(device), rht=16, rht_seed=4)), bits(tensor_amax(rht(x, 16, 4))))


def test_custom_op_passes_opcheck(device):
    torch.library.opcheck(torch.ops.lowbit.amax.default, (torch.randn(48, 64, device=device), 16, 2))
