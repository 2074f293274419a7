"""Random Hadamard transform: orthonormality, exact inverse, determinism, the butterfly."""

import math

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.numerics import (
    QuantSpec,
    fake_quantize,
    fwht,
    hadamard_matrix,
    inverse_rht,
    quant_error,
    random_hadamard,
    random_signs,
    rht,
)


@pytest.mark.parametrize("n", [2, 16, 32, 64, 128, 256])
def test_hadamard_is_orthonormal_and_symmetric(n):
    h = hadamard_matrix(n, dtype=torch.float64)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.equal(h, h.T) and torch.all(h.abs() == 1 / math.sqrt(n))
    r = random_hadamard(n, seed=3, dtype=torch.float64)
    assert torch.allclose(r @ r.T, torch.eye(n, dtype=torch.float64), atol=1e-12)


def test_random_signs_are_deterministic_from_the_seed():
    assert torch.equal(random_signs(64, 5), random_signs(64, 5))
    assert not torch.equal(random_signs(64, 5), random_signs(64, 6))
    assert set(random_signs(64, 5).tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("size", [16, 64, 256])
def test_rht_inverse_is_exact_to_fp32_rounding(size):
    x = torch.randn(8, 3, 512, generator=torch.Generator().manual_seed(0))
    y = rht(x, size, seed=1)
    assert y.shape == x.shape
    assert torch.allclose(inverse_rht(y, size, seed=1), x, atol=1e-5, rtol=0)
    assert torch.allclose(y.norm(), x.norm(), rtol=1e-5)  # orthonormal: preserves the norm
    assert torch.equal(rht(x, size, seed=1), y)  # deterministic
    assert not torch.allclose(inverse_rht(y, size, seed=2), x, atol=1e-3)


def test_butterfly_matches_the_matrix():
    x = torch.randn(10, 128, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(fwht(x), x @ hadamard_matrix(128, dtype=torch.float64), atol=1e-12)
    signs = random_signs(128, 4).double()
    assert torch.allclose(fwht(x * signs), rht(x.float(), 128, seed=4).double(), atol=1e-5)


def test_rht_helps_mxfp4_on_heavy_tails_and_is_neutral_on_gaussians():
    gen = torch.Generator().manual_seed(0)
    gauss = torch.randn(256, 256, generator=gen)
    spiky = gauss + 30.0 * (torch.rand(256, 256, generator=gen) < 0.01)  # sparse outliers
    with_rht = QuantSpec.preset("mxfp4").replace(rht_size=16)
    assert quant_error(spiky, with_rht).snr_db > quant_error(spiky, "mxfp4").snr_db + 3.0
    assert abs(quant_error(gauss, with_rht).snr_db - quant_error(gauss, "mxfp4").snr_db) < 0.5
    y = fake_quantize(spiky, with_rht)  # dequantize undoes the transform
    assert y.shape == spiky.shape and (y - spiky).abs().mean() < (fake_quantize(spiky, "mxfp4") - spiky).abs().mean()


def test_rht_errors():
    with pytest.raises(LowbitError, match="Hadamard size must be a power of two"):
        hadamard_matrix(24)
    with pytest.raises(LowbitError, match=r"RHT size 16 must divide the last dim of shape \(4, 24\)"):
        rht(torch.randn(4, 24), 16)
