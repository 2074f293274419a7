"""Command line: ``train recipe=NAME [overrides]`` and ``lowbit {train,plugins,recipes,compare,plot,bench}``.

``train`` is a Hydra application: Hydra's flags (``--cfg job``, ``--info``, ``-m``, ``-cn``/``-cd``),
override grammar (``a.b=v``, ``+a.b=v``, ``~a.b``, ``group=option``), sweepers and launchers
(``hydra/launcher=joblib``, ``hydra/sweeper=optuna``) and output directories (``hydra.run.dir``,
``.hydra/``). A user error prints one line and exits 2 (``--verbose`` shows the traceback).
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from collections.abc import Callable, Sequence
from contextlib import contextmanager

from lowbit.errors import LowbitError, Preempted

__all__ = ["main", "train_main"]

VERBOSE_LOGGING = "hydra.job_logging.handlers.console_libraries.level=INFO"


def _split_flags(argv: Sequence[str], flags: set[str]) -> tuple[set[str], list[str]]:
    seen = {a for a in argv if a in flags}
    return seen, [a for a in argv if a not in flags]


def _guard(fn: Callable[[list[str]], int], argv: list[str], verbose: bool) -> int:
    """Run ``fn``; turn a LowbitError (or a config error) into one line on stderr and exit code 2."""
    try:
        return int(fn(argv) or 0)
    except LowbitError as err:
        if verbose:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Preempted as err:
        return err.exit_code  # saved and said so; 143 for SIGTERM, as a scheduler expects


def _parser():
    """Hydra's own argument parser (every Hydra flag), with one-line errors."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()
    parser.prog = "train"

    def error(message: str):
        raise LowbitError(f"{message} (train --help, train --hydra-help)")

    parser.error = error
    return parser


def _validate(args) -> list:
    """Compose every job of the command before Hydra runs any, so a bad override, unknown option or
    wrongly typed value is one line and nothing is created; a sweep over many jobs checks each."""
    from lowbit.config import compose, expand_sweeps

    if args.info or args.help or args.hydra_help or args.shell_completion:
        return []
    jobs = expand_sweeps(args.overrides) if args.multirun else [args.overrides]
    return [compose(job) for job in jobs]


_FAILED: list[Exception] = []  # a single run's error (or preemption), raised once Hydra has returned
_EXISTED: set = set()  # run directories that were there before this command (never removed)


def _task(cfg) -> float | None:
    """One Hydra job: train the composed config in Hydra's output directory; the final
    ``val/loss`` is the job's return value (a sweeper such as Optuna minimises it).

    A user error in a single run is kept for ``_train`` to print as one line (Hydra would print
    its job banner first), and the run directory Hydra made for it is removed when nothing but
    Hydra's files is in it; in a sweep the error propagates, so Hydra names the failing job."""
    import logging
    import shutil
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from lowbit.config import Composed
    from lowbit.run import train

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    composed = Composed(cfg, dict(hydra_cfg.runtime.choices), tuple(hydra_cfg.overrides.task), run_dir)
    try:
        result = train(composed, echo=logging.getLogger("lowbit").info)
    except (LowbitError, Preempted) as err:  # a preempted run has saved; its exit code tells the scheduler
        if hydra_cfg.mode != RunMode.RUN:
            raise
        only_hydra = {p.name for p in run_dir.iterdir()} <= {".hydra", f"{hydra_cfg.job.name}.log"}
        if only_hydra and run_dir.resolve() not in _EXISTED:
            shutil.rmtree(run_dir, ignore_errors=True)
        _FAILED.append(err)
        return None
    return result.metrics.get("val/loss")


