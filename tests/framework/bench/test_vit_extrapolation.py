"""``lowbit bench vit-extrapolation``: a row per encoding, accuracies, reused trainings, the learned table resampled."""

import json

import pytest
import torch

from lowbit.bench import vit_extrapolation as bench
from lowbit.cli import _benches
from lowbit.errors import LowbitError
from lowbit.nn.posenc import positions_2d
from lowbit.plugins.posenc.learned import resample_table_2d
from lowbit.registry import PluginInfo, registry

# 16 px training images (4×4 patches of 4), evaluated at 16 and 32 px; a ViT 1×32, 3 steps, 40 val pictures
TINY = ["--image-size", "16", "--steps", "3", "--scales", "1,2", "model.dim=32", "model.n_layers=1"]
TINY += ["data.n_train=128", "data.n_val=40", "scheduler.warmup_steps=1"]


@pytest.fixture(autouse=True)
def shapes_data(monkeypatch):
    """The shapes data plugin, registered in-process where its entry point is not installed yet."""
    infos = registry.infos("data")
    if "shapes" not in infos:
        monkeypatch.setitem(infos, "shapes", PluginInfo("data", "shapes", "lowbit.data.shapes:Shapes", "lowbit", "dev"))


def _rows(text: str) -> dict[str, list[str]]:
    """encoding -> its cells after the name, from the first markdown table in ``text``."""
    lines = text[text.index("| encoding") :].split("\n\n")[0].splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| `")]
    return {c[0].strip("`"): c[1:] for c in cells}


