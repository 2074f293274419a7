"""Silence the third-party warnings a normal run prints that lowbit cannot fix where they start.

Each filter names one message and the module (or logger) that emits it, so the same text from
anywhere else, or any other warning from the same place, still shows. Warnings lowbit caused are
fixed at the cause instead: the precision plugins report the dtype their master weights are stored
in (``32-true``), which Lightning's model summary sizes the model by, and lowbit's checkpoint
saves pass ``weights_only=False`` to ``Trainer.save_checkpoint``.

``install_filters()`` is called once by the CLI before anything else is imported; a library user
calls it (or not) themselves. Calling it again adds nothing.
"""

from __future__ import annotations

import logging
import warnings

__all__ = ["install_filters"]

# Lightning 2.6's private copy of torch's tree_flatten (lightning/pytorch/utilities/_pytree.py)
# builds ``LeafSpec()``, which torch >= 2.10 deprecates, whenever its CombinedLoader wraps a
# dataloader: once per fit, validation and test loop. Lightning's code, not lowbit's; harmless
# until torch removes LeafSpec, and then a Lightning upgrade is the fix.
_LEAFSPEC_MESSAGE = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
_LEAFSPEC_MODULE = r"lightning\.pytorch\.utilities\._pytree"

# Lightning's ModelCheckpoint warns when its directory already has files, and when a resumed run's
# directory differs from the checkpoint's. lowbit refuses a directory holding another run before
# training (lowbit.rundir), so the first is a run resumed in place; the second a resume elsewhere.
_CHECKPOINT_DIR_MESSAGES = (r"Checkpoint directory .* exists and is not empty", r"The dirpath has changed from ")
_CHECKPOINT_MODULE = r"lightning\.pytorch\.callbacks\.model_checkpoint"

# torch's distributed checkpoint (a sharded FSDP2 save) warns that it overwrites a checkpoint folder
# that exists, and that its default will change: ModelCheckpoint saves ``last.ckpt`` again at every
# interval, which is meant to replace the previous one (lowbit.rundir guards the run directory).
_DCP_OVERWRITE_MESSAGE = r"Detected an existing checkpoint in .*, overwriting since self\.overwrite=True"
_DCP_MODULE = r"torch\.distributed\.checkpoint\.state_dict_saver"

# Lightning logs an advertisement for its LitLogger on every Trainer that has no LitLogger.
_LITLOGGER_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
_LITLOGGER_PREFIX = "💡 Tip: For seamless cloud logging"

# torch.utils.cpp_extension, imported by Inductor when lowbit's CPU backend compiles, warns when the
# machine has a CUDA toolkit (nvcc on PATH) but no CUDA device: true, and irrelevant to a CPU run.
_CUDA_HOME_LOGGER = "torch.utils.cpp_extension"
_CUDA_HOME_PREFIX = "No CUDA runtime is found"


class _DropPrefix(logging.Filter):
    """Drop the records of one logger whose message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def _add_logging_filter(logger_name: str, prefix: str) -> None:
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _DropPrefix) and f.prefix == prefix for f in logger.filters):
        logger.addFilter(_DropPrefix(prefix))


def install_filters() -> None:
    """Install the filters above: four ``warnings`` filters and two ``logging`` filters, each for one message."""
    warnings.filterwarnings("ignore", message=_LEAFSPEC_MESSAGE, category=FutureWarning, module=_LEAFSPEC_MODULE)
    for message in _CHECKPOINT_DIR_MESSAGES:
        warnings.filterwarnings("ignore", message=message, module=_CHECKPOINT_MODULE)
    warnings.filterwarnings("ignore", message=_DCP_OVERWRITE_MESSAGE, module=_DCP_MODULE)
    for name in _LITLOGGER_LOGGERS:
        _add_logging_filter(name, _LITLOGGER_PREFIX)
    _add_logging_filter(_CUDA_HOME_LOGGER, _CUDA_HOME_PREFIX)