def _train(argv: list[str]) -> int:
    """``train`` is a Hydra application: Hydra's parser, config loading, sweepers, launchers and
    output directories; lowbit checks every job first and turns errors into one line."""
    import os

    from hydra import version
    from hydra._internal.utils import _run_hydra

    from lowbit.config import PRIMARY, hydra_error, one_line

    parser = _parser()
    args = parser.parse_args(argv)
    composed = _validate(args)
    if _continue_in_place(args, composed):
        composed = _validate(args)
    _check_run_dirs(args, composed)
    _FAILED.clear()
    _EXISTED.clear()
    _EXISTED.update(c.run_dir.resolve() for c in composed if c.run_dir is not None and c.run_dir.exists())
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises; _guard prints one line
    version.setbase("1.3")
    try:
        with _logging_restored():
            _run_hydra(
                args=args, args_parser=parser, task_function=_task, config_path=f"pkg://{PRIMARY}", config_name="config"
            )
    except Exception as err:
        converted = hydra_error(err, args.overrides)
        if converted is err and not _raised_in_job(err):
            converted = LowbitError(one_line(err))  # Hydra's own checks (flags, launcher, sweeper): one line
        raise converted from err
    if _FAILED:
        raise _FAILED[0]
    return 0


def _continue_in_place(args, composed: list) -> bool:
    """``train ... resume=RUN`` without ``hydra.run.dir``: the run continues in its own directory
    (Hydra's files of this start go to ``.hydra/resume-<time>``, the first start's stay)."""
    import datetime as dt

    from lowbit.rundir import run_dir_of

    if args.multirun or len(composed) != 1 or not composed[0].cfg.resume:
        return False
    if any(o.startswith("hydra.run.dir=") for o in args.overrides):
        return False
    source = run_dir_of(str(composed[0].cfg.resume))
    if source is None:
        return False
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    quoted = str(source.resolve()).replace("\\", "\\\\").replace("'", "\\'")
    args.overrides += [f"hydra.run.dir='{quoted}'", f"hydra.output_subdir=.hydra/resume-{stamp}"]
    return True


def _check_run_dirs(args, composed: list) -> None:
    """Before Hydra writes ``.hydra/`` anywhere: no run into a directory that holds another run."""
    from pathlib import Path

    from lowbit.rundir import RUN_FILES, check_run_dir, launched_worker

    if launched_worker():  # a DDP worker: rank 0 checked the directory it joins
        return
    if args.multirun:
        sweep = Path(str(composed[0].hydra.sweep.dir)) if composed and composed[0].hydra is not None else None
        if (
            sweep is not None
            and sweep.is_dir()
            and any((job / f).exists() for job in sweep.iterdir() for f in RUN_FILES)
        ):
            raise LowbitError(f"hydra.sweep.dir {sweep} already holds runs; choose another hydra.sweep.dir")
        return
    if args.run or not (args.cfg or args.info or args.help or args.hydra_help or args.shell_completion):
        for c in composed:
            check_run_dir(c.run_dir, c.cfg.resume)


@contextmanager
def _logging_restored():
    """Hydra configures logging for each job (console, ``<run dir>/train.log``) and leaves it so;
    put every logger back afterwards, so ``train_main`` called in a process that goes on (a
    notebook, a test) leaves no handler writing into a run directory."""
    import logging

    manager = logging.Logger.manager
    loggers = [logging.getLogger(), *(lg for lg in manager.loggerDict.values() if isinstance(lg, logging.Logger))]
    saved = {lg: (lg.handlers[:], lg.level, lg.propagate, lg.disabled) for lg in loggers}
    try:
        yield
    finally:
        for lg in [logging.getLogger(), *manager.loggerDict.values()]:
            if not isinstance(lg, logging.Logger):
                continue
            handlers, level, propagate, disabled = saved.get(lg, ([], logging.NOTSET, True, False))
            for handler in lg.handlers:
                if handler not in handlers:
                    handler.close()
            lg.handlers[:] = handlers
            lg.setLevel(level)
            lg.propagate, lg.disabled = propagate, disabled


def _raised_in_job(err: BaseException) -> bool:
    """Whether ``err`` came from inside a job (a bug there keeps its traceback) rather than from Hydra."""
    import traceback

    return any(frame.f_code is _task.__code__ for frame, _ in traceback.walk_tb(err.__traceback__))


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


