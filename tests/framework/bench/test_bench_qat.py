"""``lowbit bench qat`` at a tiny size: every kind of row (pretrained, PTQ, fine-tuned QAT, torchao) runs from
one BF16 checkpoint, is evaluated as exported, and the table's sizes, gaps and recovery are computed as stated."""

import json

import pytest

from lowbit.bench import qat as bench
from lowbit.errors import LowbitError

ROWS = "bf16,ptq_int8,ptq_int4,bf16_ft,qat_int8,qat_int4,torchao_int4"
TINY = ["--steps", "4", "--finetune", "3", "--calibration", "4", "--rows", ROWS, "debug=smoke", "model.dim=64"]


def _cells(printed: str, row: str) -> list[str]:
    line = next(line for line in printed.splitlines() if line.startswith(f"| `{row}` |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_bench_runs_every_kind_of_row_and_reports_what_it_measured(tmp_path, capsys):
    out = tmp_path / "bench"
    assert bench.main([*TINY, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (out / "qat.md").read_text() in printed and (out / "qat.png").stat().st_size > 0
    loss = {row: float(_cells(printed, row)[2]) for row in ROWS.split(",")}
    assert all(3.0 < v < 6.5 for v in loss.values())  # a few steps from ln 256 = 5.55
    ptq_gap = loss["ptq_int4"] - loss["bf16"]  # the PTQ rows' reference: the checkpoint (printed losses: 4 places)
    assert float(_cells(printed, "ptq_int4")[3].split()[0]) == pytest.approx(ptq_gap, abs=2e-4)
    qat_gap = loss["qat_int4"] - loss["bf16_ft"]  # the fine-tuned rows' reference: the BF16 fine-tune
    assert float(_cells(printed, "qat_int4")[3].split()[0]) == pytest.approx(qat_gap, abs=2e-4)
    assert _cells(printed, "qat_int4")[4].endswith("%") and _cells(printed, "qat_int8")[4] == ""  # W4A8 rows only
    manifest = json.loads((out / "qat_int4" / "export" / "manifest.json").read_text())
    bf16_bytes = manifest["bytes"]["model_bf16"]
    size = (out / "qat_int4" / "export" / "model.safetensors").stat().st_size
    assert f"({size / bf16_bytes:.2f}x; layers {manifest['bytes']['ratio']:.3f}x)" in _cells(printed, "qat_int4")[5]
    assert manifest["bytes"]["ratio"] == pytest.approx((0.5 + 2 / 32) / 2)  # INT4 codes + an FP16 scale per 32
    for row in ("bf16", "ptq_int8", "qat_int8", "qat_int4", "torchao_int4"):
        ms, ratio = _cells(printed, row)[6].split()
        assert float(ms) > 0 and float(ratio.strip("(x)")) > 0
    bf16_ratio = float(_cells(printed, "bf16")[6].split()[1].strip("(x)"))
    assert 0.5 < bf16_ratio < 2  # the BF16 model against itself, timed alternately


def test_unknown_row_is_one_line():
    with pytest.raises(LowbitError, match=r"unknown qat bench row 'qat_int3'; valid: bf16, ptq_int8"):
        bench.main(["--rows", "bf16,qat_int3"])


def test_table_gaps_recovery_sizes_and_speed_are_as_stated():
    rows = {name: bench.ROWS[name] for name in ("bf16", "ptq_int4", "bf16_ft", "qat_int4")}
    outcomes = [
        bench.Outcome(rows["bf16"], {"val/loss": 2.0}, "", bytes=1000, bf16_bytes=1000, ms=10.0, ms_ratio=1.0),
        bench.Outcome(rows["ptq_int4"], {"val/loss": 2.1}, "bf16", bytes=360, bf16_bytes=1000, layer_ratio=0.3125),
        bench.Outcome(rows["bf16_ft"], {"val/loss": 1.8}, "", bytes=1000, bf16_bytes=1000),
        bench.Outcome(
            rows["qat_int4"], {"val/loss": 1.825}, "bf16_ft", bytes=360, bf16_bytes=1000, ms=25.0, ms_ratio=2.5
        ),
    ]
    text = bench.table(outcomes)
    assert _cells(text, "ptq_int4")[2:6] == ["2.1000", "+0.1000 (+5.00%)", "", "0.00 MB (0.36x; layers 0.312x)"]
    assert _cells(text, "qat_int4")[3:5] == ["+0.0250 (+1.39%)", "75%"]  # 1 - 0.025 / 0.1
    assert _cells(text, "qat_int4")[6] == "25.0 (2.50x)" and _cells(text, "bf16")[5] == "0.00 MB (1.00x)"
