"""``lowbit bench speed``: one row per configuration, ratios against the first, and the
saved-for-backward memory that the step timing comes with."""

import pytest

from lowbit.bench import speed as bench


def _rows(text: str) -> list[list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| precision")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


# columns: precision, posenc, train ms/step, x, val ms/batch, x, first step s, peak RSS MB, x, saved MB, x
TRAIN, VAL, FIRST, RSS, SAVED = 2, 4, 6, 7, 9


def test_rows_ratios_saved_memory_and_the_profile(tmp_path, capfd):
    """One bench run (each bench run compiles and trains its configurations in processes of their own):
    the table's rows and ratios, the saved-for-backward bytes, and ``--profile``'s traces and top ops."""
    import json

    out = tmp_path / "speed.md"
    # one counted round: with --profile the bench runs an uncounted, profiled round before it (4 processes)
    argv = ["--precisions", "bf16,nvfp4", "--steps", "2", "--warmup", "1", "--rounds", "1"]
    argv += ["--out", str(out), "--profile", str(tmp_path / "profile")]
    # BF16 autocast on every CPU: where autocast falls back to FP32 (no fast BF16), the FP32 layer saves its
    # weight parameter (not counted) and QuantLinear its Q(W) in FP32 beside it, which a smoke model shows
    assert bench.main([*argv, "debug=smoke", "precision.mode=bf16"]) == 0
    captured = capfd.readouterr()
    text, err = captured.out, captured.err  # the configurations' processes print the profiles
    assert out.read_text() in text and "lowbit bench speed --precisions bf16,nvfp4" in text
    rows = _rows(text)
    assert [r[:2] for r in rows] == [["bf16", "rope"], ["nvfp4", "rope"]]
    for col in (TRAIN, VAL, RSS, SAVED):
        base = float(rows[0][col])
        assert rows[0][col + 1] == "1.00" and base > 0
        for r in rows[1:]:  # the ratios of the unrounded numbers; cells are rounded (to 0.1, RSS to 1)
            value, step = float(r[col]), 0.5 if col == RSS else 0.05
            assert float(r[col + 1]) == pytest.approx(value / base, abs=0.005 + step * (1 + value / base) / base)
    assert all(float(r[FIRST]) > 0 for r in rows)
    # QuantLinear saves no more for backward than the high-precision layer does
    assert float(rows[1][SAVED]) <= float(rows[0][SAVED])

    for name in ("bf16-rope", "nvfp4-rope"):  # the profiled round only: one trace each
        events = json.loads((tmp_path / "profile" / f"{name}.json").read_text())["traceEvents"]
        steps = {e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")}
        assert len(steps) == 2  # the two timed steps, not the warm-up
    assert err.count("profile of ") == 2 and err.count("Self CPU time total") == 2  # not the counted round's
    assert err.count("round 1/1 precision=") == 2  # the counted round's line each; the profiled round has none
    table = err.split("profile of recipe=bf16_llm precision=nvfp4")[1].split("Self CPU time total")[0]
    rows = [line for line in table.splitlines()[4:] if line.strip() and not line.startswith("---")]
    assert len(rows) == 15 and "_QuantLinearFn" in table  # the quantized layers' own time shows


def test_a_vit_recipe_is_measured_too(tmp_path, capsys):
    """The saved-bytes count calls the task's ``_loss``: an image classifier has one as the LM does (it had none)."""
    argv = ["--recipe", "bf16_vit", "--precisions", "bf16", "--posencs", "none,lookhere", "--steps", "2"]
    assert bench.main([*argv, "--warmup", "1", "--rounds", "1", "debug=smoke", "model.n_heads=4"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert [r[:2] for r in rows] == [["bf16", "none"], ["bf16", "lookhere"]]
    assert all(float(r[TRAIN]) > 0 and float(r[VAL]) > 0 and float(r[SAVED]) > 0 for r in rows)


def test_a_configuration_runs_as_train_runs_it_and_is_timed_after_the_warm_up(tmp_path):
    """``measure`` runs ``lowbit.run.train``: the run directory holds what a train command writes (config,
    metrics, checkpoint), validation ran, and only the steps after the warm-up are timed."""
    run_dir = tmp_path / "run"
    m = bench.measure(["recipe=bf16_llm", "debug=smoke", "logger=csv"], steps=3, warmup=2, run_dir=run_dir)
    assert len(m.step_s) == 3 and all(s > 0 for s in m.step_s)
    assert m.val_s > 0 and m.first_step_s > 0 and m.saved_mb > 0 and m.peak_cuda_mb is None  # CUDA peak only on CUDA
    assert m.peak_rss_mb is not None and m.peak_rss_mb > 50
    for name in ("config.yaml", "csv/metrics.csv", "checkpoints/last.ckpt"):
        assert (run_dir / name).exists(), name
    metrics = (run_dir / "csv" / "metrics.csv").read_text()
    assert "val/loss" in metrics and "perf/peak_mem_mb" in metrics  # the Throughput callback ran


def test_run_directories_are_removed_and_bad_arguments_are_one_line(tmp_path, capsys, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    bench.run("bf16_llm", ["bf16"], ["rope"], steps=1, warmup=1, rounds=1, extra=["debug=smoke"])
    assert list(tmp_path.iterdir()) == []
    for argv, message in ((["--steps", "0"], "--steps must be at least 1, got 0"), (["--contend", "-1"], "--contend")):
        with pytest.raises(SystemExit) as exit_info:
            bench.main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_contention_runs_busy_processes_and_stops_them():
    import multiprocessing

    with bench.contention(2):
        busy = [p for p in multiprocessing.active_children() if p.is_alive()]
        assert len(busy) >= 2
    assert not [p for p in busy if p.is_alive()]


def test_two_fsdp_processes_train_every_configuration_and_rank_zero_reports(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    lowbit = str(Path(sys.executable).with_name("lowbit"))
    # two configurations in BF16 (quantized layers under FSDP2 are tests/framework/test_distributed.py's)
    args = ["--precisions", "bf16", "--posencs", "rope,none", "--steps", "2", "--warmup", "1", "--rounds", "1"]
    overrides = ["debug=smoke", "trainer.devices=2", "trainer.strategy=fsdp"]
    cmd = [lowbit, "bench", "speed", *args, "--out", "t.md", *overrides]
    result = subprocess.run(cmd, env={**env, "WANDB_MODE": "disabled"}, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("| precision |") == 1  # one table: rank 0's
    assert [r[:2] for r in _rows((tmp_path / "t.md").read_text())] == [["bf16", "rope"], ["bf16", "none"]]
    assert result.stderr.count("round 1/1 precision=bf16 posenc=none") == 1


def test_cold_cache_gives_each_process_empty_compile_caches(tmp_path, monkeypatch):
    """``--cold-cache``: the configuration's process compiles into inductor and Triton caches of its own,
    empty (a fresh machine's first step); without it, the caches the machine has."""
    import json
    import subprocess
    import time
    from dataclasses import asdict

    seen = []

    def fake_run(cmd, check, env):
        seen.append(env)
        result = bench.Measurement([0.1], 0.01, 1.0, time.time() + 5.0, 1.0, 100.0, None, "")
        Path(cmd[-1]).write_text(json.dumps(asdict(result)))
        return subprocess.CompletedProcess(cmd, 0)

    from pathlib import Path

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    cold = bench.measure_process(["recipe=bf16_llm"], 1, 1, None, 1, tmp_path / "a", cold_cache=True)
    bench.measure_process(["recipe=bf16_llm"], 1, 1, None, 1, tmp_path / "b")
    cache = Path(seen[0]["TORCHINDUCTOR_CACHE_DIR"])
    assert cache.parent.parent == tmp_path and not cache.exists() and "TRITON_CACHE_DIR" in seen[0]
    assert "TORCHINDUCTOR_CACHE_DIR" not in seen[1]
    assert cold.step_s == [0.1] and 5.0 <= cold.first_step_s < 10.0  # from the process's launch to its first step
