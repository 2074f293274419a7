"""quantize_nvfp4 equals lowbit.numerics.quantize for NVFP4 specs: E2M1 codes, E4M3 (UE5M3) scale codes
and the FP32 global scale, bit for bit (RNE), rowwise and colwise, on adversarial inputs; the fused
Hadamard transform (global amax of the transformed tensor); stochastic rounding."""

import dataclasses

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.kernels.quantize_nvfp4 import quantize_nvfp4
from lowbit.numerics import QuantSpec, dequantize, quantize, unpack_fp4


def _spec(block=(1, 16), scale_format="e4m3", global_scale=True, **fields) -> QuantSpec:
    return QuantSpec(element="e2m1", block=block, scale_format=scale_format, global_scale=global_scale, **fields)


def _assert_equal(x, out, bits, **fields):
    """Every requested output equals the numerics' quantize of x (rowwise) and x.t() (colwise). A NaN
    is compared as NaN: its payload and sign follow the hardware (a GPU returns one canonical NaN)."""
    spec = _spec(**fields)
    for codes, scales, g, t in ((*out[:3], x.cpu()), (*out[3:], x.cpu().t())):
        if not codes.numel():
            continue
        ref = quantize(t, spec)
        assert torch.equal(unpack_fp4(codes.cpu()), ref.codes)
        scale_nan = (ref.scale_codes & 0x7F) == 0x7F  # E4M3 NaN, S.1111.111, either sign
        if spec.scale_format == "e4m3" and scale_nan.any():
            assert torch.equal((scales.cpu() & 0x7F) == 0x7F, scale_nan)
            assert torch.equal(scales.cpu()[~scale_nan], ref.scale_codes[~scale_nan])
        else:
            assert torch.equal(scales.cpu(), ref.scale_codes)
        expected = ref.global_scale if spec.global_scale else torch.tensor(1.0)
        assert torch.equal(bits(g), bits(expected)) or (g.isnan().item() and expected.isnan().item())


@pytest.mark.parametrize("block", [(1, 16), (16, 16), (1, 32)], ids=["1x16", "16x16", "1x32"])
@pytest.mark.parametrize(
    "scales", [("e4m3", True), ("e4m3", False), ("ue5m3", False)], ids=["nvfp4", "e4m3_local", "ue5m3"]
)
def test_rne_rowwise_and_colwise_equal_the_numerics(block, scales, adversarial, device, bits):
    x = adversarial(0, 64, 96)
    scale_format, global_scale = scales
    fields = {"block": block, "scale_format": scale_format, "global_scale": global_scale}
    _assert_equal(x, quantize_nvfp4(x.to(device), colwise=True, **fields), bits, **fields)


@pytest.mark.parametrize("kind", ["nan_inf", "bfloat16", "float16", "zeros", "negative_zeros", "inf_only"])
def test_special_tensors(kind, adversarial, device, bits):
    x = {
        "nan_inf": lambda: adversarial(1, 48, 64, specials=True),  # any NaN: the whole tensor NaN (as TE)
        "bfloat16": lambda: adversarial(2, 48, 64, specials=True).bfloat16(),
        "float16": lambda: adversarial(3, 48, 64).clamp(-6e4, 6e4).half(),
        "zeros": lambda: torch.zeros(48, 64),
        "negative_zeros": lambda: -torch.zeros(48, 64),
        "inf_only": lambda: torch.randn(48, 64).index_put_(
            (torch.tensor([3]), torch.tensor([4])), torch.tensor(float("inf"))
        ),
    }[kind]()
    for block in ((1, 16), (16, 16)):
        _assert_equal(x, quantize_nvfp4(x.to(device), block=block, colwise=True), bits, block=block)


def test_odd_rows_and_strided_input(device, bits):
    x = torch.randn(37, 80) * 100
    _assert_equal(x, quantize_nvfp4(x.to(device)), bits)  # 37 rows: 1x16 blocks need only K % 16
    y = torch.randn(48, 64).to(device)
    direct = quantize_nvfp4(y.t())
    both = quantize_nvfp4(y, colwise=True)
    assert all(torch.equal(a, b) for a, b in zip(direct[:3], both[3:]))


