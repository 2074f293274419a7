"""Durable checkpoints: atomic saves that survive full disks and SIGKILL, and resumes that fall
back past a broken file but never past a different model."""

import errno
import hashlib
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lowbit.checkpoint_io import (
    CheckpointUnreadable,
    DurableCheckpointIO,
    choose_checkpoint,
    previous_path,
    verify_checkpoint,
)
from lowbit.errors import LowbitError


def _checkpoint(step: int, **shapes: tuple[int, ...]) -> dict:
    """A Lightning-shaped checkpoint whose weights are a function of ``step``."""
    shapes = shapes or {"model.lm_head.weight": (256, 64)}
    state = {key.replace("__", "."): torch.full(shape, float(step)) for key, shape in shapes.items()}
    return {"state_dict": state, "global_step": step, "epoch": 0}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _saved(directory: Path, *steps: int) -> Path:
    io = DurableCheckpointIO()
    for step in steps:
        io.save_checkpoint(_checkpoint(step), directory / "last.ckpt")
    return directory / "last.ckpt"


def _notices() -> tuple[list[str], callable]:
    lines: list[str] = []
    return lines, lines.append


# ---- saving ----------------------------------------------------------------------------------------


def test_save_keeps_the_replaced_file_as_prev(tmp_path):
    last = _saved(tmp_path, 10)
    first = _sha256(last)
    _saved(tmp_path, 20)
    assert _sha256(tmp_path / "last.prev.ckpt") == first
    assert verify_checkpoint(last)["global_step"] == 20
    assert verify_checkpoint(tmp_path / "last.prev.ckpt")["global_step"] == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.prev.ckpt"]  # no temp files left


def test_a_save_killed_between_its_renames_is_completed_by_the_next(tmp_path):
    last = _saved(tmp_path, 10)
    os.link(last, tmp_path / "last.prev.ckpt")  # prev renamed into place, the new file not yet
    _saved(tmp_path, 11)
    assert verify_checkpoint(tmp_path / "last.prev.ckpt")["global_step"] == 10
    assert verify_checkpoint(last)["global_step"] == 11
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.prev.ckpt"]


def test_the_first_save_and_unique_names_have_no_prev(tmp_path):
    DurableCheckpointIO().save_checkpoint(_checkpoint(5), tmp_path / "sub" / "step-5.ckpt")
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["step-5.ckpt"]
    assert previous_path(tmp_path / "best.ckpt") == tmp_path / "best.prev.ckpt"