def test_bench_table_accuracies_reuse_and_the_resampled_learned_table(tmp_path, capsys):
    out = tmp_path / "bench"
    assert bench.main(["--encodings", "learned,rope", *TINY, "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert (out / "vit_extrapolation.md").read_text() in printed.out
    assert (out / "vit_extrapolation.png").stat().st_size > 0
    results = json.loads((out / "vit_extrapolation.json").read_text())
    assert results["sizes"] == [16, 32] and results["seeds"] == [1337]
    rows, split_rows = _rows(printed.out), _rows(printed.out[printed.out.index("Shape kind") :])
    assert list(rows) == list(split_rows) == ["learned", "rope"]
    for name, cells in rows.items():
        assert len(cells) == 1 + 2  # the description, then one accuracy per evaluation side
        (run,) = results["encodings"][name]["runs"]
        for size, cell in zip(results["sizes"], cells[1:]):
            acc = run["accuracy"][str(size)]
            assert 0 <= acc <= 1 and acc * 40 == pytest.approx(round(acc * 40))  # a count out of 40 pictures
            assert float(cell) == pytest.approx(acc, abs=5e-4)  # the table prints the same number
            assert 2.0 < run["loss"][str(size)] < 2.6  # 3 steps leave the loss near chance, ln 10 = 2.303
            kind, side = run["kind"][str(size)], run["side"][str(size)]
            assert kind >= acc and side >= acc  # a right label has the right kind and the right side
            assert split_rows[name][results["sizes"].index(size)] == f"{kind:.3f} / {side:.3f}"
        # the bench's own evaluation at 1× (checkpoint → model → val pictures) reproduces the run's val/acc
        assert run["loss"]["16"] == pytest.approx(run["run_val_loss"], rel=1e-5)
        assert run["accuracy"]["16"] == pytest.approx(run["run_val_acc"], abs=1e-6)  # logged as float32
        assert run["run_dir"] == str(out / name / "seed1337")

    # a second run with the same settings trains nothing: both runs are read back, checkpoints untouched
    ckpt = out / "learned" / "seed1337" / "checkpoints" / "last.ckpt"
    written = ckpt.stat().st_mtime_ns
    assert bench.main(["--encodings", "learned,rope", *TINY, "--out", str(out)]) == 0
    log = capsys.readouterr().err
    assert log.count("already trained in") == 2 and " train " not in log
    assert ckpt.stat().st_mtime_ns == written
    assert json.loads((out / "vit_extrapolation.json").read_text())["encodings"] == results["encodings"]

    # at 2× the learned model's 4×4 table is resampled to 8×8 (timm's resample_abs_pos_embed); at 1× it is the table
    task, _, data = bench.load_task(out / "learned" / "seed1337")
    posenc = task.model.posenc
    table = posenc.table.detach()  # (4, 4, 32)
    assert torch.equal(posenc.table_for(positions_2d(4, 4)), table.reshape(16, 32))
    seen, embed = [], posenc.embed

    def recorded(x, pos):  # what the ViT hands its encoding, and what comes back
        seen.append((x, pos, embed(x, pos)))
        return seen[-1][2]

    posenc.embed = recorded
    images, _ = data.val_at(32).as_tensors()
    with torch.inference_mode():
        assert task.model(images[:2]).shape == (2, 10)
    ((x, pos, y),) = seen
    assert torch.equal(pos, positions_2d(8, 8))  # 64 patches at 2×
    assert torch.equal(y, x + resample_table_2d(table, (8, 8)).reshape(1, 64, 32))


def test_yarn_evaluation_options_and_notes():
    yarn = bench.ENCODINGS["rope_yarn"]
    assert yarn.train == "rope" and bench.ENCODINGS["rope"].eval_options(8, 16) == {}
    assert yarn.eval_options(8, 16) == {"scaling": "yarn", "scale": 2.0, "original_max_len": 8}
    assert yarn.eval_options(8, 8)["scale"] == 1.0  # YaRN with s = 1 is plain RoPE
    assert bench.eval_sizes(32, 4, [1, 1.5, 2, 3]) == [32, 48, 64, 96]


def test_scores_read_kind_and_side_off_the_label():
    labels = torch.tensor([0, 3, 6, 9])  # (kind, side): (0, above), (1, below), (3, above), (4, below)
    logits = torch.nn.functional.one_hot(torch.tensor([0, 2, 0, 2]), 10).double() * 50  # right, kind, side, neither
    got = bench.scores(logits, labels)
    assert (got["accuracy"], got["kind"], got["side"]) == (0.25, 0.5, 0.5)
    assert got["loss"] == pytest.approx(3 * 50 / 4, rel=1e-12)  # three wrong by a margin of 50 nats each


def test_bad_arguments_are_clear_errors(monkeypatch):
    with pytest.raises(LowbitError, match="unknown vit-extrapolation encoding 'ropey'; valid: none, learned"):
        bench.main(["--encodings", "none,ropey"])
    with pytest.raises(LowbitError, match="--scales 1.3 gives 41.6 pixels from the training side 32"):
        bench.main(["--scales", "1,1.3", "--encodings", "none"])
    with pytest.raises(LowbitError, match="--steps, --image-size and --threads must be >= 1"):
        bench.main(["--steps", "0", "--encodings", "none"])
    with pytest.raises(LowbitError, match="it needs data=shapes, got data=digits"):
        bench.main(["--encodings", "none", "data=digits"])
    monkeypatch.delitem(registry.infos("posenc"), "fourier")
    with pytest.raises(LowbitError, match="needs posenc plugin 'fourier', which is not installed"):
        bench.main(["--encodings", "none,fourier"])


def test_cli_names_benches_with_hyphens_and_takes_module_names_too(tmp_path, capsys):
    from lowbit.cli import main

    benches = _benches()
    assert benches["vit-extrapolation"] == "lowbit.bench.vit_extrapolation"
    assert benches["extrapolation"] == "lowbit.bench.extrapolation"
    for name in ("vit-extrapolation", "vit_extrapolation"):
        assert main(["bench", name, "--encodings", "ropey"]) == 2
        assert "unknown vit-extrapolation encoding 'ropey'" in capsys.readouterr().err
    assert main(["bench", "--help"]) == 0
    assert any(line.split()[:1] == ["vit-extrapolation"] for line in capsys.readouterr().out.splitlines())
