"""Durable checkpoints: a save lands whole or not at all, and a resume never starts from a broken file.

``DurableCheckpointIO`` writes each checkpoint to a temporary file in the target's directory,
fsyncs it, keeps the file it replaces as ``<stem>.prev.ckpt`` and renames the new one into place
(``os.replace`` is atomic on POSIX), so a crash, SIGKILL or full disk at any moment leaves the
previous checkpoint readable. ``choose_checkpoint`` picks what ``resume=`` loads: the file asked
for if it reads, else the newest readable fallback (``<stem>.prev.ckpt``, ``step-N.ckpt``) with a
notice; a checkpoint of a different model is an error, never a fallback.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lowbit.errors import LowbitError
from lowbit.rundir import is_sharded, pid_alive

__all__ = [
    "CheckpointUnreadable",
    "DurableCheckpointIO",
    "checkpoint_step",
    "choose_checkpoint",
    "is_sharded",
    "load_checkpoint",
    "previous_path",
    "read_sharded",
    "verify_checkpoint",
    "write_sharded",
    "write_unsharded",
]

SHARDED_META = "meta.pt"
"""The file beside the shards of a ``ModelParallelStrategy`` (FSDP2) checkpoint folder holding
everything but the model and optimizer state: step, loops, callbacks, schedulers, precision state."""

_STEP_FILE = re.compile(r"step-(\d+)\.ckpt")
_TEMP_FILE = re.compile(r"\.(?P<name>.+)\.(?:tmp|prev-tmp)-(?P<pid>\d+)")
# errors that mean "this filesystem cannot hard-link here": copy instead
_NO_LINKS = {errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}


class CheckpointUnreadable(LowbitError):
    """The file is no usable checkpoint (missing, empty, truncated, corrupt, not Lightning's): a
    caller may fall back to an older one. ``reason`` is the short why (``truncated zip archive``)."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path}: unreadable checkpoint ({reason})")


def previous_path(path: str | Path) -> Path:
    """Where ``DurableCheckpointIO`` keeps the file a save replaced: ``last.ckpt`` -> ``last.prev.ckpt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


# ---- saving ----------------------------------------------------------------------------------------


class DurableCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with crash-safe saves: temp file + fsync + atomic rename.

    Args:
        keep_previous: when the target exists, keep it as ``<stem>.prev.ckpt`` (a hard link, or a
            copy where the filesystem has none) before the new file replaces it: the fallback
            ``choose_checkpoint`` uses if the newest file is unreadable all the same (bit rot, a
            file copied by hand). Costs one more checkpoint of disk per rolling name (``last``, ``best``).

    A failed write (ENOSPC, EDQUOT, EACCES, EROFS, ...) removes the temp file and raises a
    one-line ``LowbitError``; the checkpoint it would have replaced is untouched.
    """

    def __init__(self, keep_previous: bool = True) -> None:
        self.keep_previous = keep_previous

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically; the previous file survives any failure."""
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options, got {storage_options!r}")
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise _write_error("directory not created", path, err) from err
        _remove_stale_temps(path)
        temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(temp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            if self.keep_previous and path.is_file():
                _keep_previous(path)
            elif is_sharded(path):  # an FSDP2 run's folder, continued by fewer processes: kept as .prev
                _set_aside(path)
            os.replace(temp, path)  # the step that makes the new checkpoint the checkpoint
        except BaseException as err:
            with contextlib.suppress(OSError):
                temp.unlink()
            cause = _os_error(err)
            if cause is None:
                raise  # not the filesystem (an unpicklable object, Ctrl-C): nothing to translate
            raise _write_error("checkpoint not written", path, cause) from err
        _fsync_directory(path.parent)


def _keep_previous(path: Path) -> None:
    """``path`` -> ``<stem>.prev.ckpt`` without a moment where neither exists whole: link (or copy)
    to a temp name, then rename that onto the ``.prev`` name."""
    previous = previous_path(path)
    with contextlib.suppress(OSError):
        if os.path.samefile(path, previous):
            return  # a save killed between its two renames left both names on one file: already kept
    temp = previous.with_name(f".{path.name}.prev-tmp-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        temp.unlink()
    try:
        os.link(path, temp)
    except OSError as err:
        if err.errno not in _NO_LINKS:
            raise
        try:
            with open(path, "rb") as src, open(temp, "wb") as dst:
                shutil.copyfileobj(src, dst, 16 << 20)
                dst.flush()
                os.fsync(dst.fileno())
            stat = os.stat(path)  # the old file's time, as a link keeps it: "newest by mtime" stays last.ckpt
            os.utime(temp, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        except BaseException:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise
    os.replace(temp, previous)


def _set_aside(path: Path) -> None:
    """A sharded checkpoint folder at ``path`` renamed to ``<stem>.prev.ckpt`` (what was there removed)."""
    previous = previous_path(path)
    if previous.is_dir():
        shutil.rmtree(previous)
    elif previous.exists():
        previous.unlink()
    os.replace(path, previous)


def _remove_stale_temps(path: Path) -> None:
    """Temp files of ``path`` left by a killed process (its pid gone): each is a whole checkpoint of disk."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(path.parent):
            match = _TEMP_FILE.fullmatch(entry.name)
            if match is None or match["name"] != path.name or int(match["pid"]) == os.getpid():
                continue
            if not pid_alive(int(match["pid"])):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable; filesystems without directory fsync (and Windows) are skipped."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES):
            raise _write_error("checkpoint written but not synced to disk", directory, err) from err
    finally:
        os.close(fd)


