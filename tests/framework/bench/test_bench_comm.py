"""``lowbit bench comm``: its table from the runs' ``comm/*`` columns. The columns themselves (the
CommBytes callback under two real FSDP2 processes) are tested in tests/framework/test_distributed.py;
here the two-process runs are stand-ins with known bytes and losses, so the table's arithmetic shows."""

import pytest

from lowbit.bench import comm as bench
from lowbit.errors import LowbitError

# MiB per step (step 0 differs: FSDP2 learns its backward prefetch order in the first step)
GATHER = {"bf16": [3.0, 4.0, 4.0], "nvfp4": [0.75, 1.0, 1.0], "nvfp4-plain": [3.0, 4.0, 4.0]}


def _fake_train(run_dir, args, echo):
    name = next(a.split("=")[1] for a in args if a.startswith("recipe=")).split("_")[0]
    plain = "precision.quantized_all_gather=false" in args or name == "bf16"
    key = f"{name}-plain" if plain and name != "bf16" else name
    loss = [3.0, 2.5, 2.25] if "quantized_all_gather=true" not in " ".join(args) else [3.0, 2.5, 2.2500001]
    return {
        "train/loss": dict(enumerate(loss)),
        "comm/all_gather_mb": dict(enumerate(GATHER[key])),
        "comm/reduce_scatter_mb": dict(enumerate([8.0, 8.0, 8.0])),
    }


def _rows(text: str) -> list[list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| precision")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


def test_table_has_bytes_per_step_ratios_to_bf16_and_the_loss_check(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "_train", _fake_train)
    assert bench.main(["--precisions", "bf16,nvfp4", "--steps", "3", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert (tmp_path / "comm.md").read_text() in text and (tmp_path / "comm.png").is_file()
    rows = _rows(text)
    assert [r[:2] for r in rows] == [["bf16", "FP32 (plain)"], ["nvfp4", "quantized"], ["nvfp4", "FP32 (plain)"]]
    # bytes per step over the steps after the first; ratio to bf16's all-gather
    assert [r[2] for r in rows] == ["4.000", "1.000", "4.000"] and [r[3] for r in rows] == [
        "1.000x",
        "0.250x",
        "1.000x",
    ]
    assert rows[1][5] == "max diff 1.0e-07" and rows[0][5] == rows[2][5] == "—"


def test_bad_arguments_are_one_line(tmp_path):
    with pytest.raises(LowbitError, match="unknown comm bench precision 'int3'; valid: bf16, fp8, mxfp4, nvfp4"):
        bench.main(["--precisions", "bf16,int3", "--out", str(tmp_path)])
    with pytest.raises(LowbitError, match="--steps and --devices must be at least 2, got 1 and 2"):
        bench.main(["--steps", "1", "--out", str(tmp_path)])
