"""``lowbit bench extrapolation``: a row per encoding, finite perplexities, and numbers that hold by construction."""

import json
import math
import re

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from lowbit.bench import extrapolation as bench
from lowbit.data.text import ByteWindows
from lowbit.errors import LowbitError

TINY = ["--train-len", "16", "--steps", "3", "--segments", "4", "debug=smoke"]


def _rows(table: str) -> dict[str, list[str]]:
    """encoding -> its cells after the name, from the first markdown table."""
    first = table[: table.index("Bits per byte")]  # the perplexity table
    lines = [line for line in first.splitlines() if line.startswith("| `")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return {c[0].strip("`"): c[1:] for c in cells}


def test_bench_has_a_row_per_encoding_and_reproduces_the_runs_validation(tmp_path, capsys):
    out = tmp_path / "bench"
    assert bench.main(["--encodings", "alibi,rope,rope_yarn", *TINY, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (out / "extrapolation.md").read_text() in printed
    assert (out / "extrapolation.png").stat().st_size > 0
    results = json.loads((out / "extrapolation.json").read_text())
    assert results["lengths"] == [16, 32, 64, 128]
    rows = _rows(printed)
    assert list(rows) == ["alibi", "rope", "rope_yarn"]
    for name, cells in rows.items():
        enc = results["encodings"][name]
        for n, cell in zip(results["lengths"], cells[1:]):
            loss, ppl = enc["loss"][str(n)], enc["ppl"][str(n)]
            assert math.isfinite(loss) and 1 < ppl < 1000, (name, n)
            # 3 steps from a near-uniform byte model (ln 256 = 5.545 nats) lower the loss a little, at every
            # length alike (the tiny model hardly uses positions yet): 5.21-5.23 on this seed
            assert math.log(256) - 0.5 < loss < math.log(256) - 0.1, (name, n, loss)
            assert ppl == pytest.approx(math.exp(loss), rel=1e-12)  # perplexity is exp(mean loss)
            assert enc["bpb"][str(n)] == pytest.approx(loss / math.log(2), rel=1e-12)
            assert float(cell) == pytest.approx(ppl, abs=5e-4)  # the table prints the same number
    # rope and rope_yarn share one trained model; YaRN with s = 1 is plain RoPE, so 1×L agrees exactly
    rope, yarn = results["encodings"]["rope"], results["encodings"]["rope_yarn"]
    assert rope["run_dir"] == yarn["run_dir"] == str(out / "rope")
    assert yarn["loss"]["16"] == rope["loss"]["16"]
    assert yarn["loss"]["128"] != rope["loss"]["128"]  # and at 8L the scaling changes something

    # the YaRN note counts the pairs the plugin really keeps (ω' = ω) and fully interpolates (ω' = ω/s)
    note = re.search(r"keeps (\d+) .* interpolates (\d+) ", printed)
    plain = bench.load_task(out / "rope")[0].model.posenc.inv_freq()
    scaled = bench.load_task(out / "rope", {"scaling": "yarn", "scale": 2.0})[0].model.posenc.inv_freq()
    ratio = scaled / plain
    assert int(note[1]) == int((ratio == 1).sum()) and int(note[2]) == int((ratio == 0.5).sum()) > 0

    # the bench's evaluation (checkpoint → model → loss) reproduces the run's own val/loss on its windows
    run_dir = out / "alibi"
    task, precision, data = bench.load_task(run_dir)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    windows = ByteWindows(data.corpus.val, int(cfg.data.seq_len), int(cfg.data.val_windows))
    x, y = (torch.stack(t) for t in zip(*(windows[i] for i in range(len(windows)))))  # (N, L) each
    loss = bench.mean_loss(task.model, x, y, precision)
    assert loss == pytest.approx(results["encodings"]["alibi"]["run_val_loss"], rel=1e-5)


def test_every_length_scores_the_same_bytes():
    val = np.arange(10_000, dtype=np.uint16) % 256
    segs = bench.segments(val, 64, 5)
    assert segs.shape == (5, 65)
    targets = [bench.eval_windows(segs, n)[1].reshape(5, -1) for n in (8, 16, 64)]
    for t in targets[1:]:
        assert (t == targets[0]).all()
    x, y = bench.eval_windows(segs, 16)
    assert x.shape == (20, 16) and (x[:, 1:] == y[:, :-1]).all()  # y is x shifted by one


def test_bad_arguments_are_clear_errors():
    with pytest.raises(LowbitError, match="unknown extrapolation encoding 'ropey'; valid: none, learned"):
        bench.main(["--encodings", "none,ropey"])
    with pytest.raises(LowbitError, match="--lengths must be positive multiples"):
        bench.main(["--lengths", "0,2"])
    with pytest.raises(LowbitError, match="fewer than one evaluation segment of 129"):
        bench.segments(np.zeros(100, dtype=np.uint16), 128, 4)