def _os_error(err: BaseException) -> OSError | None:
    """The OSError behind ``err``: torch's zip writer reports a failed ``write`` as a RuntimeError."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno is not None:
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _errno_text(err: OSError) -> str:
    text = os.strerror(err.errno) if err.errno else str(err)
    return text[:1].lower() + text[1:]


def _write_error(what: str, path: Path, err: OSError) -> LowbitError:
    """One line: what failed, where, why, and what is still there."""
    if not path.is_file():
        kept = f"no {path.name} existed before"
    else:
        step = _step_of(path)
        kept = f"the previous {path.name}{f' (step {step})' if step is not None else ''} is intact"
    return LowbitError(f"{what}: {_errno_text(err)} writing {path}; {kept}")


def _step_of(path: Path) -> int | None:
    try:
        return int(_load(path)["global_step"])
    except Exception:
        return None


# ---- reading ---------------------------------------------------------------------------------------


def verify_checkpoint(path: str | Path, expected_state: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Load ``path`` (on CPU, memory-mapped: tensor bytes are not read) and return it, checked.

    Raises ``CheckpointUnreadable`` for a missing, empty, truncated or corrupt file, or one that is
    no Lightning checkpoint (no ``state_dict`` / ``global_step``), and ``LowbitError`` when
    ``expected_state`` (the built model's ``state_dict()``) differs in a key or a shape.
    """
    return _verify(Path(path), expected_state, label=str(path))


def read_sharded(path: str | Path) -> dict[str, Any]:
    """A sharded checkpoint as the one-file Lightning checkpoint of the same state, on CPU: the
    shards gathered into full tensors (``state_dict``), each optimizer's state re-keyed from
    parameter names to the indices ``torch.optim`` uses (``optimizer_states``), ``meta.pt``'s
    step, loops, callbacks and precision state as they are. Resumes and ``lowbit export`` read
    it in one process whatever the number of processes that wrote it."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = Path(path)
    if not (path / SHARDED_META).is_file():
        raise CheckpointUnreadable(path, f"a sharded checkpoint without its {SHARDED_META} (a save cut short)")
    meta = _load(path / SHARDED_META)
    with tempfile.TemporaryDirectory(prefix="lowbit-unshard-") as tmp:
        try:
            dcp_to_torch_save(path, Path(tmp) / "full.pt")
        except Exception as err:
            raise CheckpointUnreadable(path, f"its shards do not read ({type(err).__name__})") from err
        shards = _load(Path(tmp) / "full.pt")
    optimizers = sorted((k for k in shards if k.startswith("optimizer_")), key=lambda k: int(k.split("_")[1]))
    return {
        **meta,
        "state_dict": shards["state_dict"],
        "optimizer_states": [_indexed_optimizer_state(shards[k]) for k in optimizers],
    }


def _indexed_optimizer_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """An optimizer state keyed by parameter names (``get_optimizer_state_dict``) as ``torch.optim``'s
    ``state_dict()``: parameters numbered 0, 1, ... in the order of the param groups' lists."""
    index: dict[str, int] = {}
    groups = []
    for group in state["param_groups"]:
        params = [index.setdefault(name, len(index)) for name in group["params"]]
        groups.append({**group, "params": params})
    return {"state": {index[name]: value for name, value in state["state"].items()}, "param_groups": groups}


