"""Range and type checks of the core config keys, before anything of a run is created.

``check_config(cfg)`` walks one table: each row names a key, what its value must be and the rule.
A key a config does not have (a recipe removed it, an optimizer without ``betas``) is skipped.
Options of one plugin (``data.val_windows``, ``model.n_heads``) are checked by its constructor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from lowbit.errors import LowbitError

__all__ = ["RULES", "check_config"]

_ABSENT = object()
_UINT32_MAX = 2**32 - 1  # numpy and Lightning seed with 32-bit integers


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _at_least(low: int) -> tuple[str, Callable[[Any], bool]]:
    return f"an integer of at least {low}", lambda v: _is_int(v) and v >= low


_POSITIVE = ("a number > 0", lambda v: _is_number(v) and v > 0)
_NON_NEGATIVE = ("a number >= 0", lambda v: _is_number(v) and v >= 0)
_UNIT = ("a number in [0, 1]", lambda v: _is_number(v) and 0 <= v <= 1)
_BETA = ("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1)

# key -> (what the value must be, rule); null passes where the key says "or null"
RULES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "seed": (f"an integer in [0, {_UINT32_MAX}]", lambda v: _is_int(v) and 0 <= v <= _UINT32_MAX),
    "trainer.max_steps": _at_least(1),
    "trainer.val_check_interval": _at_least(1),
    "trainer.log_every_n_steps": _at_least(1),
    "trainer.accumulate_grad_batches": _at_least(1),
    "trainer.gradient_clip_val": ("a number >= 0 or null", lambda v: v is None or (_is_number(v) and v >= 0)),
    "trainer.limit_val_batches": (
        "an integer >= 1, a fraction in (0, 1] or null",
        lambda v: v is None or (_is_int(v) and v >= 1) or (isinstance(v, float) and 0 < v <= 1),
    ),
    "trainer.devices": ("an integer >= 1, a list of device ids or 'auto'", lambda v: _devices(v)),
    "trainer.num_nodes": _at_least(1),
    "optimizer.lr": _POSITIVE,
    "optimizer.weight_decay": _NON_NEGATIVE,
    "optimizer.eps": _POSITIVE,
    "optimizer.momentum": _NON_NEGATIVE,
    "optimizer.betas": (
        "a list of numbers in [0, 1)",
        lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(_BETA[1](b) for b in v),
    ),
    "scheduler.warmup_steps": _at_least(0),
    "scheduler.min_lr_ratio": _UNIT,
    "scheduler.decay_fraction": ("a number in (0, 1]", lambda v: _is_number(v) and 0 < v <= 1),
    "checkpoint.every_n_steps": _at_least(1),
    "health.every_n_steps": _at_least(1),
}


def _devices(v: Any) -> bool:
    if v == "auto" or (_is_int(v) and v >= 1):
        return True
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(_is_int(d) and d >= 0 for d in v)


def _value(cfg: DictConfig, key: str) -> Any:
    """The resolved value at ``key`` as plain Python; ``_ABSENT`` when the config has no such key
    or it cannot resolve (``build`` names an unresolvable interpolation itself)."""
    try:
        node = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False)
    except Exception:
        return _ABSENT
    if isinstance(node, (DictConfig, ListConfig)):
        try:
            return OmegaConf.to_container(node, resolve=True)
        except Exception:
            return _ABSENT
    return _ABSENT if node == "???" else node


def check_config(cfg: DictConfig) -> None:
    """Raise one ``LowbitError`` line for the first core key whose value is out of range:
    ``trainer.max_steps must be an integer of at least 1, got 0``."""
    for key, (what, ok) in RULES.items():
        value = _value(cfg, key)
        if value is not _ABSENT and not ok(value):
            raise LowbitError(f"{key} must be {what}, got {value!r}")