def _fail_halfway(wrap_in_runtime_error: bool):
    """A torch.save that writes half a checkpoint to its file, then hits a full disk."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        real_save(obj, f)  # the whole thing, to know its size; rewrite half of it
        size = f.tell()
        f.seek(0)
        f.truncate()
        f.write(b"\0" * (size // 2))
        if wrap_in_runtime_error:  # what torch's zip writer does with a failed file.write
            try:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return save


@pytest.mark.parametrize("wrap_in_runtime_error", [False, True], ids=["oserror", "torch-runtimeerror"])
def test_a_full_disk_keeps_last_and_prev_intact(tmp_path, monkeypatch, wrap_in_runtime_error):
    last = _saved(tmp_path, 10, 20)
    before = {p.name: _sha256(p) for p in tmp_path.iterdir()}
    monkeypatch.setattr(torch, "save", _fail_halfway(wrap_in_runtime_error))
    with pytest.raises(LowbitError) as err:
        DurableCheckpointIO().save_checkpoint(_checkpoint(30), last)
    assert str(err.value) == (
        f"checkpoint not written: no space left on device writing {last}; the previous last.ckpt (step 20) is intact"
    )
    assert {p.name: _sha256(p) for p in tmp_path.iterdir()} == before  # the temp file is gone, nothing changed
    monkeypatch.undo()
    assert verify_checkpoint(last)["global_step"] == 20


def test_a_failed_first_save_says_there_was_nothing_before(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", _fail_halfway(False))
    with pytest.raises(LowbitError, match=r"no space left on device writing .*; no last.ckpt existed before$"):
        DurableCheckpointIO().save_checkpoint(_checkpoint(1), tmp_path / "last.ckpt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_directory_is_one_line(tmp_path):
    last = _saved(tmp_path, 7)
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(
            LowbitError, match=r"^checkpoint not written: permission denied writing .*\(step 7\) is intact$"
        ):
            DurableCheckpointIO().save_checkpoint(_checkpoint(8), last)
    finally:
        tmp_path.chmod(0o755)


def test_an_interrupted_save_removes_its_temp_file_and_reraises(tmp_path, monkeypatch):
    _saved(tmp_path, 1)

    def interrupted(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        DurableCheckpointIO().save_checkpoint(_checkpoint(2), tmp_path / "last.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_without_hard_links_prev_is_a_copy(tmp_path, monkeypatch):
    last = _saved(tmp_path, 3)
    first = _sha256(last)
    os.utime(last, ns=(10**18, 10**18))  # an old file, dated 2001

    def no_links(src, dst, *args, **kwargs):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(os, "link", no_links)
    _saved(tmp_path, 4)
    assert _sha256(tmp_path / "last.prev.ckpt") == first
    assert os.stat(tmp_path / "last.prev.ckpt").st_nlink == 1
    assert os.stat(tmp_path / "last.prev.ckpt").st_mtime_ns == 10**18  # dated as the old file, as a link would be


def test_temp_files_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".last.ckpt.tmp-{int(dead.stdout)}"
    alive = tmp_path / f".last.ckpt.tmp-{os.getppid()}"  # another writer still at work: left alone
    other = tmp_path / f".best.ckpt.tmp-{int(dead.stdout)}"  # another target's: its own save cleans it
    for path in (stale, alive, other):
        path.write_bytes(b"x" * 100)
    _saved(tmp_path, 1)
    assert not stale.exists() and alive.exists() and other.exists()


# ---- choosing what to resume from ------------------------------------------------------------------


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda data: data[: len(data) // 2], "truncated zip archive"),
        (lambda data: b"", "empty file, 0 bytes"),
        (lambda data: b"\x00garbage" * 64, "not a zip archive"),
    ],
    ids=["truncated", "empty", "garbage"],
)
def test_an_unreadable_last_falls_back_to_prev(tmp_path, damage, reason):
    last = _saved(tmp_path, 30, 40)
    last.write_bytes(damage(last.read_bytes()))
    with pytest.raises(CheckpointUnreadable) as err:
        verify_checkpoint(last)
    assert err.value.reason == reason
    lines, notice = _notices()
    chosen = choose_checkpoint(last, notice=notice)
    assert chosen == tmp_path / "last.prev.ckpt"
    assert lines == [f"notice: {last} is unreadable ({reason}); resuming from last.prev.ckpt (step 30)"]
    assert torch.equal(verify_checkpoint(chosen)["state_dict"]["model.lm_head.weight"], torch.full((256, 64), 30.0))


def test_a_readable_last_is_chosen_silently(tmp_path):
    last = _saved(tmp_path, 1, 2)
    lines, notice = _notices()
    assert choose_checkpoint(last, _checkpoint(0)["state_dict"], notice=notice) == last
    assert lines == []


def test_the_newest_readable_fallback_wins(tmp_path):
    io = DurableCheckpointIO()
    for step in (10, 20, 30):
        io.save_checkpoint(_checkpoint(step), tmp_path / f"step-{step}.ckpt")
    last = _saved(tmp_path, 20, 30)  # last.prev.ckpt is step 20; step-30.ckpt is newer
    last.write_bytes(b"")
    (tmp_path / "step-30.ckpt").write_bytes(b"")  # ... but broken too: step-20 and prev tie, prev first
    lines, notice = _notices()
    assert choose_checkpoint(last, notice=notice) == tmp_path / "last.prev.ckpt"
    (tmp_path / "last.prev.ckpt").unlink()
    assert choose_checkpoint(last, notice=notice) == tmp_path / "step-20.ckpt"
    assert lines[-1] == f"notice: {last} is unreadable (empty file, 0 bytes); resuming from step-20.ckpt (step 20)"


def test_a_broken_step_file_falls_back_only_to_older_steps(tmp_path):
    io = DurableCheckpointIO()
    for step in (10, 20, 30):
        io.save_checkpoint(_checkpoint(step), tmp_path / f"step-{step}.ckpt")
    (tmp_path / "step-20.ckpt").write_bytes(b"")
    assert choose_checkpoint(tmp_path / "step-20.ckpt", notice=lambda _: None) == tmp_path / "step-10.ckpt"


def test_nothing_readable_is_one_line(tmp_path):
    last = _saved(tmp_path, 1, 2)
    last.write_bytes(last.read_bytes()[:100])
    (tmp_path / "last.prev.ckpt").write_bytes(b"")
    with pytest.raises(LowbitError) as err:
        choose_checkpoint(last, notice=lambda _: pytest.fail("no notice without a fallback"))
    assert "\n" not in str(err.value)
    assert str(err.value) == (
        f"resume={last}: unreadable checkpoint (truncated zip archive); "
        "no readable fallback (last.prev.ckpt unreadable too)"
    )


def test_a_missing_target_with_no_fallback_is_one_line(tmp_path):
    with pytest.raises(LowbitError, match=r"unreadable checkpoint \(no such file\); no fallback beside it$"):
        choose_checkpoint(tmp_path / "last.ckpt")


def test_a_file_that_is_no_lightning_checkpoint_is_unreadable(tmp_path):
    torch.save({"weight": torch.zeros(2)}, tmp_path / "last.ckpt")
    with pytest.raises(CheckpointUnreadable, match="not a Lightning checkpoint: no state_dict/global_step; has weight"):
        verify_checkpoint(tmp_path / "last.ckpt")


def test_a_legacy_format_checkpoint_loads(tmp_path):
    torch.save(_checkpoint(9), tmp_path / "old.ckpt", _use_new_zipfile_serialization=False)
    assert verify_checkpoint(tmp_path / "old.ckpt")["global_step"] == 9


@pytest.mark.parametrize(
    "here, message",
    [
        (
            {"model__lm_head__weight": (256, 128)},
            "model.lm_head.weight is 256x64 there, 256x128 here (a different model size?)",
        ),
        (
            {"model__lm_head__weight": (256, 64), "model__lm_head__bias": (256,)},
            "model.lm_head.bias missing from the checkpoint (a different model or plugin?)",
        ),
        ({}, "model.lm_head.weight in the checkpoint but not in this model (a different model or plugin?)"),
    ],
    ids=["shape", "missing", "unexpected"],
)
def test_a_different_model_is_an_error_not_a_fallback(tmp_path, here, message):
    last = _saved(tmp_path, 1, 2)  # a readable prev exists: still no fallback
    expected = _checkpoint(0, **here)["state_dict"] if here else {}
    with pytest.raises(LowbitError) as err:
        choose_checkpoint(last, expected, notice=lambda _: pytest.fail("a model mismatch is no fallback case"))
    assert not isinstance(err.value, CheckpointUnreadable)
    assert str(err.value) == f"resume={last}: the checkpoint's model differs from this run's: {message}"
    with pytest.raises(LowbitError, match=f"^{last}: the checkpoint's model differs"):
        verify_checkpoint(last, expected)


# ---- fault injection: SIGKILL at random moments ----------------------------------------------------

# One process imports torch and Lightning once (5 s), then forks a writer per round: the writer
# resumes from choose_checkpoint, saves 4 MB checkpoints in a loop (step N holds arange + N) and
# reports each finished step; the server SIGKILLs it after the delay it was given.
_KILL_SERVER = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    import torch
    from lowbit.checkpoint_io import DurableCheckpointIO, choose_checkpoint
    torch.set_num_threads(1)
    last = Path(sys.argv[1]) / "last.ckpt"
    for line in sys.stdin:
        delay = float(line)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            step = 0
            if last.exists():
                step = int(torch.load(choose_checkpoint(last, notice=lambda _: None), weights_only=True)["global_step"])
            io = DurableCheckpointIO()
            while True:
                step += 1
                state = {"w": torch.arange(1 << 20, dtype=torch.float32) + step}
                io.save_checkpoint({"state_dict": state, "global_step": step}, last)
                os.write(write, f"{step}\\n".encode())
        os.close(write)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        with os.fdopen(read) as f:
            reported = [int(s) for s in f.read().split()]
        print(reported[-1] if reported else -1, flush=True)
    """
)


