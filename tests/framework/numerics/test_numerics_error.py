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


def _same_bits(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8))
    )


@pytest.mark.parametrize(
    "spec",
    [
        *(
            QuantSpec.preset(name)
            for name in ("nvfp4", "nvfp4_2d", "mxfp4", "mxfp8_e4m3", "fp8_e4m3_row", "int4_group32")
        ),
        QuantSpec.preset("nvfp4").replace(rht_size=16, rounding="sr"),  # NVFP4's wgrad gradient operand
        QuantSpec.preset("mxfp4").replace(rounding="sr", sr_prescale=0.75),  # MXFP4's gradients
    ],
    ids=lambda s: f"{s.element}-{s.block}-{s.rounding}-rht{s.rht_size}",
)
def test_compiled_health_quantization_gives_the_eager_codes_scales_and_error(spec):
    """``quant_error_and_codes(compile=True)``: the same codes, scales and
    global scale bit for bit, the same underflow, saturation and max error, the SNR to float64 rounding."""
    from lowbit.numerics import quant_error_and_codes

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(512, 256, generator=gen) * torch.logspace(-6, 6, 256, base=2.0)[None, :]
    x[:32, :32] = 0.0  # zero blocks
    x[32:64, :] *= 1e-30  # blocks that underflow
    for dtype in (torch.float32, torch.bfloat16):
        t = x.to(dtype)
        eager_err, eager_q = quant_error_and_codes(t, spec, seed=3)
        err, q = quant_error_and_codes(t, spec, seed=3, compile=True)
        for field in ("codes", "scales", "scale_codes", "global_scale", "zero_points"):
            assert _same_bits(getattr(q, field), getattr(eager_q, field)), field
        assert (err.underflow, err.saturation, err.max_abs_error) == (
            eager_err.underflow,
            eager_err.saturation,
            eager_err.max_abs_error,
        )
        assert err.underflow > 0 and err.snr_db == pytest.approx(eager_err.snr_db, rel=1e-12)


@pytest.mark.parametrize(
    "spec",
    [
        # the shipped recipes' operands (NVFP4's, MXFP4's gradients, FP8's tensor scale, INT4's zero
        # points) in the default run; other presets, each its own compiled graphs, in the slow one
        *(QuantSpec.preset(name) for name in ("nvfp4", "nvfp4_2d")),
        *(
            pytest.param(QuantSpec.preset(name), marks=pytest.mark.slow)
            for name in ("mxfp4", "mxfp8_e4m3", "fp8_e4m3_row", "int4_group32")
        ),
        QuantSpec.preset("nvfp4").replace(rht_size=16, rounding="sr"),
        QuantSpec.preset("mxfp4").replace(rounding="sr", sr_prescale=0.75),
        QuantSpec.preset("int4_group32").replace(asymmetric=True),
        QuantSpec.preset("fp8_e4m3_tensor"),
    ],
    ids=lambda s: f"{s.element}-{s.block}-{s.rounding}-rht{s.rht_size}-asym{s.asymmetric}",
)
def test_health_statistics_without_codes_equal_the_codes_path(spec):
    """``quant_error_and_scales`` (what the health callback records; compiled, no codes written) gives
    ``quant_error_and_codes``' scales and global scale bit for bit, its underflow, saturation and max
    error exactly, its SNR to float64 rounding; saturation and underflow both occur here."""
    from lowbit.numerics import quant_error_and_codes, quant_error_and_scales
    from lowbit.numerics.quantize import _fake_quantize_stats

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(512, 256, generator=gen) * torch.logspace(-6, 6, 256, base=2.0)[None, :]
    x[:32, :32] = 0.0
    x[32:64, :] *= 1e-30
    x[64:96, ::7] *= 1e4  # outliers that saturate where the scale is not the block's own amax
    for dtype in (torch.float32, torch.bfloat16):
        t = x.to(dtype)
        assert _fake_quantize_stats(t, spec, 3) is not None  # the compiled path, not the fallback
        expected, q = quant_error_and_codes(t, spec, seed=3)
        err, scales, global_scale = quant_error_and_scales(t, spec, seed=3)
        assert _same_bits(scales, q.scales) and _same_bits(global_scale, q.global_scale)
        assert (err.underflow, err.saturation, err.max_abs_error) == (
            expected.underflow,
            expected.saturation,
            expected.max_abs_error,
        )
        assert err.snr_db == pytest.approx(expected.snr_db, rel=1e-12)