@pytest.mark.parametrize("size", [16, 64])
def test_fused_hadamard_transform_with_different_directions(size, device, bits):
    # dyadic inputs: the 16- and 64-point transforms are exact, so the global amax of rht(x) and every
    # code match bit for bit; rowwise without the transform, colwise with it (NVFP4's dgrad/wgrad dy)
    gen = torch.Generator().manual_seed(size)
    x = torch.randint(-1000, 1000, (64, 128), generator=gen).float() / 64
    x[5, 7] = 900.0  # an outlier the transform spreads
    out = quantize_nvfp4(x.to(device), colwise=True, rht=(0, size), rht_seed=(0, 3))
    _assert_equal(x, (*out[:3], *[torch.empty(0)] * 3), bits)
    _assert_equal(x, (*[torch.empty(0)] * 3, *out[3:]), bits, rht_size=size, rht_seed=3)


def test_stochastic_rounding_is_deterministic_neighbours_only_and_unbiased(device):
    gen = torch.Generator().manual_seed(4)
    pattern = torch.randn(1, 64, generator=gen) * 3
    x = pattern.expand(512, 64).contiguous()
    seed = torch.tensor([5], device=device)
    out = quantize_nvfp4(x.to(device), sr=(True, False), seed=seed)
    assert all(torch.equal(a, b) for a, b in zip(out, quantize_nvfp4(x.to(device), sr=(True, False), seed=seed)))
    assert not torch.equal(out[0], quantize_nvfp4(x.to(device), sr=(True, False), seed=seed + 1)[0])
    spec = _spec(rounding="sr")
    rne = quantize(x, spec.replace(rounding="rne"))
    assert torch.equal(out[1].cpu(), rne.scale_codes)
    values = dequantize(dataclasses.replace(rne, codes=unpack_fp4(out[0].cpu()), spec=spec), torch.float32).t()
    below, above = values.min(1).values, values.max(1).values
    assert all(len(v.unique()) <= 2 for v in values)
    # the target: the element, clipped where E4M3 rounded its block scale down (NVFP4 saturates by up
    # to 2^-4 at a block's amax); the decoded grid is the encoded one up to float32 rounding (2^-22)
    unit = rne.scales[0].repeat_interleave(16) * rne.global_scale
    target = torch.maximum(torch.minimum(pattern[0], 6 * unit), -6 * unit)
    slack = target.abs() * 2**-20
    assert (below <= target + slack).all() and (above >= target - slack).all()
    assert (above - below <= 2 * unit * (1 + 2**-20)).all()
    sigma = unit.double() / 512**0.5
    assert ((values.double().mean(1) - target.double()).abs() <= 5 * sigma + slack).all()  # unbiased


def test_bad_inputs_are_clear_errors(device):
    with pytest.raises(LowbitError, match=r"rowwise \(1, 16\) blocks do not divide shape \(32, 40\)"):
        quantize_nvfp4(torch.randn(32, 40, device=device))
    with pytest.raises(LowbitError, match=r"colwise \(16, 16\) blocks do not divide"):
        quantize_nvfp4(torch.randn(40, 64, device=device), block=(16, 16), rowwise=False, colwise=True)
    with pytest.raises(LowbitError, match=r"block \(1, 8\) is not one of"):
        quantize_nvfp4(torch.randn(32, 64, device=device), block=(1, 8))
    with pytest.raises(LowbitError, match="scale_format 'e8m0' is not one of e4m3, ue5m3"):
        quantize_nvfp4(torch.randn(32, 64, device=device), scale_format="e8m0")
    with pytest.raises(LowbitError, match="dtype float32, bfloat16, float16, got torch.int32"):
        quantize_nvfp4(torch.ones(32, 64, dtype=torch.int32, device=device))


def test_fake_implementation_gives_the_output_shapes(device):
    x = torch.randn(48, 64, device=device)
    seed = torch.zeros(1, dtype=torch.int64, device=device)
    args = (x, seed, 16, 16, "e4m3", True, True, True, 0, 0, 16, 2, False, True, 1.0, 1.0)
    torch.library.opcheck(torch.ops.lowbit.quantize_nvfp4.default, args)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        out = torch.ops.lowbit.quantize_nvfp4(mode.from_tensor(x), mode.from_tensor(seed), *args[2:])
    assert [tuple(t.shape) for t in out] == [(48, 32), (3, 4), (), (64, 24), (4, 3), ()]
    assert [t.dtype for t in out] == [torch.uint8, torch.uint8, torch.float32] * 2
