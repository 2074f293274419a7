"""One ``lowbit bench speed`` configuration in a process of its own, as a ``train`` command runs:
``python -m lowbit.bench._speed_child ARGS RESULT``, ARGS the JSON of ``measure``'s keyword
arguments; rank 0 writes the ``Measurement`` to the file RESULT as JSON."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path


def main(argv: list[str]) -> int:
    from lowbit.bench.speed import measure
    from lowbit.distributed import world

    kwargs, result = json.loads(argv[0]), Path(argv[1])
    for key in ("profile", "run_dir"):
        kwargs[key] = Path(kwargs[key]) if kwargs[key] else None
    measurement = measure(**kwargs)
    if world()[0] == 0:
        result.write_text(json.dumps(asdict(measurement)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
