"""Command line: ``train recipe=NAME [overrides]`` and ``lowbit {train,plugins,recipes,bench}``.

Overrides use Hydra's grammar (``a.b=v``, ``+a.b=v``, ``~a.b``, ``group=option``); ``-m`` runs
one job per combination of comma-separated values. A user error prints one line and exits 2
(``--verbose`` shows the traceback).
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from collections.abc import Callable, Sequence

from lowbit.errors import LowbitError

__all__ = ["main", "train_main"]

USAGE_TRAIN = """usage: train [-m] [--cfg] [--verbose] [recipe=NAME] [KEY=VALUE ...]

  recipe=NAME      a recipe (lowbit recipes lists them); default: the base config
  KEY=VALUE        override a config value (trainer.max_steps=50), +KEY=VALUE adds one, ~KEY removes one
  GROUP=OPTION     pick a component (model=gpt, posenc=rope, precision=bf16, data=text, debug=smoke)
  -m, --multirun   one run per combination of comma-separated values (seed=1,2 recipe=a,b)
  --cfg            print the composed config and exit
  --verbose        show tracebacks for errors
"""


def _split_flags(argv: Sequence[str], flags: set[str]) -> tuple[set[str], list[str]]:
    seen = {a for a in argv if a in flags}
    return seen, [a for a in argv if a not in flags]


def _guard(fn: Callable[[list[str]], int], argv: list[str], verbose: bool) -> int:
    """Run ``fn``; turn a LowbitError (or a config error) into one line on stderr and exit code 2."""
    try:
        return fn(argv)
    except LowbitError as err:
        if verbose:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _train(argv: list[str]) -> int:
    from lowbit.config import compose, expand_sweeps, to_yaml

    flags, overrides = _split_flags(argv, {"-m", "--multirun", "--cfg", "-h", "--help"})
    if flags & {"-h", "--help"}:
        print(USAGE_TRAIN)
        return 0
    bad = [a for a in overrides if a.startswith("-")]
    if bad:
        raise LowbitError(f"unknown flag '{bad[0]}'; valid: -m/--multirun, --cfg, --verbose, -h/--help")
    jobs = expand_sweeps(overrides) if flags & {"-m", "--multirun"} else [overrides]
    composed = [compose(job) for job in jobs]  # every job's config is checked before any trains
    if "--cfg" in flags:
        for c in composed:
            print(to_yaml(c.cfg))
        return 0
    from lowbit.run import train

    for i, (job, c) in enumerate(zip(jobs, composed)):
        if len(jobs) > 1:
            print(f"[job {i + 1}/{len(jobs)}] {' '.join(job)}")
        train(c)
    return 0


def _plugins(argv: list[str]) -> int:
    from lowbit.registry import registry

    rows = [(i.group, i.name, i.dist, i.version, i.status) for i in registry.status()]
    _print_table(("group", "name", "distribution", "version", "status"), rows)
    return 0


def _recipes(argv: list[str]) -> int:
    from lowbit.config import list_recipes, recipe_packages

    _print_table(("recipe", "description"), [(name, text) for name, text, _ in list_recipes()])
    for note in recipe_packages()[1]:
        print(f"note: {note}", file=sys.stderr)
    return 0


def _benches() -> dict[str, str]:
    import lowbit.bench

    return {
        m.name: f"lowbit.bench.{m.name}"
        for m in pkgutil.iter_modules(lowbit.bench.__path__)
        if not m.name.startswith("_")
    }


def _bench(argv: list[str]) -> int:
    benches = _benches()
    if not argv or argv[0] not in benches:
        got = f" '{argv[0]}'" if argv else ""
        raise LowbitError(f"unknown bench{got}; valid: {', '.join(sorted(benches))} (lowbit bench NAME --help)")
    return int(importlib.import_module(benches[argv[0]]).main(argv[1:]) or 0)


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in (header, *rows):
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "train": (_train, "train a recipe: lowbit train recipe=NAME [overrides] (same as `train`)"),
    "plugins": (_plugins, "list every plugin: group, name, distribution, version, status"),
    "recipes": (_recipes, "list recipes with a one-line description"),
    "bench": (_bench, "run a benchmark: lowbit bench NAME"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """``lowbit COMMAND ...``"""
    flags, args = _split_flags(list(sys.argv[1:] if argv is None else argv), {"--verbose"})
    if not args or args[0] in ("-h", "--help"):
        print("usage: lowbit COMMAND [ARGS] [--verbose]\n")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<8} {text}")
        return 0 if args else 2
    if args[0] not in COMMANDS:
        print(f"error: unknown command '{args[0]}'; valid: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return _guard(COMMANDS[args[0]][0], args[1:], bool(flags))


def train_main(argv: Sequence[str] | None = None) -> int:
    """``train recipe=NAME [overrides]``"""
    flags, args = _split_flags(list(sys.argv[1:] if argv is None else argv), {"--verbose"})
    return _guard(_train, args, bool(flags))


if __name__ == "__main__":
    sys.exit(main())
