"""``lowbit bench speed``: one row per configuration, ratios against the first, and the
saved-for-backward memory that the step timing comes with."""

import pytest

from lowbit.bench import speed as bench


def _rows(text: str) -> list[list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| precision")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


def test_rows_ratios_and_saved_memory(tmp_path, capsys):
    out = tmp_path / "speed.md"
    argv = ["--precisions", "bf16,nvfp4", "--posencs", "rope,alibi", "--steps", "2", "--warmup", "1", "--rounds", "2"]
    assert bench.main([*argv, "--out", str(out), "debug=smoke"]) == 0
    text = capsys.readouterr().out
    assert out.read_text() in text and "lowbit bench speed --precisions bf16,nvfp4" in text
    rows = _rows(text)
    assert [r[:2] for r in rows] == [["bf16", "rope"], ["bf16", "alibi"], ["nvfp4", "rope"], ["nvfp4", "alibi"]]
    base_ms, base_mb = float(rows[0][2]), float(rows[0][4])
    assert rows[0][3] == "1.00" and rows[0][5] == "1.00" and base_ms > 0 and base_mb > 0
    for r in rows[1:]:  # the ratios of the unrounded numbers; cells are rounded to 0.1
        ms, mb = float(r[2]), float(r[4])
        assert float(r[3]) == pytest.approx(ms / base_ms, abs=0.005 + 0.05 * (1 + ms / base_ms) / base_ms)
        assert float(r[5]) == pytest.approx(mb / base_mb, abs=0.005 + 0.05 * (1 + mb / base_mb) / base_mb)
    # QuantLinear saves no more for backward than the high-precision layer does
    assert float(rows[2][4]) <= base_mb


def test_a_vit_recipe_is_measured_too(tmp_path, capsys):
    """The saved-bytes count calls the task's ``_loss``: an image classifier has one as the LM does (it had none)."""
    argv = ["--recipe", "bf16_vit", "--precisions", "bf16", "--posencs", "none,lookhere", "--steps", "2"]
    assert bench.main([*argv, "--warmup", "1", "--rounds", "1", "debug=smoke", "model.n_heads=4"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert [r[:2] for r in rows] == [["bf16", "none"], ["bf16", "lookhere"]]
    assert all(float(r[2]) > 0 and float(r[4]) > 0 for r in rows)


def test_step_timer_counts_only_steps_after_warmup():
    results = bench.run("bf16_llm", ["bf16"], ["rope"], steps=3, warmup=2, rounds=1, extra=["debug=smoke"])
    (res,) = results
    assert len(res.step_ms) == 1 and res.step_ms[0] > 0
    times, saved, peak, _ = bench.measure(["recipe=bf16_llm", "debug=smoke", "logger=csv"], steps=3, warmup=2)
    assert len(times) == 3 and saved > 0 and peak is None  # peak memory only on CUDA


def test_two_fsdp_processes_train_every_configuration_and_rank_zero_reports(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    lowbit = str(Path(sys.executable).with_name("lowbit"))
    args = ["--precisions", "bf16,nvfp4", "--steps", "2", "--warmup", "1", "--rounds", "1", "--out", "t.md"]
    cmd = [lowbit, "bench", "speed", *args, "debug=smoke", "trainer.devices=2", "trainer.strategy=fsdp"]
    result = subprocess.run(cmd, env={**env, "WANDB_MODE": "disabled"}, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("| precision |") == 1  # one table: rank 0's
    assert [r[0] for r in _rows((tmp_path / "t.md").read_text())] == ["bf16", "nvfp4"]
    assert result.stderr.count("round 1/1 precision=nvfp4") == 1


def test_profile_writes_a_trace_per_configuration_and_prints_the_top_ops(tmp_path, capsys):
    import json

    argv = ["--precisions", "bf16,nvfp4", "--steps", "2", "--warmup", "1", "--rounds", "2"]
    assert bench.main([*argv, "--profile", str(tmp_path), "debug=smoke"]) == 0
    err = capsys.readouterr().err
    for name in ("bf16-rope", "nvfp4-rope"):  # the first round only: one trace each
        events = json.loads((tmp_path / f"{name}.json").read_text())["traceEvents"]
        steps = {e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")}
        assert len(steps) == 2  # the two timed steps, not the warm-up
    assert err.count("profile of ") == 2 and err.count("Self CPU time total") == 2
    table = err.split("profile of recipe=bf16_llm precision=nvfp4")[1].split("Self CPU time total")[0]
    rows = [line for line in table.splitlines()[4:] if line.strip() and not line.startswith("---")]
    assert len(rows) == 15 and "_QuantLinearFn" in table  # the quantized layers' own time shows
