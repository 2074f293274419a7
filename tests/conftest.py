"""Test-wide settings: no W&B network, Lightning quiet, small thread count, shared corpus cache."""

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("PYTHONWARNINGS", "ignore")
