"""``lowbit bench numerics``: a row per preset with positive throughputs, torchao beside MX and NVFP4, the
compiled columns checked bit for bit against the eager functions."""

import sys

import pytest
import torch

from lowbit.bench import numerics as bench
from lowbit.errors import LowbitError
from lowbit.numerics import preset_names

WITH_TORCHAO = ["mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp4", "nvfp4"]
FAST = ["--size", "64", "--repeats", "2", "--warmup", "1", "--threads", "1", "--no-compile"]


def _rows(table: str) -> dict[str, list[str]]:
    """preset -> its cells after the name, from the markdown table."""
    lines = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| preset")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return {c[0]: c[1:] for c in cells}


def test_bench_has_a_row_per_preset_with_positive_throughputs(tmp_path, capsys):
    pytest.importorskip("torchao")
    out = tmp_path / "numerics.md"
    threads = torch.get_num_threads()
    assert bench.main([*FAST, "--out", str(out)]) == 0
    assert torch.get_num_threads() == threads  # --threads is undone afterwards
    printed = capsys.readouterr().out
    assert out.read_text() == printed
    assert "float32 input (64x64)" in printed and ", 1 thread," in printed
    rows = _rows(printed)
    assert sorted(rows) == preset_names()
    for preset, (lowbit, _, _, fake, _) in rows.items():
        assert float(lowbit) > 0 and float(fake) > 0, preset
    for preset in WITH_TORCHAO:
        lowbit, torchao, ratio, _, function = rows[preset]
        assert float(torchao) > 0 and float(ratio) > 0, preset
        assert float(ratio) == pytest.approx(float(lowbit) / float(torchao), rel=0.02)  # 3 significant digits
        assert function != "n/a"
    assert rows["nvfp4_2d"][1:3] == ["n/a", "n/a"]  # torchao has no 16x16 NVFP4 blocks


def test_without_torchao_its_columns_read_na(monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "torchao" or m.startswith("torchao.")] + ["torchao"]:
        monkeypatch.setitem(sys.modules, name, None)  # import torchao... raises ImportError
    assert bench.main([*FAST, "--presets", "mxfp4,nvfp4"]) == 0
    printed = capsys.readouterr().out
    rows = _rows(printed)
    assert sorted(rows) == ["mxfp4", "nvfp4"]
    for lowbit, torchao, ratio, fake, function in rows.values():
        assert float(lowbit) > 0 and float(fake) > 0
        assert [torchao, ratio, function] == ["n/a", "n/a", "n/a"]
    assert "torchao not installed" in printed


def test_run_returns_throughputs_for_bfloat16():
    rows = bench.run((32, 64), dtype=torch.bfloat16, repeats=1, warmup=0, presets=["int8_channel"])
    assert [r.preset for r in rows] == ["int8_channel"] and rows[0].lowbit_gbs > 0 and rows[0].fake_gbs > 0


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--size", "100"], "columns divisible by 32 and rows by 16"),
        (["--size", "64x"], "--size must be N or ROWSxCOLS"),
        (["--size", "64", "--repeats", "0"], "--repeats must be >= 1"),
        (["--size", "64", "--presets", "mxfp3"], "unknown preset 'mxfp3'"),
        (["--size", "64", "--threads", "0"], "--threads must be >= 1"),
    ],
)
def test_bad_options_are_clear_errors(argv, message):
    with pytest.raises(LowbitError, match=message):
        bench.main(argv)


def test_the_cli_finds_the_bench():
    from lowbit.cli import _benches

    assert _benches()["numerics"] == "lowbit.bench.numerics"


def test_the_compiled_columns_time_both_sides_compiled_and_count_wrong_values(capsys):
    pytest.importorskip("torchao")
    # 256 x 256 = 2^16 elements: lowbit's compiled path runs (it starts there)
    assert bench.main(["--size", "256", "--repeats", "1", "--warmup", "0", "--presets", "int8_channel"]) == 0
    printed = capsys.readouterr().out
    assert "compiled = lowbit `quantize`/`dequantize(compile=True)`" in printed
    (lowbit, torchao, ratio, lowbit_c, torchao_c, ratio_c, fake, function) = _rows(printed)["int8_channel"]
    assert float(lowbit_c) > 0 and float(torchao_c) > 0  # bare numbers: no value differs from eager
    assert float(ratio_c) == pytest.approx(float(lowbit_c) / float(torchao_c), rel=0.02)
    assert function.startswith("choose_qparams_affine")


def test_a_compiled_function_that_changes_values_is_reported_not_hidden():
    a = torch.tensor([1.0, 2.0, -0.0, float("nan")])
    assert bench._differ(a, a.clone()) == 0
    assert bench._differ(a, torch.tensor([1.0, 2.0, 0.0, float("nan")])) == 1  # the sign of zero counts
    assert bench._differ(a, torch.tensor([1.0, float("inf"), -0.0, float("nan")])) == 1
    row = bench.Row("mxfp8_e5m2", 1.0, 0.5, 1.0, "to_mx + to_dtype", 2.0, 4.0, 0, 15511)
    table = bench.markdown([row], (64, 64), torch.float32, 1, 0)
    assert "| 2 | 4 (15,511 values differ from eager) | 0.5 |" in table
    assert "lowbit compiled" not in bench.markdown([row], (64, 64), torch.float32, 1, 0, compile=False)
