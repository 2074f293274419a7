"""gemm_blockscaled equals dequantize-then-matmul in FP32 up to the order of the FP32 accumulation, for
every operand pair (MXFP8, MXFP4, NVFP4 1x16 / 16x16, FP8 tensor / row, and mixes) on every MMA path
that takes it, with odd M and N, K not a multiple of the K step, bias, BF16/FP16 output, prescales."""

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.kernels.gemm_blockscaled import Operand, gemm_blockscaled, pick_mode
from lowbit.kernels.quantize_fp8 import quantize_fp8
from lowbit.kernels.quantize_mx import quantize_mx
from lowbit.kernels.quantize_nvfp4 import quantize_nvfp4
from lowbit.numerics import QuantSpec, dequantize, quantize


def _mx(t, element, prescale=1.0):
    spec = QuantSpec(element=element, block=(1, 32), scale_format="e8m0", sr_prescale=prescale)
    codes, scales, _, _ = quantize_mx(t, element, prescale=(prescale, 1.0))
    return Operand(codes, element, scales, "e8m0", (1, 32), None, prescale), spec


def _nvfp4(t, block=(1, 16)):
    codes, scales, g, *_ = quantize_nvfp4(t, block=block)
    spec = QuantSpec(element="e2m1", block=block, scale_format="e4m3", global_scale=True)
    return Operand(codes, "e2m1", scales, "e4m3", block, g), spec


def _fp8(t, element, block="tensor"):
    codes, scales, *_ = quantize_fp8(t, element, block=block)
    return Operand(codes, element, scales, "fp32", (1, 0)), QuantSpec(element=element, block=block)


PAIRS = {
    "mxfp8": (lambda t: _mx(t, "e4m3"), lambda t: _mx(t, "e4m3")),
    "mxfp8_e5m2_x_e4m3": (lambda t: _mx(t, "e5m2"), lambda t: _mx(t, "e4m3")),
    "mxfp4": (lambda t: _mx(t, "e2m1"), lambda t: _mx(t, "e2m1")),
    "mxfp4_prescaled": (lambda t: _mx(t, "e2m1", 0.75), lambda t: _mx(t, "e2m1")),
    "mxfp8_x_mxfp4": (lambda t: _mx(t, "e4m3"), lambda t: _mx(t, "e2m1")),
    "nvfp4_x_nvfp4_2d": (_nvfp4, lambda t: _nvfp4(t, (16, 16))),
    "nvfp4_1x32": (lambda t: _nvfp4(t, (1, 32)), lambda t: _nvfp4(t, (1, 32))),
    "fp8_tensor": (lambda t: _fp8(t, "e5m2"), lambda t: _fp8(t, "e4m3")),
    "fp8_row": (lambda t: _fp8(t, "e4m3", "row"), lambda t: _fp8(t, "e4m3", "row")),
    "fp8_tensor_x_mxfp4": (lambda t: _fp8(t, "e4m3"), lambda t: _mx(t, "e2m1")),
    "nvfp4_x_fp8_row": (_nvfp4, lambda t: _fp8(t, "e4m3", "row")),
}


def _modes(a: Operand, b: Operand) -> list[str]:
    modes = ["bf16"]
    if all(op.block[1] % 32 == 0 for op in (a, b)):
        modes.append("fp8")
    if all(op.scale_format == "e8m0" for op in (a, b)):
        modes.append("scaled")
    return modes