def write_unsharded(path: str | Path, out: str | Path) -> Path:
    """``read_sharded(path)`` saved as one checkpoint file ``out`` (what a one-process or DDP run resumes)."""
    torch.save(read_sharded(path), out)
    return Path(out)


def write_sharded(path: str | Path, task: Any, out: str | Path) -> Path:
    """A one-file checkpoint as the sharded folder an FSDP2 run loads (``out``), written by this one
    process: the full tensors, each resharded on load to the run's world size; the optimizer state
    re-keyed from indices to parameter names through an optimizer ``task`` configures (the same
    parameter order the saving run had); the rest as ``meta.pt``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    checkpoint = dict(_load(Path(path)))
    converted: dict[str, Any] = {"state_dict": checkpoint.pop("state_dict")}
    states = checkpoint.pop("optimizer_states", [])
    if states:  # one optimizer to carry each state's indices to names (load_state_dict replaces it whole)
        configured = task.configure_optimizers()
        optimizer = configured["optimizer"] if isinstance(configured, dict) else configured
    for i, state in enumerate(states):
        optimizer.load_state_dict(state)
        options = StateDictOptions(full_state_dict=True)
        converted[f"optimizer_{i}"] = get_optimizer_state_dict(task, optimizer, options=options)
    out = Path(out)
    dcp.save(converted, checkpoint_id=out, no_dist=True)
    torch.save(checkpoint, out / SHARDED_META)
    return out


def checkpoint_step(path: str | Path) -> int:
    """The ``global_step`` a checkpoint (one file or sharded) was saved at, without reading its tensors."""
    path = Path(path)
    meta = _load(path / SHARDED_META) if is_sharded(path) else _load(path)
    return int(meta["global_step"])


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Any checkpoint ``train`` writes, one file or sharded, as one dict (CPU, memory-mapped files)."""
    path = Path(path)
    if is_sharded(path):
        return read_sharded(path)
    return torch.load(path, map_location="cpu", mmap=True, weights_only=False)


def _verify(path: Path, expected_state: Mapping[str, torch.Tensor] | None, label: str) -> dict[str, Any]:
    checkpoint = read_sharded(path) if is_sharded(path) else _load(path)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "global_step" not in checkpoint:
        keys = (
            ", ".join(sorted(map(str, checkpoint))[:6]) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        )
        raise CheckpointUnreadable(path, f"not a Lightning checkpoint: no state_dict/global_step; has {keys}")
    if expected_state is not None:
        difference = _first_difference(checkpoint["state_dict"], expected_state)
        if difference:
            raise LowbitError(f"{label}: the checkpoint's model differs from this run's: {difference}")
    return checkpoint


def _load(path: Path) -> Any:
    """``torch.load`` as Lightning resumes (CPU, ``weights_only=True``, torch's default), memory-mapped."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CheckpointUnreadable(path, "no such file") from None
    except OSError as err:
        raise CheckpointUnreadable(path, _errno_text(err)) from err
    if size == 0:
        raise CheckpointUnreadable(path, "empty file, 0 bytes")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap can only be used" not in str(err):
                raise
            # not a zip archive: a legacy-format checkpoint (loads without mmap) or garbage (fails)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        if "Unsupported global" in str(err):  # readable, but holds objects torch will not unpickle safely
            first = str(err).split("Unsupported global")[1].split(".")[0].strip(": ")
            raise LowbitError(
                f"{path}: torch loads checkpoints with weights_only=True and this one holds other objects ({first})"
            ) from err
        raise CheckpointUnreadable(path, _read_reason(path, err)) from err


def _read_reason(path: Path, err: Exception) -> str:
    """Why ``torch.load`` failed, in a few words: judged from the file, torch's messages vary."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as io_err:
        return _errno_text(io_err)
    if head != b"PK\x03\x04":  # torch.save writes a zip archive
        return "not a zip archive"
    if not zipfile.is_zipfile(path):  # no end-of-central-directory record: cut short
        return "truncated zip archive"
    text = str(err).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(err).__name__}: {first[:160]}" if first else type(err).__name__


