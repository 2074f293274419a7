"""``lowbit compare`` / ``lowbit plot``: the table restates each run's numbers and its gap to the
baseline chosen by the documented rule; the PNGs are real images of the documented size."""

import copy
import csv
import struct

import pytest
import yaml

from lowbit.compare import compare_main, ema, format_gap, main, plot_main
from lowbit.errors import LowbitError

CFG = {
    "trainer": {"max_steps": 4, "val_check_interval": 2, "log_every_n_steps": 1, "accumulate_grad_batches": 1},
    "model": {"name": "gpt", "dim": 32, "n_layers": 2},
    "posenc": {"name": "rope"},
    "data": {"name": "stdlib", "seq_len": 32, "batch_size": 4},
    "task": {"_target_": "lowbit.tasks.lm.CausalLM"},
    "optimizer": {"name": "adamw", "lr": 0.003},
    "scheduler": {"warmup_steps": 1},
    "precision": {"name": "bf16"},
    "seed": 1,
    "logger": {"wandb": False},
}


def _run(path, precision, losses, val, speed, health=None, seed=1, **model):
    """A fake finished run of CFG: train losses at steps 0.., val/loss at step 4, tokens/s each step."""
    cfg = copy.deepcopy(CFG)
    cfg["precision"]["name"], cfg["seed"] = precision, seed
    cfg["model"].update(model)
    (path / "csv").mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    with open(path / "csv" / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "perf/tokens_per_s", "step", "train/loss", "val/loss"])
        w.writerows([0, s, i, loss, ""] for i, (loss, s) in enumerate(zip(losses, speed)))
        w.writerow([0, "", len(losses), "", val])
    if health:
        with open(path / "health.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(
                ["step", "layer", "operand", "amax", "scale_min", "scale_max", "underflow", "saturation", "snr_db"]
            )
            w.writerows([0, "blocks.0.fc", op, 1, 0.1, 0.5, *stats] for op, stats in health.items())
    return path


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    return {
        "bf16": _run(root / "bf16" / "a", "bf16", [4.0, 3.0, 2.5, 2.25], 2.0, [900, 1000, 1100, 1000]),
        "nvfp4": _run(
            root / "nvfp4" / "a",
            "nvfp4",
            [4.0, 3.25, 2.75, 2.5],
            2.05,
            [400, 600, 500, 650],
            health={"fprop.x": (0.125, 0.0375, 20.25), "wgrad.dy": (0.2407, 0.01, 16.58)},
        ),
        "fp8": _run(root / "fp8" / "a", "fp8", [4.0, 3.0, 2.5, 2.3], 2.01, [1500, 1800, 2000, 1900]),
    }