def _compare(argv: list[str]) -> int:
    from lowbit.compare import compare_main

    return compare_main(argv)


def _plot(argv: list[str]) -> int:
    from lowbit.compare import plot_main

    return plot_main(argv)


def _export(argv: list[str]) -> int:
    from lowbit.quant.export import export_main

    return export_main(argv)


def _quantize(argv: list[str]) -> int:
    from lowbit.quant.ptq import quantize_main

    return quantize_main(argv)


def _benches() -> dict[str, str]:
    """Bench name → module: each public module of ``lowbit.bench``, named with hyphens for underscores
    (``vit_extrapolation`` is ``lowbit bench vit-extrapolation``)."""
    import lowbit.bench

    return {
        m.name.replace("_", "-"): f"lowbit.bench.{m.name}"
        for m in pkgutil.iter_modules(lowbit.bench.__path__)
        if not m.name.startswith("_")
    }


def _bench(argv: list[str]) -> int:
    benches = _benches()
    if argv and argv[0] in ("-h", "--help"):
        print("usage: lowbit bench NAME [ARGS] (lowbit bench NAME --help)\n")
        for name, module in sorted(benches.items()):
            doc = (importlib.import_module(module).__doc__ or "").strip().splitlines()
            print(f"  {name:<18} {doc[0] if doc else ''}")
        return 0
    name = argv[0].replace("_", "-") if argv else None  # the module's own name works too
    if name not in benches:
        got = f" '{argv[0]}'" if argv else ""
        raise LowbitError(f"unknown bench{got}; valid: {', '.join(sorted(benches))} (lowbit bench NAME --help)")
    return int(importlib.import_module(benches[name]).main(argv[1:]) or 0)


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in (header, *rows):
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "train": (_train, "train a recipe: lowbit train recipe=NAME [overrides] (same as `train`)"),
    "plugins": (_plugins, "list every plugin: group, name, distribution, version, status"),
    "recipes": (_recipes, "list recipes with a one-line description"),
    "compare": (_compare, "finished runs side by side against a BF16 baseline: markdown table + loss/gap PNGs"),
    "plot": (_plot, "loss and gap-to-baseline curves of finished runs as PNGs"),
    "bench": (_bench, "run a benchmark: lowbit bench NAME"),
    "quantize": (
        _quantize,
        "post-training quantization of a checkpoint (RTN min-max/MSE, AdaRound) into a QAT-config run",
    ),
    "export": (
        _export,
        "a QAT or PTQ checkpoint as real low-bit weights: safetensors + manifest.json, loadable for inference",
    ),
}


def main(argv: Sequence[str] | None = None) -> int:
    """``lowbit COMMAND ...``"""
    from lowbit.quiet import install_filters

    install_filters()
    flags, args = _split_flags(list(sys.argv[1:] if argv is None else argv), {"--verbose"})
    if not args or args[0] in ("-h", "--help"):
        print("usage: lowbit COMMAND [ARGS] [--verbose]\n")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<8} {text}")
        return 0 if args else 2
    if args[0] not in COMMANDS:
        print(f"error: unknown command '{args[0]}'; valid: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if args[0] in ("plugins", "recipes") and args[1:]:
        if args[1] in ("-h", "--help"):
            print(f"usage: lowbit {args[0]}\n\n  {COMMANDS[args[0]][1]}")
            return 0
        print(f"error: lowbit {args[0]} takes no arguments, got '{args[1]}' (lowbit {args[0]} --help)", file=sys.stderr)
        return 2
    return _guard(COMMANDS[args[0]][0], args[1:], bool(flags))


def train_main(argv: Sequence[str] | None = None) -> int:
    """``train recipe=NAME [overrides]``"""
    from lowbit.quiet import install_filters

    install_filters()
    flags, args = _split_flags(list(sys.argv[1:] if argv is None else argv), {"--verbose"})
    if flags:
        args.append(VERBOSE_LOGGING)  # other libraries' info lines on the console too
    return _guard(_train, args, bool(flags))


if __name__ == "__main__":
    sys.exit(main())
