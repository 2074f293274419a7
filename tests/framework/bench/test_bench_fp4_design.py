"""``lowbit bench fp4-design``: design points are the NVFP4 recipe with only the block scaling and the
gradients' rounding changed, a point outside the design space fails before anything is created, the
SNR ranks the scale formats by their precision and range, and the report restates each run."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from lowbit.bench import fp4_design as bench
from lowbit.bench import quality
from lowbit.config import compose
from lowbit.errors import LowbitError
from lowbit.numerics import get_spec


def _specs(overrides) -> dict[tuple[str, str], object]:
    precision = OmegaConf.to_container(compose(["recipe=bf16_llm", *overrides]).cfg.precision)
    return {
        (gemm, operand): get_spec(spec)
        for gemm, operands in precision.items()
        if isinstance(operands, dict)
        for operand, spec in operands.items()
        if isinstance(spec, dict)
    }


def test_the_e4m3_block16_sr_point_is_nvfp4_with_1d_weight_blocks():
    point = bench.DesignPoint("e4m3_ts", 16, True)
    assert _specs(point.variant().overrides) == _specs(quality.VARIANTS["nvfp4_1d_w"].overrides)


@pytest.mark.parametrize("scale", list(bench.SCALES))
def test_a_point_changes_every_operands_scaling_and_only_the_gradients_rounding(scale):
    specs = _specs(bench.DesignPoint(scale, 32, False).variant().overrides)
    sr = _specs(bench.DesignPoint(scale, 32, True).variant().overrides)
    assert len(specs) == 6
    for (gemm, operand), spec in specs.items():
        assert spec.element == "e2m1" and tuple(spec.block) == (1, 32)
        assert spec.scale_format == bench.SCALES[scale][0]
        assert spec.global_scale == bench.SCALES[scale][1]
        assert spec.rounding == "rne"
        assert sr[gemm, operand].rounding == ("sr" if operand == "dy" else "rne")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--scales", "e4m3"], "unknown FP4 block-scale format 'e4m3'"),
        (["--blocks", "24"], "block size '24' in --blocks is not a power of two"),
        (["--sr", "yes"], "--sr takes on and off"),
        (["--blocks", "16,256"], r"block size 256 does not divide width \d+ of layer"),
    ],
)
def test_a_point_outside_the_design_space_is_one_line_and_creates_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    with pytest.raises(LowbitError, match=message) as caught:
        bench.main([*args, "--out", str(out), "debug=smoke"])
    assert "\n" not in str(caught.value)
    assert not out.exists()


def _captured(scale: float) -> dict[str, dict[str, torch.Tensor]]:
    """Two layers of heavy-tailed operands whose rows span four decades of magnitude, times ``scale``."""
    g = torch.Generator().manual_seed(0)

    def operand(rows):
        rowscale = torch.logspace(-2, 2, rows).unsqueeze(1)
        return scale * rowscale * torch.randn(rows, 256, generator=g) * torch.rand(rows, 256, generator=g).pow(4)

    return {name: {"x": operand(64), "w": operand(128), "dy": operand(64)} for name in ("a", "b")}


def test_snr_ranks_the_scale_formats_by_precision_and_range():
    captured = _captured(1.0)
    snr = {s: bench.quantization_snr(captured, bench.DesignPoint(s, 32, False)) for s in bench.SCALES}
    for operand in ("x", "w", "dy"):
        # scales rounded to 3 mantissa bits beat powers of two, and exact FP32 scales beat both
        assert snr["e8m0"][operand] < snr["ue5m3"][operand] < snr["fp32"][operand]
        assert snr["ue5m3"][operand] == pytest.approx(snr["ue5m3_ts"][operand], abs=0.3)
        assert 10 < snr["e8m0"][operand] < snr["fp32"][operand] < 30  # E2M1: a few dB per bit, not exact
    # gradients five decades down: UE5M3 alone runs out of range (its blocks' scales flush to
    # zero), under a tensor scale it keeps its SNR, and E8M0's range does not notice
    tiny = _captured(1e-7)
    tiny_snr = {s: bench.quantization_snr(tiny, bench.DesignPoint(s, 32, False)) for s in bench.SCALES}
    assert tiny_snr["ue5m3"]["dy"] < 3
    assert tiny_snr["ue5m3_ts"]["dy"] == pytest.approx(snr["ue5m3_ts"]["dy"], abs=0.5)
    assert tiny_snr["e8m0"]["dy"] == pytest.approx(snr["e8m0"]["dy"], abs=0.5)
    # stochastic rounding is unbiased, not closer: its error energy is larger than nearest's
    sr = bench.quantization_snr(captured, bench.DesignPoint("e4m3_ts", 16, True))
    rne = bench.quantization_snr(captured, bench.DesignPoint("e4m3_ts", 16, False))
    assert sr["dy"] < rne["dy"] and sr["x"] == rne["x"] and sr["w"] == rne["w"]


def test_main_effects_average_each_level_over_the_points_that_have_it():
    points = bench.design_points("e8m0,fp32", "16,32", "on")
    gaps = {
        "e8m0_b16_sr": [0.02, 0.04],
        "e8m0_b32_sr": [0.04, 0.06],
        "fp32_b16_sr": [0.0, 0.0],
        "fp32_b32_sr": [0.01, 0.01],
    }
    rows = {(r[0], r[1]): r[2:] for r in bench._factor_rows(points, gaps)}
    assert rows == {
        ("scale", "e8m0"): ["+4.00%", "2"],
        ("scale", "fp32"): ["+0.50%", "2"],
        ("block", "16"): ["+1.50%", "2"],
        ("block", "32"): ["+3.00%", "2"],
    }  # one rounding level: no row for it


def test_diverged_points_leave_the_main_effects_and_factors_are_tested_on_matched_pairs():
    points = bench.design_points("e8m0,ue5m3,fp32", "16,32", "on,off")
    base = [1.0, 2.0]  # BF16's loss per seed
    losses = {
        "e8m0_b16_sr": [1.02, 2.02],
        "e8m0_b16_rne": [1.03, 2.08],
        "e8m0_b32_sr": [1.04, 2.04],
        "e8m0_b32_rne": [1.04, 2.06],
        "fp32_b16_sr": [1.0, 2.0],
        "fp32_b16_rne": [1.01, 2.02],
        "fp32_b32_sr": [1.01, 2.02],
        "fp32_b32_rne": [1.02, 2.02],
        **{p.name: [2.0, 4.0] for p in points if p.scale == "ue5m3"},  # +100%: diverged
    }
    gaps = {name: [(v - b) / b for v, b in zip(values, base)] for name, values in losses.items()}
    effects = {(r[0], r[1]): r[2:] for r in bench._factor_rows(points, gaps)}
    assert set(effects) == {
        ("scale", "e8m0"),
        ("scale", "fp32"),
        ("block", "16"),
        ("block", "32"),
        ("gradients", "SR"),
        ("gradients", "RNE"),
    }  # no ue5m3 row
    assert effects[("block", "16")][1] == "4"  # e8m0 and fp32, SR and RNE: the diverged points left out
    rows = {r[0]: r[1:] for r in bench._pair_rows(points, losses, gaps)}
    sr = [
        (a - b) / b
        for a, b in [
            (1.02, 1.03),
            (2.02, 2.08),
            (1.04, 1.04),
            (2.04, 2.06),
            (1.0, 1.01),
            (2.0, 2.02),
            (1.01, 1.02),
            (2.02, 2.02),
        ]
    ]
    mean, half = bench.quality._interval(sr, 0.95)
    assert rows["SR against RNE gradients"] == [
        "4",
        f"{100 * mean:+.2f}% ± {100 * half:.2f}%",
        f"{sum(d < 0 for d in sr)} of 8",
        "lower loss" if abs(mean) > half else "not resolved",
    ]
    assert rows["blocks of 16 against 32"][0] == "4" and rows["blocks of 16 against 32"][2] == "6 of 8"


def test_the_report_restates_each_run_and_its_operands_snr(tmp_path, capsys):
    out = tmp_path / "d"
    assert bench.main(["--scales", "ue5m3_ts", "--blocks", "32", "--sr", "on", "--out", str(out), "debug=smoke"]) == 0
    text = capsys.readouterr().out
    assert (out / "fp4-design.md").read_text() in text and (out / "fp4-design.png").stat().st_size > 0
    training, snr = text.split("Quantization SNR")

    def rows(part):
        return {
            line.split("|")[1].strip(): line.split("|")[2:-1] for line in part.splitlines() if line.startswith("| `")
        }

    trained = rows(training)
    assert set(trained) == {"`bf16`", "`ue5m3_ts_b32_sr`"}
    assert all(math.isfinite(float(trained[name][1])) for name in trained)
    saved = (out / "ue5m3_ts_b32_sr-s1" / "config.yaml").read_text()
    assert "scale_format: ue5m3" in saved and "global_scale: true" in saved and "rounding: sr" in saved
    x, w, dy = (float(c) for c in rows(snr)["`ue5m3_ts_b32_sr`"][:3])
    assert all(10 < v < 30 for v in (x, w, dy))


def test_snr_only_trains_the_baseline_alone_and_ranks_every_point(tmp_path, capsys):
    out = tmp_path / "s"
    assert bench.main(["--snr-only", "--blocks", "16,32", "--out", str(out), "debug=smoke"]) == 0
    text = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["bf16-s1"]
    assert "Main effects" not in text and "gap to bf16" not in text
    snr = {
        cells[1].strip("` "): [float(c) for c in cells[2:5]]
        for cells in (line.split("|") for line in text.splitlines() if line.startswith("| `"))
    }
    assert len(snr) == len(bench.SCALES) * 2 * 2
    for block in (16, 32):
        for k in (0, 1):  # activations and weights: rounded to nearest whatever --sr says
            assert snr[f"e8m0_b{block}_rne"][k] < snr[f"fp32_b{block}_rne"][k]
            assert snr[f"e8m0_b{block}_sr"][k] == snr[f"e8m0_b{block}_rne"][k]
        assert snr[f"fp32_b{block}_sr"][2] < snr[f"fp32_b{block}_rne"][2]
    assert snr["fp32_b16_rne"][0] > snr["fp32_b32_rne"][0]  # smaller blocks follow the data more closely