def _table(text):
    """{run path: cells after the first} from the markdown table in ``text``."""
    lines = [line for line in text.splitlines() if line.startswith("| `")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return {c[0].split("`")[1]: c[1:] for c in cells}


def _png_size(path):
    """(width, height) from a PNG's signature and IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and data[-8:-4] == b"IEND"
    return struct.unpack(">II", data[16:24])


def test_table_gives_each_runs_numbers_and_gap_to_the_bf16_run(runs, tmp_path, capsys):
    out = tmp_path / "out"
    assert compare_main([str(runs["nvfp4"]), str(runs["bf16"]), str(runs["fp8"]), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert (out / "compare.md").read_text() in text
    assert text.splitlines()[0] == (
        "| run | precision | seed | steps | experiment | val loss | gap to baseline | throughput "
        "| underflow max | saturation max | SNR min (dB) |"
    )
    rows = _table(text)
    fp = rows[str(runs["bf16"])][3]
    assert rows == {
        str(runs["nvfp4"]): ["nvfp4", "1", "4", fp, "2.0500", "+2.50%", "550 tokens/s", "24.07%", "3.75%", "16.6"],
        str(runs["bf16"]): ["bf16", "1", "4", fp, "2.0000", "+0.00%", "1,000 tokens/s", "–", "–", "–"],
        str(runs["fp8"]): ["fp8", "1", "4", fp, "2.0100", "+0.50%", "1,850 tokens/s", "–", "–", "–"],
    }
    assert f"`{runs['bf16']}` (baseline)" in text
    assert _png_size(out / "loss.png") == (720, 540)  # 6 x 4.5 inches at 120 dpi
    assert _png_size(out / "gap.png") == (720, 540)


def test_explicit_baseline_wins_over_the_bf16_run(runs, tmp_path, capsys):
    compare_main([str(runs["bf16"]), str(runs["nvfp4"]), "--baseline", str(runs["fp8"]), "--out", str(tmp_path / "o")])
    rows = _table(capsys.readouterr().out)
    assert list(rows) == [str(runs["fp8"]), str(runs["bf16"]), str(runs["nvfp4"])]  # the baseline row first
    assert rows[str(runs["bf16"])][5] == format_gap(2.0, 2.01) == "-0.50%"
    assert rows[str(runs["nvfp4"])][5] == "+1.99%"


def test_without_a_bf16_run_the_baseline_is_found_by_experiment(runs, tmp_path, capsys):
    # a BF16 run of another model sits beside it too: it is not the baseline
    _run(tmp_path / "runs" / "bf16" / "small", "bf16", [5.0, 5.0, 5.0, 5.0], 4.0, [1, 1, 1, 1], dim=8)
    compare_main([str(runs["nvfp4"]), "--out", str(tmp_path / "o")])
    rows = _table(capsys.readouterr().out)
    assert list(rows) == [str(runs["bf16"].resolve()), str(runs["nvfp4"])]
    assert rows[str(runs["nvfp4"])][5] == "+2.50%"


def test_the_bf16_run_of_the_same_experiment_is_preferred(runs, tmp_path, capsys):
    small = _run(tmp_path / "small", "bf16", [5.0, 5.0, 5.0, 5.0], 4.0, [1, 1, 1, 1], dim=8)
    other_seed = _run(tmp_path / "seed2", "bf16", [4.0, 3.0, 2.5, 2.25], 2.2, [1, 1, 1, 1], seed=2)
    compare_main([str(runs["nvfp4"]), str(small), str(other_seed), str(runs["bf16"]), "--out", str(tmp_path / "o")])
    rows = _table(capsys.readouterr().out)
    assert rows[str(runs["nvfp4"])][5] == "+2.50%"  # against runs["bf16"]: same model, same seed
    assert rows[str(small)][5] == "+100.00%"


def test_another_experiment_is_compared_with_a_note(runs, tmp_path, capsys):
    small = _run(tmp_path / "small", "nvfp4", [5.0, 5.0, 5.0, 5.0], 4.0, [1, 1, 1, 1], dim=8)
    compare_main([str(runs["bf16"]), str(small), "--out", str(tmp_path / "o")])
    captured = capsys.readouterr()
    assert f"note: {small} is another experiment than the baseline" in captured.err
    assert _table(captured.out)[str(small)][5] == "+100.00%"


def test_plot_writes_only_the_pngs(runs, tmp_path, capsys):
    out = tmp_path / "plots"
    assert plot_main([str(runs["nvfp4"]), str(runs["bf16"]), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["gap.png", "loss.png"]
    assert capsys.readouterr().out == f"plots: {out / 'loss.png'}, {out / 'gap.png'}\n"
    plot_main([str(runs["fp8"]), "--baseline", str(runs["fp8"]), "--out", str(tmp_path / "one")])
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["loss.png"]  # no other run: no gap


def test_default_out_is_runs_compare_time(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main(["plot", str(runs["bf16"])])
    (folder,) = (tmp_path / "runs" / "compare").iterdir()
    assert len(folder.name) == len("20261204-101500") and (folder / "loss.png").is_file()


def test_bad_runs_are_one_line_errors(tmp_path):
    with pytest.raises(LowbitError, match=r"^run directory .*missing does not exist$"):
        compare_main([str(tmp_path / "missing")])
    with pytest.raises(LowbitError, match=r"is not a run directory: it has no config.yaml"):
        compare_main([str(tmp_path)])
    with pytest.raises(LowbitError, match="unknown command 'diff'; valid: compare, plot"):
        main(["diff"])


def test_ema_removes_the_start_up_bias():
    assert ema([1.0, 2.0, 3.0], 0.5) == pytest.approx([1.0, 1.25 / 0.75, 2.125 / 0.875], rel=1e-15)
    assert ema([2.0] * 5, 0.9) == pytest.approx([2.0] * 5, rel=1e-12)
    assert format_gap(None, 2.0) == format_gap(2.0, None) == "–"


def test_legend_labels_are_precision_and_seed_then_a_path_tail(tmp_path):
    from lowbit.compare import legend_labels
    from lowbit.experiment import Run

    a, b, c = (Run(path=tmp_path / "runs" / d / "t", cfg={"precision": {"name": "nvfp4"}, "seed": 1}) for d in "xyz")
    assert legend_labels([a]) == ["nvfp4, seed 1"]
    assert legend_labels([a, b]) == ["nvfp4, seed 1 (x/t)", "nvfp4, seed 1 (y/t)"]
    c.cfg = {"precision": {"name": "bf16"}, "seed": 2}
    assert legend_labels([a, c]) == ["nvfp4, seed 1", "bf16, seed 2"]
