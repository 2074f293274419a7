"""lowbit.quiet: each filter drops its one third-party message, from its one source, and nothing else."""

import logging
import warnings

import lightning as L
import pytest

from lowbit import quiet


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def collect():
    """Records of the loggers the filters touch, whatever their levels and propagation; filters restored after."""
    names = [*quiet._LITLOGGER_LOGGERS, quiet._CUDA_HOME_LOGGER]
    loggers = [logging.getLogger(n) for n in names]
    saved = [(lg.level, list(lg.filters)) for lg in loggers]
    handler = _Collect()
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    yield handler
    for lg, (level, filters) in zip(loggers, saved):
        lg.removeHandler(handler)
        lg.setLevel(level)
        lg.filters[:] = filters


def test_lightnings_leafspec_deprecation_is_dropped_and_only_from_lightning(collect):
    from lightning.pytorch.utilities._pytree import _tree_flatten

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _tree_flatten(1)  # Lightning's own call: LeafSpec()
        assert any("LeafSpec" in str(w.message) for w in caught)  # without the filter it shows
        caught.clear()
        quiet.install_filters()
        _tree_flatten(1)
        message = "`isinstance(treespec, LeafSpec)` is deprecated, use ..."
        warnings.warn_explicit(message, FutureWarning, "elsewhere.py", 1, module="mycode.trees")
        warnings.warn_explicit("another deprecation", FutureWarning, "_pytree.py", 1, module=quiet._LEAFSPEC_MODULE)
    assert [str(w.message) for w in caught] == [message, "another deprecation"]


def test_the_litlogger_tip_and_the_cuda_home_note_are_dropped_and_nothing_else(collect, tmp_path):
    quiet.install_filters()
    quiet.install_filters()  # a second call adds nothing
    assert sum(isinstance(f, quiet._DropPrefix) for f in logging.getLogger(quiet._CUDA_HOME_LOGGER).filters) == 1
    L.Trainer(logger=False, enable_progress_bar=False, default_root_dir=tmp_path)  # logs the tip, and GPU/TPU lines
    logging.getLogger(quiet._CUDA_HOME_LOGGER).warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
    logging.getLogger(quiet._CUDA_HOME_LOGGER).warning("something else")
    assert not any("litlogger" in m or "No CUDA runtime" in m for m in collect.messages)
    assert any(m.startswith("GPU available") for m in collect.messages) and "something else" in collect.messages


def test_a_sharded_checkpoint_saved_again_in_place_warns_nothing_else_does(tmp_path):
    import torch
    import torch.distributed.checkpoint as dcp

    state = {"w": torch.zeros(4)}
    dcp.save(state, checkpoint_id=tmp_path / "last.ckpt", no_dist=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dcp.save(state, checkpoint_id=tmp_path / "last.ckpt", no_dist=True)  # ModelCheckpoint's next `last`
        assert any("Detected an existing checkpoint" in str(w.message) for w in caught)  # without the filter
        caught.clear()
        quiet.install_filters()
        dcp.save(state, checkpoint_id=tmp_path / "last.ckpt", no_dist=True)
        message = "Detected an existing checkpoint in x, overwriting since self.overwrite=True."
        warnings.warn_explicit(message, UserWarning, "elsewhere.py", 1, module="mycode.saver")
    assert [str(w.message) for w in caught if "existing checkpoint" in str(w.message)] == [message]
