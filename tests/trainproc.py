"""``train`` as its own process, without paying its imports each time (``pythonpath = tests``).

``run_train(args, cwd=..., env=...)`` is ``subprocess.run([".venv/bin/train", *args], ...)`` with
``capture_output=True, text=True``: a process of its own with the given working directory,
environment, argv, stdin from /dev/null and its exit code (a signal: minus its number). The
process is forked from a server that has imported what ``train`` imports (torch, Lightning, timm,
W&B, Hydra and lowbit: ~10 s of CPU per process, most of a smoke run's), one server per test
worker. A run's own stderr shows what it prints, but not what an import prints: the tests of the
console script itself (warnings a fresh process prints, packaging, signals) start ``train`` as
the user's shell does.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

TRAIN = Path(sys.executable).with_name("train")
# what `train` imports before its first step (the console script, the Lightning task and its callbacks,
# the loggers, timm's optimizers and schedulers, the compiler); importing them starts no Python thread
PRELOAD = (
    "lowbit.cli",
    "lowbit.run",
    "lowbit.quant.precision",
    "lowbit.tasks.lm",
    "lowbit.tasks.optim",
    "lightning.pytorch",
    "lightning.pytorch.loggers",
    "timm.optim",
    "wandb",
    "torch._dynamo",
    "torch._inductor.compile_fx",
)


def run_train(
    args: Sequence[str], *, cwd: str | Path, env: Mapping[str, str], timeout: float = 600
) -> subprocess.CompletedProcess:
    """``train *args`` in ``cwd`` with exactly ``env``; stdout and stderr captured as text."""
    return _server().run([str(TRAIN), *args], Path(cwd), dict(env), timeout)


class _Server:
    def __init__(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}  # each run applies its own
        self.proc = subprocess.Popen(
            [sys.executable, __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
            bufsize=1,
        )

    def _reply(self, deadline: float | None) -> dict:
        if deadline is not None:
            with selectors.DefaultSelector() as sel:
                sel.register(self.proc.stdout, selectors.EVENT_READ)
                if not sel.select(deadline):
                    raise TimeoutError
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the train fork server exited ({self.proc.wait()})")
        return json.loads(line)

    def run(self, argv: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
            request = {"argv": argv, "cwd": str(cwd), "env": env, "stdout": str(out), "stderr": str(err)}
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            pid = self._reply(None)["pid"]
            timed_out = False
            try:
                try:
                    code = self._reply(timeout)["returncode"]
                except TimeoutError:
                    timed_out = True
                    _kill(pid)
                    self._reply(None)
            except BaseException:  # interrupted (a test's timeout, ^C): no run left behind, a fresh server next
                _kill(pid)
                self.proc.kill()
                raise
            if timed_out:
                raise subprocess.TimeoutExpired(argv, timeout, out.read_text(), err.read_text())
            return subprocess.CompletedProcess(argv, code, out.read_text(), err.read_text())


def _kill(pid: int) -> None:
    """Kill a run and the processes it started (DDP's ranks: its process group), if still there."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


_servers: list[_Server] = []


def _server() -> _Server:
    if not _servers or _servers[0].proc.poll() is not None:
        _servers[:] = [_Server()]
    return _servers[0]


# ---- the server process -------------------------------------------------------------------------
def _serve() -> dict:
    """Answer requests until stdin closes; returns only in a forked child, with its request."""
    import importlib
    import threading

    for name in PRELOAD:
        importlib.import_module(name)
    # native idle threads (torch's) fork as under a DataLoader's workers; a Python one would not
    assert threading.active_count() == 1, threading.enumerate()
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            return request
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)
    sys.exit(0)


def _become(request: dict) -> None:
    """Turn the forked child into ``train`` started by a shell with the request's cwd, env and argv."""
    import warnings

    os.setsid()  # its own process group: a timeout kills it with what it started
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    sys.stdin = open(os.devnull)  # noqa: SIM115 - the process's stdin for its lifetime
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    sys.argv = list(request["argv"])
    # W&B makes its media folder when imported and removes it at exit: each run its own, as each process
    from wandb.sdk.data_types import _private

    _private.MEDIA_TMP.name = tempfile.mkdtemp("wandb-media")
    if options := os.environ.get("PYTHONWARNINGS"):
        warnings._processoptions(options.split(","))  # as the interpreter does at start


if __name__ == "__main__":
    _become(_serve())
    from lowbit.cli import train_main

    sys.exit(train_main())
