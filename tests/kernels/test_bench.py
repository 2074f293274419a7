"""``lowbit bench kernels``: one line without a GPU; its tables build (kernels called as the GPU run
calls them) at a tiny size under the interpreter, timed with a CPU clock."""

import time

import pytest
import torch

from lowbit.bench import kernels as bench
from lowbit.cli import main as lowbit_main


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_without_a_gpu_it_says_so_in_one_line(capsys):
    assert lowbit_main(["bench", "kernels"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: lowbit bench kernels needs a CUDA GPU (torch.cuda.is_available() is False here); run it on a GPU machine"
    )


def _cpu_clock(fn):
    start = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - start)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run is tests/kernels/test_gpu.py")
def test_tables_build_at_a_tiny_size(monkeypatch):
    monkeypatch.setattr(bench, "_ms", _cpu_clock)
    copy_gbs, quant = bench.quantize_rows(64, device="cpu")
    assert copy_gbs > 0 and len(quant) == 13
    for name, gbs, share, *_ in quant:
        assert float(gbs) > 0 and share.endswith("%"), name  # every lowbit kernel ran
    gemm = bench.gemm_rows([64], device="cpu")
    lowbit = [row for row in gemm if row[2].startswith("lowbit Triton")]
    assert len(lowbit) == 7 and all(float(row[3]) > 0 for row in lowbit)
    assert {row[1] for row in gemm} >= {"bf16", "mxfp8", "mxfp4", "mxfp8 x mxfp4", "nvfp4 (x 1x16, w 16x16)"}
    assert bench._tokens_per_step(bench.E2E_MODEL) == 1024 * 16
