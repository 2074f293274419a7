"""``lowbit bench quality``: the table restates each run's own val/loss, gaps are relative to the
first variant, and an interrupted bench reuses finished runs only when their config is the same."""

import csv
import math
import os
import statistics

import pytest

from lowbit.bench import quality as bench
from lowbit.errors import LowbitError

TINY = ["--variants", "bf16,nvfp4_no_sr", "--out"]


def _rows(text: str) -> dict[str, list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("| `")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return {c[0].strip("`"): c[1:] for c in cells}


def _final_val_loss(run_dir) -> float:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return float([r for r in csv.DictReader(f) if r["val/loss"]][-1]["val/loss"])


def test_table_restates_each_runs_val_loss_and_its_gap(tmp_path, capsys):
    out = tmp_path / "q"
    assert bench.main([*TINY, str(out), "debug=smoke"]) == 0
    text = capsys.readouterr().out
    assert (out / "quality.md").read_text() in text
    assert (out / "quality.png").stat().st_size > 0
    rows = _rows(text)
    assert list(rows) == ["bf16", "nvfp4_no_sr"]
    base, ablated = _final_val_loss(out / "bf16-s1"), _final_val_loss(out / "nvfp4_no_sr-s1")
    assert math.isfinite(base) and base != ablated  # FP4 changes the numbers
    assert float(rows["bf16"][1]) == pytest.approx(base, abs=5e-5) and rows["bf16"][2] == "+0.00%"
    assert float(rows["nvfp4_no_sr"][1]) == pytest.approx(ablated, abs=5e-5)
    assert float(rows["nvfp4_no_sr"][2].rstrip("%")) == pytest.approx(100 * (ablated - base) / base, abs=5e-3)
    # the ablation really ran NVFP4 with round-to-nearest gradients
    saved = (out / "nvfp4_no_sr-s1" / "config.yaml").read_text()
    assert "name: nvfp4" in saved and "rounding: sr" not in saved


def test_finished_runs_are_reused_and_changed_configs_retrained(tmp_path, capsys):
    out = tmp_path / "q"
    bench.main(["--variants", "bf16", "--out", str(out), "debug=smoke"])
    metrics = out / "bf16-s1" / "csv" / "metrics.csv"
    before = metrics.stat().st_mtime_ns
    first = _rows(capsys.readouterr().out)["bf16"]

    bench.main(["--variants", "bf16", "--out", str(out), "debug=smoke"])  # same config: read back
    captured = capsys.readouterr()
    assert "already trained" in captured.err and metrics.stat().st_mtime_ns == before
    assert _rows(captured.out)["bf16"] == first

    bench.main(["--variants", "bf16", "--out", str(out), "debug=smoke", "optimizer.lr=1e-4"])  # retrained
    captured = capsys.readouterr()
    assert "already trained" not in captured.err and metrics.stat().st_mtime_ns != before
    assert _rows(captured.out)["bf16"][1] != first[1]


def test_an_unfinished_run_is_trained_again(tmp_path, capsys):
    out = tmp_path / "q"
    bench.main(["--variants", "bf16", "--out", str(out), "debug=smoke"])
    metrics = out / "bf16-s1" / "csv" / "metrics.csv"
    with open(metrics) as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, [r for r in reader if not r["val/loss"]]  # as if stopped early
    with open(metrics, "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)
    os.utime(metrics, ns=(0, 0))
    bench.main(["--variants", "bf16", "--out", str(out), "debug=smoke"])
    assert "already trained" not in capsys.readouterr().err and metrics.stat().st_mtime_ns != 0


def test_unknown_variant_is_a_clear_error():
    with pytest.raises(LowbitError, match="unknown quality variant 'nvfp5'; valid: bf16, fp8, mxfp4_naive"):
        bench.main(["--variants", "bf16,nvfp5"])


def test_paired_gaps_and_their_interval_resolve_an_ordering_the_spreads_do_not():
    """Seed luck moves both variants alike: the spreads overlap, the paired gaps (+1% every seed) do not."""
    base = bench.Outcome(bench.VARIANTS["bf16"], val_loss=[1.40, 1.50, 1.60])
    worse = bench.Outcome(bench.VARIANTS["fp8"], val_loss=[1.414, 1.515, 1.616])
    noisy = bench.Outcome(bench.VARIANTS["hif8"], val_loss=[1.386, 1.515, 1.600])
    mean, half = bench.paired_gap(worse, base)
    assert mean == pytest.approx(0.01) and half == pytest.approx(0.0, abs=1e-12)
    mean, half = bench.paired_gap(noisy, base)  # gaps -1%, +1%, 0%
    assert mean == pytest.approx(0.0, abs=1e-12)
    assert half == pytest.approx(4.302652729911275 * 0.01 / math.sqrt(3))  # t(0.975, 2) · sd / √n
    rows = _rows(bench.table([base, worse, noisy]))
    assert rows["bf16"][-2:] == ["–", "baseline"]
    assert rows["fp8"][-2:] == ["+1.00% ± 0.00%", "worse"]
    assert rows["hif8"][-1] == "not resolved"
    assert bench.paired_gap(bench.Outcome(bench.VARIANTS["fp8"], val_loss=[1.4]), base) is None


@pytest.mark.parametrize("name", ["hif8", "int4"])
def test_the_new_precisions_are_variants_that_build(name):
    from lowbit.config import compose
    from lowbit.run import build

    built = build(compose(["recipe=bf16_llm", *bench.VARIANTS[name].overrides, "debug=smoke"]).cfg)
    assert built.precision.name == name


def test_every_variant_trains_a_seed_before_any_trains_the_next(tmp_path, monkeypatch, capsys):
    """A bench stopped part-way has whole seeds (paired comparisons of every variant); text recipes
    validate on the larger validation set."""
    trained = []

    def fake_train_once(overrides, run_dir, label, echo=print):
        trained.append((run_dir.name, [o for o in overrides if o.startswith("data.val_windows")]))
        return 1.0 + 0.01 * len(trained)

    monkeypatch.setattr(bench, "train_once", fake_train_once)
    monkeypatch.setattr(bench, "plot", lambda outcomes, path: path.write_bytes(b"png"))
    bench.main(["--variants", "bf16,fp8", "--seeds", "1,2", "--out", str(tmp_path), "debug=smoke"])
    assert [name for name, _ in trained] == ["bf16-s1", "fp8-s1", "bf16-s2", "fp8-s2"]
    assert all(windows == ["data.val_windows=1024"] for _, windows in trained)
    rows = _rows(capsys.readouterr().out)
    assert rows["fp8"][1] == "1.0300 ± 0.0141"  # seed 1: 1.02, seed 2: 1.04


def test_orderings_test_each_claim_on_its_own_pair_and_say_how_many_seeds_would_settle_it():
    """A claim is tested on its two variants (paired per seed), not through their gaps to BF16."""
    outcomes = [
        bench.Outcome(bench.VARIANTS["bf16"], val_loss=[1.40, 1.50, 1.60]),
        bench.Outcome(bench.VARIANTS["mxfp4_naive"], val_loss=[1.50, 1.60, 1.70]),
        bench.Outcome(bench.VARIANTS["mxfp4"], val_loss=[1.485, 1.584, 1.683]),  # 1.00%, 1.00%, 1.00% below naive
        bench.Outcome(bench.VARIANTS["nvfp4"], val_loss=[1.45, 1.55, 1.65]),
        bench.Outcome(bench.VARIANTS["nvfp4_no_sr"], val_loss=[1.45 / 0.99, 1.55 / 1.02, 1.65 / 1.00]),
    ]
    rows = _rows(bench.orderings(outcomes))
    assert list(rows) == ["nvfp4` < `nvfp4_no_sr", "nvfp4` < `mxfp4", "mxfp4` < `mxfp4_naive"]
    naive = rows["mxfp4` < `mxfp4_naive"]
    assert naive[1] == "-1.00% ± 0.00%" and naive[2] == "-1.00 -1.00 -1.00" and naive[3] == "agrees (resolved)"
    assert naive[4] == "–"
    versus_mx = rows["nvfp4` < `mxfp4"]  # NVFP4 below MXFP4 every seed: resolved the paper's way
    assert versus_mx[3] == "agrees (resolved)"
    no_sr = rows["nvfp4` < `nvfp4_no_sr"]  # -1%, +2%, 0%: mean +0.33%, the other way, unresolved
    assert no_sr[1].startswith("+0.33% ± ")
    assert no_sr[3] == "not resolved, other way"
    gaps = [0.99 - 1, 1.02 - 1, 0.0]
    n = int(no_sr[4].lstrip("~"))  # the fewest seeds whose interval, at this mean and sd, excludes 0
    sd = statistics.stdev(gaps)
    assert bench._t(n, 0.95) * sd / math.sqrt(n) < abs(statistics.fmean(gaps))
    assert bench._t(n - 1, 0.95) * sd / math.sqrt(n - 1) >= abs(statistics.fmean(gaps))
    assert bench.orderings(outcomes[:2]) is None  # no claim has both variants
    assert bench.orderings([bench.Outcome(o.variant, o.val_loss[:1]) for o in outcomes]) is None  # one seed


def test_seeds_to_resolve():
    assert bench.seeds_to_resolve([0.01, 0.01]) == 2  # no spread: resolved as it stands
    assert bench.seeds_to_resolve([0.0, 0.0]) is None
    assert bench.seeds_to_resolve([0.01, -0.01, 0.001]) is None  # mean ~0: beyond 100 seeds