def _dequantized(t: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    return dequantize(quantize(t.cpu(), spec), torch.float32).double()


@pytest.mark.parametrize("pair", list(PAIRS))
def test_every_pair_on_every_path_equals_dequantize_then_matmul(pair, device, accumulation_rtol):
    gen = torch.Generator().manual_seed(len(pair))
    m, n, k = 37, 48, 96  # odd M; K = 96 is not a multiple of the 64-wide K step
    x = (torch.randn(m if "2d" not in pair else 48, k, generator=gen) * torch.logspace(-3, 3, k)).to(device)
    w = (torch.randn(n, k, generator=gen) * 0.1).to(device)
    make_a, make_b = PAIRS[pair]
    (a, spec_a), (b, spec_b) = make_a(x), make_b(w)
    ref_a, ref_b = _dequantized(x, spec_a), _dequantized(w, spec_b)
    expected = ref_a @ ref_b.t()
    bound = ref_a.abs() @ ref_b.abs().t()  # the accumulation error scales with the sum of |products|
    for mode in _modes(a, b):
        c = gemm_blockscaled(a, b, out_dtype=torch.float32, mode=mode).cpu().double()
        assert c.shape == expected.shape
        worst = ((c - expected).abs() / (bound + 1e-30)).max().item()
        assert worst <= accumulation_rtol(mode), f"{mode}: error {worst:.3g} of the sum of |products|"


def test_bias_and_output_dtypes(device):
    x, w = torch.randn(40, 64, device=device), torch.randn(48, 64, device=device)
    bias = torch.randn(48, device=device)
    (a, spec_a), (b, spec_b) = _nvfp4(x), _nvfp4(w, (16, 16))
    expected = _dequantized(x, spec_a) @ _dequantized(w, spec_b).t() + bias.cpu().double()
    for dtype, rel in ((torch.float32, 1e-5), (torch.bfloat16, 2**-8), (torch.float16, 2**-10)):
        c = gemm_blockscaled(a, b, bias=bias, out_dtype=dtype)
        assert c.dtype == dtype
        torch.testing.assert_close(c.cpu().double(), expected, rtol=rel, atol=rel * expected.abs().max().item())


def test_default_path_per_device(device):
    cpu = torch.device("cpu")  # what pick_mode answers for the CPU: Hopper's choice (capability 9.0)
    mx, nv = _mx(torch.randn(32, 64, device=device), "e2m1")[0], _nvfp4(torch.randn(32, 64, device=device))[0]
    assert pick_mode(mx, mx, cpu) == "fp8"  # E2M1 upcast to E4M3, one FP8 MMA per 32-block
    assert pick_mode(nv, nv, cpu) == "bf16"  # 16-element blocks: BF16 MMAs with folded scales
    assert pick_mode(mx, nv, cpu) == "bf16"


def test_bad_operands_are_clear_errors(device):
    a = _mx(torch.randn(32, 64, device=device), "e4m3")[0]
    b = _mx(torch.randn(32, 96, device=device), "e4m3")[0]
    with pytest.raises(LowbitError, match="A has K=64 and B has K=96"):
        gemm_blockscaled(a, b)
    nv = _nvfp4(torch.randn(32, 64, device=device))[0]
    with pytest.raises(LowbitError, match="mode 'scaled' .tl.dot_scaled. needs MX operands"):
        gemm_blockscaled(nv, nv, mode="scaled")
    with pytest.raises(LowbitError, match="mode 'fp8' needs K-blocks of 32"):
        gemm_blockscaled(nv, nv, mode="fp8")
    bad = Operand(a.codes, "e4m3", a.scales[:, :1], "e8m0", (1, 32))
    with pytest.raises(LowbitError, match=r"operand a scales have shape \(32, 1\), expected \(32, 2\)"):
        gemm_blockscaled(bad, a)
    with pytest.raises(LowbitError, match="out_dtype must be bfloat16, float16 or float32"):
        gemm_blockscaled(a, a, out_dtype=torch.int32)


def test_fake_implementation_gives_the_output_shape(device):
    a = _nvfp4(torch.randn(48, 64, device=device))[0]
    b = _mx(torch.randn(40, 64, device=device), "e2m1")[0]
    bias = torch.randn(40, device=device)
    args = (
        a.codes, a.scales, a.global_scale, "e2m1", "e4m3", 1, 16, 1.0,
        b.codes, b.scales, None, "e2m1", "e8m0", 1, 32, 1.0,
        bias, torch.bfloat16, "bf16",
    )  # fmt: skip
    torch.library.opcheck(torch.ops.lowbit.gemm_blockscaled.default, args)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in args]
        out = torch.ops.lowbit.gemm_blockscaled(*fake)
    assert tuple(out.shape) == (48, 40) and out.dtype == torch.bfloat16