def _shape(tensor: Any) -> str:
    shape = getattr(tensor, "shape", None)
    if shape is None:
        return type(tensor).__name__
    return "x".join(map(str, shape)) if len(shape) else "a scalar"


def _first_difference(saved: Mapping[str, Any], expected: Mapping[str, Any]) -> str | None:
    """The first key or shape where ``saved`` and ``expected`` disagree, as a phrase; None if none."""
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    for key, value in expected.items():
        if key in saved and getattr(saved[key], "shape", None) != getattr(value, "shape", None):
            hint = " (a different model size?)" if len(_shape(value)) > 1 else ""
            return f"{key} is {_shape(saved[key])} there, {_shape(value)} here{hint}"
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        return f"{missing[0]}{more} missing from the checkpoint (a different model or plugin?)"
    if unexpected:
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        return f"{unexpected[0]}{more} in the checkpoint but not in this model (a different model or plugin?)"
    return None


def _fallbacks(path: Path) -> list[Path]:
    """Older checkpoints ``path`` may be replaced by, newest first by their name's promise:
    ``<stem>.prev.ckpt`` first, then ``step-N.ckpt`` (for a ``step-N`` target only smaller N)."""
    target = _STEP_FILE.fullmatch(path.name)
    below = int(target[1]) if target else None
    steps = []
    with contextlib.suppress(OSError):
        for entry in path.parent.iterdir():
            match = _STEP_FILE.fullmatch(entry.name)
            if match and entry != path and (below is None or int(match[1]) < below):
                steps.append((int(match[1]), entry))
    return [previous_path(path)] + [p for _, p in sorted(steps, reverse=True)]


def choose_checkpoint(
    path: str | Path, expected_state: Mapping[str, torch.Tensor] | None = None, notice: Callable[[str], Any] = print
) -> Path:
    """The checkpoint ``resume=`` should load: ``path`` if it reads, else the readable fallback with
    the highest step (``<stem>.prev.ckpt``, ``step-N.ckpt`` files beside it), announced by ``notice``.

    A checkpoint of a different model (``expected_state`` keys or shapes) raises ``LowbitError``;
    so does finding nothing usable, naming the file and what is wrong with it.
    """
    path = Path(path)
    try:
        _verify(path, expected_state, label=f"resume={path}")
        return path
    except CheckpointUnreadable as err:
        broken = err
    best: tuple[int, Path] | None = None
    for candidate in _fallbacks(path):
        step_in_name = _STEP_FILE.fullmatch(candidate.name)
        if best is not None and step_in_name and int(step_in_name[1]) <= best[0]:
            break  # sorted: no later step file can beat what we have
        if not candidate.is_file():
            continue
        try:
            checkpoint = _verify(candidate, expected_state, label=f"resume={candidate}")
        except CheckpointUnreadable:
            continue
        step = int(checkpoint["global_step"])
        if best is None or step > best[0]:
            best = (step, candidate)
    if best is None:
        tried = [p.name for p in _fallbacks(path) if p.is_file()]
        named = ", ".join(tried[:3]) + (f" and {len(tried) - 3} more" if len(tried) > 3 else "")
        others = f"; no readable fallback ({named} unreadable too)" if tried else "; no fallback beside it"
        raise LowbitError(f"resume={path}: unreadable checkpoint ({broken.reason}){others}")
    step, chosen = best
    notice(f"notice: {path} is unreadable ({broken.reason}); resuming from {chosen.name} (step {step})")
    return chosen
