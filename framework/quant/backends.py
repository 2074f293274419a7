"""The backends a ``QuantLinear`` runs its GEMMs on, one small protocol each, chosen once per layer.

A backend answers three questions for one GEMM: does it run here (``active``: the device),
can it take these operand specs (``supports``), and how (``quantize`` an operand, ``matmul``
two quantized operands). ``QuantLinear`` asks its backends in order and takes the first that
runs and supports both operands of a GEMM; ``CHAINS`` maps the ``backend`` option to that
order. Adding a backend is a class here and an entry in ``CHAINS``.

  emulate   the eager reference: ``lowbit.numerics`` quantize-dequantize, GEMM in the compute dtype.
  compiled  the same, each large operand's rounding one ``torch.compile``d CPU kernel (same bits).
  triton    ``lowbit.kernels``: fused quantize kernels and block-scaled GEMMs on CUDA (the same
            numbers up to FP32 accumulation order; SR draws Philox bits, another stream).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch

from lowbit.errors import LowbitError
from lowbit.numerics import QuantSpec, fake_quantize, fake_quantize_columns, tiled_contiguous
from lowbit.quant.recipe import GEMMS, OPERANDS, GemmRecipe

if TYPE_CHECKING:
    from lowbit.quant.linear import QuantLinear

__all__ = ["CHAINS", "Backend", "CompiledEmulateBackend", "EmulateBackend", "TritonBackend", "chain"]


class Backend(Protocol):
    """What ``QuantLinear`` needs of a backend (see the module docstring)."""

    name: str
    fused: bool  # quantized operands are kernel objects, not dequantized tensors

    def active(self, t: torch.Tensor) -> bool: ...

    def supports(self, spec: QuantSpec | None) -> bool: ...

    def quantize(self, layer: QuantLinear, t: torch.Tensor, operand: str, dtype: torch.dtype) -> Any: ...

    def matmul(self, qa: Any, qb: Any, dtype: torch.dtype) -> torch.Tensor: ...

    def check(self, recipe: GemmRecipe) -> None: ...


class EmulateBackend:
    """Quantize and dequantize each operand with the numerics, then ``qa @ qb.T`` in ``dtype``."""

    name = "emulate"
    fused = False
    compile = False  # the eager reference

    def active(self, t: torch.Tensor) -> bool:
        return True

    def supports(self, spec: QuantSpec | None) -> bool:
        return True

    def check(self, recipe: GemmRecipe) -> None:
        """Nothing to check: the emulation takes every spec on every device."""

    def quantize(self, layer: QuantLinear, t: torch.Tensor, operand: str, dtype: torch.dtype) -> torch.Tensor:
        """One operand (``fprop.x``, ...) through its spec, dequantized, in the compute dtype."""
        spec = layer.recipe.spec_of(operand)
        if spec is None:
            return t.to(dtype)
        generator = layer.sr_generator
        amax = layer.global_amax(operand, t, spec)  # None: the operand's own (rank-local) amax
        transposed = t.dim() == 2 and not t.is_contiguous() and t.t().is_contiguous()  # wgrad's dyᵀ, xᵀ
        if transposed and not layer.record_health and not layer._delayed(spec) and amax is None:
            # Q(tᵀ) quantized down t's columns, same bits as from a copy; the GEMM takes the (C, N) view
            return fake_quantize_columns(
                t.t(), spec, generator=generator, compile=self.compile, rotated=True, dtype=dtype
            )
        t = tiled_contiguous(t)  # same values; wgrad's transposed operands copy faster here than in a reshape
        layer._record_health(operand, t, spec)
        if layer._delayed(spec):
            # FP8 delayed scaling: this step uses the scale from earlier steps' amaxes, then records its own
            state = layer.delayed_state(operand, t.device)
            out = fake_quantize(t, spec, generator=generator, scale=state.scale, compile=self.compile, rotated=True)
            state.observe(layer.history_amax(operand, t))
            state.update()
            return out.to(dtype)
        return fake_quantize(t, spec, generator=generator, amax=amax, compile=self.compile, rotated=True).to(dtype)

    def matmul(self, qa: torch.Tensor, qb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return qa @ qb.t()


class CompiledEmulateBackend(EmulateBackend):
    """``emulate`` with each large operand's rounding compiled on CPU (same bits, 2-10x faster)."""

    name = "compiled"
    compile = True


def _kernels_serve(t: torch.Tensor) -> bool:
    """Whether the fused kernels run on ``t``'s device: CUDA (tests patch this to run them on CPU under
    ``TRITON_INTERPRET=1``)."""
    return t.is_cuda


