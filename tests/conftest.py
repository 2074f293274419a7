"""Test-wide settings: no W&B network, quiet warnings, and under pytest-xdist (``make test``) each
worker takes its share of the cores, in its own torch and (``OMP_NUM_THREADS``) in the processes it
starts (``train`` runs, their servers, a DDP run's ranks), so the workers do not spin against each
other: with two workers on two cores, a worker's two-thread ``train`` run beside the other worker's
test made three busy threads, and a two-process run beside it lost its lock-step."""

import os

import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("PYTHONWARNINGS", "ignore")

if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    share = max(1, (os.cpu_count() or 1) // workers)
    torch.set_num_threads(share)
    os.environ.setdefault("OMP_NUM_THREADS", str(share))
