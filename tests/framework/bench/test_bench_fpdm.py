"""``lowbit bench fpdm`` at a tiny size: the three models train, the tables have every sampler and shape, budgets
are spent exactly as measured, FPDM is smaller and needs less training memory, and the memory counts are what
autograd saves and what a step holds at its peak."""

import json

import pytest
import torch

from lowbit.bench import fpdm as bench
from lowbit.metrics import fid as fid_module
from lowbit.nn.posenc import positions_2d

TINY = ["--steps", "3", "--dim", "32", "--dit-layers", "6", "--budgets", "6,12", "--fid-samples", "12", "debug=smoke"]


def test_bench_trains_both_and_reports_fid_per_budget(tmp_path, capsys, monkeypatch):
    def fast_feature_net(datamodule, cache_dir=None, echo=None):  # the real one trains once per machine (seconds)
        torch.manual_seed(0)
        return fid_module.FeatureNet(1, 10).eval().requires_grad_(False)

    monkeypatch.setattr(fid_module, "feature_net", fast_feature_net)
    out = tmp_path / "bench"
    assert bench.main([*TINY, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (out / "fpdm.md").read_text() in printed
    assert (out / "fpdm.png").stat().st_size > 0 and (out / "fpdm_samples.png").stat().st_size > 0
    results = json.loads((out / "fpdm.json").read_text())
    dit, fpdm, lowp = (results["models"][name] for name in ("dit", "fpdm", "fpdm_lowp"))
    assert fpdm["params"] < dit["params"] and 0 < fpdm["memory_bytes"] < dit["memory_bytes"]
    assert all(model["train_seconds"] > 0 for model in (dit, fpdm, lowp))  # trained by this invocation
    for budget in ("6", "12"):
        assert dit["fid"][budget]["DiT"]["evals"] == int(budget)  # 6 blocks per DDIM step
        for name, r in [*fpdm["fid"][budget].items(), *lowp["fid"][budget].items()]:
            assert r["evals"] == int(budget), name  # tol 0: the fixed-point budget is spent exactly
            assert r["evals"] == r["steps"] * 2 + sum(r["iters"]) and r["fid"] > 0
    assert fpdm["fid"]["12"]["FPDM, 2× steps, constant"]["iters"] == [1, 1, 1, 1]
    assert set(fpdm["fid"]["6"]) == {v.name for v in bench.VARIANTS if v.model == "fpdm"}
    assert set(lowp["fid"]["6"]) == {"FPDM under low precision, constant"}
    for model in (fpdm, lowp):
        assert 1 <= model["convergence"]["iters_mean"] <= bench.CONVERGENCE["max_iter"]
    # memory by shape: DiT at 6, 12 and 28 blocks (more blocks, more memory), FPDM at m = 1 and 2 (smoke's range)
    shapes = [(r["model"], r["shape"]) for r in results["memory"]]
    assert shapes[:3] == [("dit", "6 blocks"), ("dit", "12 blocks"), ("dit", "28 blocks")]
    assert [r["peak"] for r in results["memory"][:3]] == sorted(r["peak"] for r in results["memory"][:3])
    fpdm_rows = [r for r in results["memory"] if r["model"] == "fpdm"]
    assert len(fpdm_rows) == 2 and fpdm_rows[0]["peak"] < fpdm_rows[1]["peak"]
    # the models' figure is the worst case (to a first call's caches: the rope tables, built once per model)
    assert fpdm_rows[-1]["peak"] == pytest.approx(fpdm["memory_bytes"], rel=0.01)
    rows = [line for line in printed.splitlines() if line.startswith(("| FPDM", "| DiT"))]
    assert len(rows) == len(bench.VARIANTS)  # one FID row per sampler
    assert "| FPDM under nvfp4, constant |" in printed and "| fpdm nvfp4 | 1 + 1 weight-tied (m = 2" in printed
    assert "training step MiB (peak, MemTracker)" in printed and "÷ DiT 28 blocks" in printed


def test_training_memory_is_what_autograd_saves(monkeypatch):
    from lowbit.models.dit import DiT
    from lowbit.tasks.diffusion import Diffusion

    torch.manual_seed(0)
    model = DiT(image_size=8, patch_size=2, dim=32, n_layers=2, n_heads=2, posenc="rope")
    task = Diffusion(model, {"name": "adamw"}, {"warmup_steps": 1}, 1, image_size=8, in_chans=1, num_classes=10)
    batch = (torch.randn(4, 1, 8, 8), torch.arange(4))
    one = bench.training_memory(task, batch)["saved"]
    model.blocks.append(model.blocks[0])  # the same block once more: its activations are saved again
    two = bench.training_memory(task, batch)["saved"]
    per_block = two - one
    assert one > 2 * per_block > 0
    # and it is what one block saves run on its own, on tokens (4 images, (8/2)² patches, width 32) and conditioning
    # that need gradients as the model's do (rope: no attention mask)
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    tokens, c = torch.randn(4, 16, 32, requires_grad=True), torch.randn(4, 32, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.blocks[0](tokens, c, positions_2d(4, 4), model.posenc, None)
    assert per_block == sum(saved)
    model.blocks.append(model.blocks[0])
    assert bench.training_memory(task, batch)["saved"] - two == per_block


def test_training_step_peak_counts_activations_but_not_weights():
    from lowbit.models.dit import DiT
    from lowbit.tasks.diffusion import Diffusion

    torch.manual_seed(0)
    model = DiT(image_size=8, patch_size=2, dim=32, n_layers=2, n_heads=2, posenc="rope")
    task = Diffusion(model, {"name": "adamw"}, {"warmup_steps": 1}, 1, image_size=8, in_chans=1, num_classes=10)
    small, large = (bench.training_memory(task, (torch.randn(b, 1, 8, 8), torch.arange(b) % 10)) for b in (4, 64))
    assert small["peak"] > 0 and small["saved"] > 0
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    # 16× the batch: the activations grow 16×, the weights (not counted) would not; gradients are in both
    assert 12 * (small["peak"] - weights) < large["peak"] - weights
    assert all(p.grad is None for p in model.parameters())  # the measurement leaves no gradients behind


def test_budget_below_one_dit_step_and_an_unknown_precision_are_errors():
    from lowbit.errors import LowbitError

    with pytest.raises(LowbitError, match=r"--budgets must be at least one DiT step \(6 blocks\), got 4"):
        bench.main(["--budgets", "4,12"])
    with pytest.raises(LowbitError, match=r"--low-precision 'fp3' is not a precision plugin; valid: none, .*nvfp4"):
        bench.main(["--low-precision", "fp3"])
