"""``lowbit bench fpdm`` at a tiny size: both models train, the table has every sampler, budgets are spent
exactly as measured, FPDM is smaller and needs less training memory, and the memory count is what autograd saves."""

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
    assert (out / "fpdm.md").read_text() in printed and (out / "fpdm.png").stat().st_size > 0
    results = json.loads((out / "fpdm.json").read_text())
    dit, fpdm = results["models"]["dit"], results["models"]["fpdm"]
    assert fpdm["params"] < dit["params"] and 0 < fpdm["memory_bytes"] < dit["memory_bytes"]
    for budget in ("6", "12"):
        assert dit["fid"][budget]["DiT"]["evals"] == int(budget)  # 6 blocks per DDIM step
        for name, r in fpdm["fid"][budget].items():
            assert r["evals"] == int(budget), name  # tol 0: the fixed-point budget is spent exactly
            assert r["fid"] > 0
    assert set(fpdm["fid"]["6"]) == {name for name in (v.name for v in bench.VARIANTS) if name != "DiT"}
    rows = [line for line in printed.splitlines() if line.startswith(("| FPDM", "| DiT"))]
    assert len(rows) == len(bench.VARIANTS)  # one FID row per sampler
    assert printed.count("| dit |") == printed.count("| fpdm |") == 1  # and one row per model
    assert "training memory MiB (saved for backward, one forward)" in printed


def test_training_memory_is_what_autograd_saves(monkeypatch):
    from lowbit.models.dit import DiT
    from lowbit.tasks.diffusion import Diffusion

    torch.manual_seed(0)
    model = DiT(image_size=8, patch_size=2, dim=32, n_layers=2, n_heads=2, posenc="rope")
    task = Diffusion(model, {"name": "adamw"}, {"warmup_steps": 1}, 1, image_size=8, in_chans=1, num_classes=10)
    batch = (torch.randn(4, 1, 8, 8), torch.arange(4))
    one = bench.training_memory(task, batch)
    model.blocks.append(model.blocks[0])  # the same block once more: its activations are saved again
    two = bench.training_memory(task, batch)
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
    assert bench.training_memory(task, batch) - two == per_block


def test_budget_below_one_dit_step_is_an_error():
    from lowbit.errors import LowbitError

    with pytest.raises(LowbitError, match=r"--budgets must be at least one DiT step \(6 blocks\), got 4"):
        bench.main(["--budgets", "4,12"])
