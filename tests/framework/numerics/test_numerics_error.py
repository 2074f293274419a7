"""quant_error: SNR, underflow and saturation fractions."""

import math

import pytest
import torch

from lowbit.numerics import QuantSpec, quant_error


def test_exact_values_have_infinite_snr():
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]).repeat(4).view(1, 32)
    err = quant_error(grid, "mxfp4")
    assert err.snr_db == math.inf and err.underflow == 0 and err.saturation == 0 and err.max_abs_error == 0


def test_snr_formula():
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    err = quant_error(x, "mxfp8_e4m3")
    from lowbit.numerics import fake_quantize

    noise = ((fake_quantize(x, "mxfp8_e4m3").double() - x.double()) ** 2).sum()
    assert err.snr_db == pytest.approx(10 * math.log10((x.double() ** 2).sum() / noise))
    assert 28 < err.snr_db < 35  # ~31 dB for E4M3 on Gaussians


def test_underflow_and_saturation_fractions():
    x = torch.ones(1, 32)
    x[0, 0] = 7.9  # mxfp4: X = 1, 7.9 > 6 saturates
    x[0, 1:5] = 0.1  # 0.1 < 0.25 underflows to 0
    err = quant_error(x, "mxfp4")
    assert err.saturation == 1 / 32 and err.underflow == 4 / 32
    assert quant_error(x, QuantSpec.preset("mxfp4").replace(scale_rule="rceil")).saturation == 0
