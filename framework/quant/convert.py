"""Swap ``nn.Linear`` layers for ``QuantLinear`` in place, by fully-qualified-name rules.

Kept in high precision: layers matching a ``keep`` glob (``lm_head``, ``trunk.blocks.0.*``; a
glob matches the fully-qualified name or any dotted suffix of it), the last N (or the last
fraction) of the model's transformer blocks, and layers whose shapes do not divide by the
recipe's block sizes (listed in one warning). Works on any ``nn.Module`` — lowbit's models and
stock timm models alike — and converts nothing that is already a QuantLinear, so running it
twice is harmless.
"""

from __future__ import annotations

import fnmatch
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from torch import nn

from lowbit.errors import LowbitError
from lowbit.quant.linear import QuantLinear
from lowbit.quant.recipe import GemmRecipe

__all__ = [
    "DEFAULT_KEEP",
    "ConversionReport",
    "block_prefixes",
    "convert_linears",
    "quant_layers",
    "replace_linears",
]

# What the precision plugins keep in high precision unless told otherwise: the output layer, whose
# errors reach the loss unaveraged: an LM's ``lm_head``, a classifier's ``head`` (lowbit's ViTs and
# timm's) and ``head.fc`` (timm's ConvNeXt, MaxViT and others with a pooling head).
DEFAULT_KEEP = ("lm_head", "head", "head.fc")


@dataclass
class ConversionReport:
    """Which Linear layers became QuantLinear and which stayed in high precision, and why."""

    converted: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # by a keep glob or the last-blocks rule
    misfit: list[str] = field(default_factory=list)  # shapes that do not divide by the blocks


def block_prefixes(module: nn.Module) -> list[str]:
    """Names of the numbered children of the model's block list, in order (``trunk.blocks.3``).

    The block list is the largest ``nn.ModuleList``/``nn.Sequential`` whose name ends in
    ``blocks`` or ``layers`` (lowbit's trunk, timm's ViTs, most LLM code).
    """
    best: tuple[int, str] | None = None
    for name, child in module.named_modules():
        is_block_list = isinstance(child, (nn.ModuleList, nn.Sequential)) and re.search(r"(^|\.)(blocks|layers)$", name)
        if is_block_list and (best is None or len(child) > best[0]):
            best = (len(child), name)
    if best is None:
        return []
    return [f"{best[1]}.{i}" for i in range(best[0])]


def _last_blocks(prefixes: Sequence[str], keep_last_blocks: int | float) -> list[str]:
    n = len(prefixes)
    if isinstance(keep_last_blocks, bool) or keep_last_blocks < 0:
        raise LowbitError(f"keep_last_blocks must be a count >= 0 or a fraction in [0, 1), got {keep_last_blocks!r}")
    if isinstance(keep_last_blocks, float) and keep_last_blocks < 1:
        count = round(keep_last_blocks * n)
    else:
        count = int(keep_last_blocks)
    return list(prefixes[n - min(count, n) :]) if count else []


def _matches(name: str, pattern: str) -> bool:
    """A glob matches a module's fully-qualified name or any dotted suffix of it, so ``lm_head``
    finds ``model.lm_head`` when the converter runs on a LightningModule that wraps the model."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, f"*.{pattern}")


def replace_linears(
    module: nn.Module,
    make: Callable[[nn.Linear], nn.Module],
    multiples: Mapping[str, int],
    *,
    keep: Sequence[str] = (),
    keep_last_blocks: int | float = 0,
    skip: type | tuple[type, ...] = (),
) -> ConversionReport:
    """Replace every eligible ``nn.Linear`` in ``module`` by ``make(linear)``, in place: layers matching
    a ``keep`` glob or in the last ``keep_last_blocks`` blocks stay, as do layers whose in/out features
    do not divide by ``multiples["in"]`` / ``multiples["out"]`` (one warning lists them) and instances
    of ``skip`` (already converted). What QuantLinear and the QAT layers are converted by."""
    report = ConversionReport()
    kept_blocks = _last_blocks(block_prefixes(module), keep_last_blocks)
    targets = []
    for name, child in module.named_modules():
        if not isinstance(child, nn.Linear) or isinstance(child, skip):
            continue
        if any(_matches(name, pattern) for pattern in keep) or any(name.startswith(p + ".") for p in kept_blocks):
            report.kept.append(name)
        elif child.in_features % multiples.get("in", 1) or child.out_features % multiples.get("out", 1):
            report.misfit.append(f"{name} ({child.out_features}x{child.in_features})")
        else:
            targets.append(name)
    for name in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, make(getattr(parent, attr)))
        report.converted.append(name)
    if report.misfit:
        warnings.warn(
            f"kept {len(report.misfit)} Linear layer(s) in high precision: shapes not divisible by the recipe's "
            f"blocks (in x{multiples.get('in', 1)}, out x{multiples.get('out', 1)}): {', '.join(report.misfit)}",
            stacklevel=3,
        )
    return report


def convert_linears(
    module: nn.Module,
    recipe: GemmRecipe,
    *,
    keep: Sequence[str] = (),
    keep_last_blocks: int | float = 0,
    backend: str = "auto",
) -> ConversionReport:
    """Replace every eligible ``nn.Linear`` in ``module`` by a QuantLinear sharing its parameters."""
    if not recipe.quantized:
        return ConversionReport()  # a high-precision recipe converts nothing
    return replace_linears(
        module,
        lambda linear: QuantLinear.from_linear(linear, recipe, backend),
        recipe.multiples(),
        keep=keep,
        keep_last_blocks=keep_last_blocks,
        skip=QuantLinear,
    )


def quant_layers(module: nn.Module) -> dict[str, QuantLinear]:
    """The QuantLinear layers of a module, by fully-qualified name."""
    return {name: m for name, m in module.named_modules() if isinstance(m, QuantLinear)}
