"""``QuantPrecision``: the Lightning precision plugin every quantized recipe is built on.

``convert_module`` swaps the model's ``nn.Linear`` layers for ``QuantLinear`` in place (DDP
discards the return value; FSDP2 runs the same converter in ``configure_model``), keeping the
named layers and the last blocks in high precision. ``forward_context`` is the BF16-or-FP32
autocast of the baseline. ``state_dict`` carries FP8 delayed-scaling state (amax histories
and scales per layer and operand); Lightning stores it in checkpoints under the plugin's class
name (``FP8Precision``), a key that does not change between releases.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from lowbit.autocast import AutocastPrecision
from lowbit.errors import LowbitError
from lowbit.quant.convert import DEFAULT_KEEP, ConversionReport, convert_linears, quant_layers
from lowbit.quant.recipe import OPERANDS, GemmRecipe

__all__ = ["AMAX_REDUCTIONS", "GemmPrecision", "QuantPrecision"]

AMAX_REDUCTIONS = ("local", "global")


class QuantPrecision(AutocastPrecision):
    """Low-precision GEMMs in every eligible Linear layer, as a ``GemmRecipe`` says.

    Args:
        recipe: the GemmRecipe (or its YAML mapping: ``{fprop: {x: ..., w: ..., rht: ...}, ...}``).
        keep: fully-qualified-name globs kept in high precision; by default ``DEFAULT_KEEP``, the output
            layer (``lm_head``, ``head``, ``head.fc``: lowbit's models and timm's).
        keep_last_blocks: the last N blocks (an int) or the last fraction of them (a float < 1).
        backend: ``auto`` (Triton kernels on CUDA where they cover the specs, else emulate; on CPU each
            operand's rounding compiled, the same bits), ``emulate`` (the eager reference), ``triton``.
        delayed_scaling: None (current scaling) or ``{history_len, amax_compute, margin}`` for
            operands with one FP32 scale per tensor (FP8 delayed scaling, as Transformer Engine).
        amax_reduction: in a run of several processes, where the tensor-level scales of activations and
            gradients (FP8 current scaling, NVFP4's FP32 scale) come from: ``local``, each rank's own
            slice of the batch (Transformer Engine's choice for current scaling: no collective), or
            ``global``, the max over every rank (one all-reduce per operand: the numbers of one process
            with the whole batch). Delayed-scaling amax histories are always reduced over every rank.
        quantized_all_gather: under FSDP2, all-gather each weight that both GEMMs read quantized the same
            way (FP8 per tensor, NVFP4 16x16) as its codes and scales instead of FP32 (``lowbit.quant.gather``):
            the same numbers, a quarter to an eighth of the bytes. No effect without FSDP2.
        device_type, mode: the autocast of ``AutocastPrecision`` (device_type None: the model's device).
    """

    name = "custom"

    def __init__(
        self,
        *,
        recipe: GemmRecipe | Mapping[str, Any],
        keep: Sequence[str] = DEFAULT_KEEP,
        keep_last_blocks: int | float = 0,
        backend: str = "auto",
        delayed_scaling: Mapping[str, Any] | None = None,
        amax_reduction: str = "local",
        quantized_all_gather: bool = True,
        device_type: str | None = None,
        mode: str = "auto",
    ) -> None:
        super().__init__(device_type=device_type, mode=mode)
        if amax_reduction not in AMAX_REDUCTIONS:
            raise LowbitError(
                f"precision.amax_reduction must be one of {', '.join(AMAX_REDUCTIONS)}, got {amax_reduction!r}"
            )
        self.amax_reduction, self.quantized_all_gather = amax_reduction, bool(quantized_all_gather)
        self.recipe = recipe if isinstance(recipe, GemmRecipe) else GemmRecipe.from_dict(recipe)
        if not self.recipe.quantized:
            raise LowbitError(
                f"precision '{self.name}' quantizes no operand; use precision=bf16 for a high-precision run"
            )
        self.keep, self.keep_last_blocks, self.backend = list(keep), keep_last_blocks, backend
        self.delayed_scaling = dict(delayed_scaling) if delayed_scaling else None
        self.report = ConversionReport()
        self._pending_state: dict[str, Any] | None = None
        self._layers: dict[str, Any] = {}

    @property
    def description(self) -> str:
        r = self.report
        total = len(r.converted) + len(r.kept) + len(r.misfit)
        if not total:
            return f"{self.name} (not applied yet), {self.compute}"
        return f"{self.name}: {len(r.converted)} of {total} Linear layers quantized, {self.compute}"

    def convert_module(self, module: nn.Module) -> nn.Module:
        report = convert_linears(
            module, self.recipe, keep=self.keep, keep_last_blocks=self.keep_last_blocks, backend=self.backend
        )
        if report.converted or not self.report.converted:  # a second call (validate after fit) finds nothing new
            self.report = report
        self._layers = quant_layers(module)
        for layer in self._layers.values():
            layer.delayed_scaling = self.delayed_scaling
            layer.amax_reduction = self.amax_reduction
            layer.quantized_all_gather = self.quantized_all_gather
        if self._pending_state is not None:
            self._apply_state(self._pending_state)
            self._pending_state = None
        return module

    # ---- scaling state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        scaling = {
            name: {op: s.state_dict() for op, s in layer.scaling_state.items()}
            for name, layer in self._layers.items()
            if layer.scaling_state
        }
        return {"recipe": self.recipe.to_dict(), "scaling": scaling}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if self._layers:
            self._apply_state(state_dict)
        else:  # restored before conversion: apply when the layers exist
            self._pending_state = dict(state_dict)

    def _apply_state(self, state: Mapping[str, Any]) -> None:
        for name, operands in state.get("scaling", {}).items():
            layer = self._layers.get(name)
            if layer is None:
                continue  # the layer is high precision in this run: nothing to restore
            for operand, tensors in operands.items():
                layer.delayed_state(operand, tensors["scale"].device).load_state_dict(tensors)


class GemmPrecision(QuantPrecision):
    """A QuantPrecision whose recipe comes from per-GEMM options (``fprop``, ``dgrad``, ``wgrad``),
    each defaulting to the subclass's ``defaults``: what the mxfp8/mxfp4/nvfp4/custom plugins share."""

    defaults: dict[str, dict[str, Any]] = {}

    @classmethod
    def config_defaults(cls) -> dict[str, Any]:
        """Each GEMM's options as a config shows them (``precision.wgrad.rht=0`` overrides one):
        the class's ``defaults``, every operand named (null = high precision) and ``rht`` a size.
        The YAML ``precision=NAME`` selects is generated from this and the constructor, so the
        recipe is defined once, here."""
        GemmRecipe.from_dict(cls.defaults)  # a bad class recipe fails here, before any config shows it
        config = {}
        for gemm, (a, b) in OPERANDS.items():
            node = dict(cls.defaults.get(gemm, {}))
            config[gemm] = {a: node.pop(a, None), b: node.pop(b, None), "rht": node.pop("rht", 0), **node}
        return config

    def __init__(
        self,
        *,
        fprop: Mapping[str, Any] | None = None,
        dgrad: Mapping[str, Any] | None = None,
        wgrad: Mapping[str, Any] | None = None,
        keep: Sequence[str] = DEFAULT_KEEP,
        keep_last_blocks: int | float = 0,
        backend: str = "auto",
        amax_reduction: str = "local",
        quantized_all_gather: bool = True,
        device_type: str | None = None,
        mode: str = "auto",
    ) -> None:
        given = {"fprop": fprop, "dgrad": dgrad, "wgrad": wgrad}
        recipe = {g: dict(self.defaults.get(g, {}) if v is None else v) for g, v in given.items()}
        super().__init__(
            recipe=recipe,
            keep=keep,
            keep_last_blocks=keep_last_blocks,
            backend=backend,
            amax_reduction=amax_reduction,
            quantized_all_gather=quantized_all_gather,
            device_type=device_type,
            mode=mode,
        )
