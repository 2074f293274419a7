"""Kernel tests: the compiled kernels on a CUDA GPU, Triton's CPU interpreter everywhere else.

``TRITON_INTERPRET`` is read when a function is decorated with ``@triton.jit``, so it is set here,
before the test modules import ``lowbit.kernels``. In a full test run an earlier test module may
already have imported Triton (Lightning's imports do), so Triton's own jitted library functions
(``tl.max``, ``tl.randint``, ...) were made for the compiler: they are re-wrapped for the
interpreter. References are always the numerics on CPU.
"""

import os
import sys
import warnings

import pytest
import torch


def _interpret_jitted_functions() -> None:
    """Re-wrap every ``JITFunction`` already defined in Triton's language modules (and in any
    ``lowbit.kernels`` module imported early) as an ``InterpretedFunction``, as decorating them
    with ``TRITON_INTERPRET=1`` set would have."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    wrapped: dict[int, InterpretedFunction] = {}

    def interpreted(value):
        if id(value) not in wrapped:
            wrapped[id(value)] = InterpretedFunction(value.fn)
        return wrapped[id(value)]

    modules = [m for n, m in list(sys.modules.items()) if n.startswith(("triton.language", "lowbit.kernels")) and m]
    for namespace in [*modules, sys.modules["triton.language.core"].tensor]:
        for attr, value in list(vars(namespace).items()):
            if isinstance(value, JITFunction):
                setattr(namespace, attr, interpreted(value))


if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

try:
    import triton  # noqa: F401  (Triton is a Linux-only dependency)
except ImportError:
    collect_ignore_glob = ["test_*.py"]
else:
    if not torch.cuda.is_available():
        _interpret_jitted_functions()


@pytest.fixture(autouse=True)
def _quiet_interpreter():
    """The interpreter evaluates lanes a ``tl.where`` discards with numpy, which warns about their NaN
    and overflow; the kept lanes are what the tests check."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


@pytest.fixture
def device() -> str:
    """Where the kernels run: ``cuda`` on a GPU, ``cpu`` under the interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _adversarial(seed: int, rows: int = 64, cols: int = 128) -> torch.Tensor:
    """(rows, cols) float32: a huge dynamic range across rows and one special block pattern per row
    (zeros, -0, all-equal ties, powers of two, float32 subnormals, near FLT_MAX, saturation, a block
    beside blocks whose scale underflows, ties of every FP4 step, an outlier)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen) * torch.exp2(torch.randint(-60, 60, (rows, 1), generator=gen).float())
    x[0] = 0.0
    x[1] = -0.0
    x[2, :64] = 2.5
    x[3, :32] = torch.exp2(torch.arange(32).float() - 16)
    x[4, :32] = 1e-40
    x[4, 32:64] = 1e-45
    x[5, 3] = 3e38
    x[6, :16] = 448.0 * 6
    x[7, :16] = 1e30
    x[7, 16:48] = 1e-30
    x[8] = torch.arange(cols).float() * 0.25 - 16
    x[9, 1] = 1e4
    x[10, :32] = -6.0  # a block at exactly the format's max after scaling
    return x


def _with_specials(x: torch.Tensor) -> torch.Tensor:
    y = x.clone()
    y[20, 5] = float("nan")
    y[21, 7] = float("inf")
    y[22, 9] = -float("inf")
    y[23, 0] = torch.tensor(0x7F800001, dtype=torch.int32).view(torch.float32)  # a signalling NaN payload
    y[24, 100 % y.shape[1]] = torch.tensor(-0x3FFF_FEDD, dtype=torch.int32).view(torch.float32)  # negative NaN
    return y


@pytest.fixture
def adversarial():
    """A function (seed, rows=64, cols=128, specials=False) -> the adversarial float32 input."""

    def make(seed: int, rows: int = 64, cols: int = 128, specials: bool = False) -> torch.Tensor:
        x = _adversarial(seed, rows, cols)
        return _with_specials(x) if specials else x

    return make


@pytest.fixture
def accumulation_rtol():
    """A function (mode) -> the GEMM error allowed, relative to the sum of |products|: FP32 accumulation
    (1e-5) everywhere but a real GPU's FP8 MMAs, which add E4M3/E5M2 products at reduced precision
    (Hopper: errors up to ~2^-14 of the sum measured on an H200; DeepSeek-V3 sec. 3.3.2 reports ~14
    bits), so there the bound is 2^-12."""

    def rtol(mode: str) -> float:
        return 2**-12 if mode == "fp8" and torch.cuda.is_available() else 1e-5

    return rtol


@pytest.fixture
def codes_equal(bits):
    """A function (got, expected, x) that asserts equal codes and, where they differ, names the first
    few positions with the input's bits and both codes."""

    def check(got: torch.Tensor, expected: torch.Tensor, x: torch.Tensor | None = None, what: str = "codes") -> None:
        got = got.cpu()
        if torch.equal(got, expected):
            return
        if got.shape != expected.shape:
            raise AssertionError(f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}")
        where = (got != expected).nonzero().tolist()[:6]
        lines = [f"{what}: {int((got != expected).sum())} of {got.numel()} differ"]
        for idx in where:
            source = ""
            if x is not None and x.dim() == got.dim() and x.shape == got.shape:
                value = x.cpu()[tuple(idx)]
                source = f" input {value.item()!r} bits {int(bits(value.reshape(1))[0]) & 0xFFFFFFFF:#x}"
            lines.append(
                f"  at {tuple(idx)}:{source} got {got[tuple(idx)].item()} expected {expected[tuple(idx)].item()}"
            )
        raise AssertionError("\n".join(lines))

    return check


@pytest.fixture
def bits():
    """A function: a tensor's bit pattern as integers (NaN payloads and -0 compare exactly)."""

    def as_bits(t: torch.Tensor) -> torch.Tensor:
        t = t.cpu()
        if t.dtype == torch.float32:
            return t.view(torch.int32)
        if t.dtype in (torch.bfloat16, torch.float16):
            return t.view(torch.int16)
        return t

    return as_bits
