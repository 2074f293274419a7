"""What every bench report shares: the device in words and a markdown table."""

from __future__ import annotations

import platform
from collections.abc import Sequence

import torch

__all__ = ["device_name", "markdown_table"]


def device_name() -> str:
    """``NVIDIA H100 80GB HBM3`` on a GPU; ``N CPU cores (machine)`` otherwise."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    import os

    return f"{len(os.sched_getaffinity(0))} CPU cores ({platform.machine()}), no GPU, torch {torch.__version__.split('+')[0]}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; cells are written with ``str``."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)