def test_sigkill_at_random_moments_never_loses_more_than_one_save(tmp_path):
    script = tmp_path / "kill_server.py"
    script.write_text(_KILL_SERVER)
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    server = subprocess.Popen(
        [sys.executable, str(script), str(directory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    rng = random.Random(16)
    resumed_from = 0
    try:
        for round in range(20):
            server.stdin.write(f"{rng.uniform(0.02, 0.4)}\n")
            server.stdin.flush()
            reported = int(server.stdout.readline())  # the last step the killed writer saw finished
            if not (directory / "last.ckpt").exists():
                assert reported == -1 and resumed_from == 0  # killed before its first save finished
                continue
            chosen = choose_checkpoint(directory / "last.ckpt", notice=lambda line: pytest.fail(line))
            checkpoint = torch.load(chosen, map_location="cpu", weights_only=True)  # every byte, not mmap
            step = int(checkpoint["global_step"])
            # the kill may land between a finished save and its report: at most one save ahead
            assert max(reported, resumed_from) <= step <= max(reported, resumed_from) + 1, round
            assert torch.equal(checkpoint["state_dict"]["w"], torch.arange(1 << 20, dtype=torch.float32) + step)
            resumed_from = step
    finally:
        server.stdin.close()
        server.send_signal(signal.SIGKILL)
        server.wait()
    assert resumed_from > 20  # the writers made progress between kills
    # killed writers leave temp files (a whole checkpoint each): the next save removes them
    DurableCheckpointIO().save_checkpoint(_checkpoint(resumed_from + 1), directory / "last.ckpt")
    assert sorted(p.name for p in directory.iterdir()) == ["last.ckpt", "last.prev.ckpt"]


# ---- inside Lightning -----------------------------------------------------------------------------


def test_lightning_saves_through_the_plugin_and_resumes_from_the_fallback(tmp_path):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.demos.boring_classes import BoringModel

    def trainer(max_steps: int) -> L.Trainer:
        every_2 = ModelCheckpoint(
            dirpath=tmp_path,
            filename="step-{step}",
            auto_insert_metric_name=False,
            every_n_train_steps=2,
            save_top_k=-1,
            save_last=True,
        )
        return L.Trainer(
            max_steps=max_steps,
            plugins=[DurableCheckpointIO()],
            callbacks=[every_2],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
        )

    trainer(6).fit(BoringModel())
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["last.ckpt", "last.prev.ckpt", "step-2.ckpt", "step-4.ckpt", "step-6.ckpt"]
    assert verify_checkpoint(tmp_path / "last.prev.ckpt")["global_step"] == 4

    last = tmp_path / "last.ckpt"
    last.write_bytes(last.read_bytes()[:-1000])
    (tmp_path / "step-6.ckpt").unlink()
    lines, notice = _notices()
    model = BoringModel()
    chosen = choose_checkpoint(last, model.state_dict(), notice=notice)
    assert lines == [f"notice: {last} is unreadable (truncated zip archive); resuming from last.prev.ckpt (step 4)"]
    resumed = trainer(8)
    resumed.fit(model, ckpt_path=chosen)
    assert resumed.global_step == 8
    assert verify_checkpoint(last)["global_step"] == 8
