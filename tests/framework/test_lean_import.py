"""Importing lowbit pulls in neither Triton nor wandb nor Lightning, and starts no CUDA context."""

import subprocess
import sys


def test_import_lowbit_is_lean():
    code = (
        "import sys, lowbit, lowbit.registry, lowbit.errors\n"
        "heavy = [m for m in ('triton', 'wandb', 'lightning', 'hydra') if m in sys.modules]\n"
        "import torch\n"
        "assert not heavy, heavy\n"
        "assert not torch.cuda.is_initialized()\n"
        "print('lean')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "lean", out.stderr