class TritonBackend:
    """``lowbit.kernels``: operands quantized by the fused kernels, GEMMs on codes and scales."""

    name = "triton"
    fused = True

    def __init__(self, required: bool = False) -> None:
        self.required = required  # backend 'triton': an import failure is the user's error, not a fallback
        self._ops: Any = None

    @property
    def ops(self) -> Any:
        """``lowbit.kernels.dispatch``, imported on first use on a device the kernels serve, so
        ``import lowbit`` and CPU runs never load Triton."""
        if self._ops is None:
            from lowbit.kernels import dispatch

            self._ops = dispatch
        return self._ops

    def active(self, t: torch.Tensor) -> bool:
        if not _kernels_serve(t):
            return False
        if self.required:
            return True
        try:
            self.ops  # noqa: B018 (auto without a working Triton emulates)
        except ImportError:
            return False
        return True

    def check(self, recipe: GemmRecipe) -> None:
        """Backend ``triton`` (``required``): a CUDA GPU, an importable ``lowbit.kernels``, kernels for
        every quantized operand. Under ``auto`` nothing: what the kernels lack is emulated."""
        if not self.required:
            return
        if not torch.cuda.is_available():
            raise LowbitError(
                "QuantLinear backend 'triton' needs a CUDA GPU and none is available; use backend auto or emulate"
            )
        try:
            self.ops  # noqa: B018
        except ImportError as err:
            raise LowbitError(
                f"QuantLinear backend 'triton' cannot import lowbit.kernels ({err}); use backend auto or emulate"
            ) from err
        for gemm in GEMMS:
            if not getattr(recipe, gemm).quantized:
                continue
            for name in OPERANDS[gemm]:
                reason = self.ops.supports(recipe.spec_of(f"{gemm}.{name}"))
                if reason is not None:
                    raise LowbitError(
                        f"QuantLinear backend 'triton' has no kernels for {gemm}.{name} ({reason}); use backend "
                        "auto, which emulates the GEMMs the kernels do not cover"
                    )

    def supports(self, spec: QuantSpec | None) -> bool:
        return self.ops.supports(spec) is None

    def quantize(self, layer: QuantLinear, t: torch.Tensor, operand: str, dtype: torch.dtype) -> Any:
        """One operand as a ``KernelQTensor``; health and FP8 delayed scaling as ``emulate`` does."""
        spec = layer.recipe.spec_of(operand)
        layer._record_health(operand, t, spec)
        if layer.global_amax(operand, t, spec) is not None:
            raise LowbitError(
                f"{operand}: the Triton kernels take no given amax, so amax_reduction=global cannot run on "
                "backend triton; use precision.amax_reduction=local (Transformer Engine's choice) or backend emulate"
            )
        seed = self.ops.draw_seed(layer.sr_generator, t.device) if spec.rounding == "sr" else None
        if layer._delayed(spec):
            state = layer.delayed_state(operand, t.device)
            q = self.ops.quantize(t, spec, seed=seed, scale=state.scale)
            state.observe(layer.history_amax(operand, t))
            state.update()
            return q
        return self.ops.quantize(t, spec, seed=seed)

    def matmul(self, qa: Any, qb: Any, dtype: torch.dtype) -> torch.Tensor:
        return self.ops.matmul(qa, qb, out_dtype=dtype)

    def quantize_dy(self, layer: QuantLinear, dy: torch.Tensor) -> tuple[Any, Any]:
        """dy for dgrad and dyᵀ for wgrad from one read of dy, when both GEMMs run here and the two
        specs fit one kernel call (``dispatch.pairable``); else (None, None)."""
        specs = [layer.recipe.spec_of(op) for op in ("dgrad.dy", "dgrad.w", "wgrad.dy", "wgrad.x")]
        if layer.delayed_scaling is not None or layer.amax_reduction == "global":
            return None, None
        if not all(self.supports(s) for s in specs):
            return None, None
        if not self.ops.pairable(specs[0], specs[2]):
            return None, None
        layer._record_health("dgrad.dy", dy, specs[0])
        layer._record_health("wgrad.dy", dy.t(), specs[2])
        sr = any(s.rounding == "sr" for s in (specs[0], specs[2]))
        seed = self.ops.draw_seed(layer.sr_generator, dy.device) if sr else None
        return self.ops.quantize_pair(dy, specs[0], specs[2], seed=seed)


CHAINS = {
    "auto": lambda: (TritonBackend(), CompiledEmulateBackend()),
    "emulate": lambda: (EmulateBackend(),),
    "triton": lambda: (TritonBackend(required=True), EmulateBackend()),  # emulate: GEMMs with nothing quantized
}
"""The ``backend`` option -> the backends a layer asks, in order; the last one takes any GEMM."""


def chain(backend: str, recipe: GemmRecipe) -> tuple[Backend, ...]:
    """The backends of option ``backend`` for a layer with ``recipe``, built (and checked) once."""
    if backend not in CHAINS:
        raise LowbitError(f"unknown QuantLinear backend '{backend}'; valid: {', '.join(CHAINS)}")
    backends = CHAINS[backend]()
    for b in backends:
        b.check(recipe)
    return backends
