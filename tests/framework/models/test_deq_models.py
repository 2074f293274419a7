"""deq_vit and deq_gpt: shapes, the equilibrium they return, causality, every posenc, stats through the
tasks (W&B/CSV keys), the Jacobian regulariser in the loss, a breaking solver in training."""

import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from lowbit.errors import LowbitError
from lowbit.models.deq import DEQGPT, DEQViT
from lowbit.registry import registry
from lowbit.tasks.equilibrium import EquilibriumClassifier, EquilibriumLM

VIT = dict(image_size=8, patch_size=4, in_chans=1, num_classes=10, dim=32, n_heads=4)
GPT = dict(vocab_size=256, dim=32, n_heads=2, max_len=16)
POSENCS = registry.names("posenc")
TWO_D = [name for name in POSENCS if 2 in registry.load("posenc", name).pos_dims]
ONE_D = [name for name in POSENCS if 1 in registry.load("posenc", name).pos_dims]
OPTIMIZER = {"name": "adamw", "lr": 3e-3, "weight_decay": 0.0}
SCHEDULER = {"warmup_steps": 1, "min_lr_ratio": 1.0}


def _trainer(tmp_path, steps=3):
    return L.Trainer(
        max_steps=steps,
        logger=CSVLogger(tmp_path, name="csv", version=""),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        accelerator="cpu",
    )


def _rows(tmp_path):
    with open(tmp_path / "csv" / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r.get("train/loss")]


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_deq_vit_returns_logits_of_the_equilibrium(pool):
    torch.manual_seed(0)
    model = DEQViT(**VIT, pool=pool, posenc="rope", deq={"tol": 1e-6, "max_iter": 40}).eval()
    images = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        logits = model(images)
        z = model.equilibrium.last_z  # (B, T, D)
    assert logits.shape == (3, 10) and z.shape == (3, 4 + (pool == "cls"), 32)
    stats = model.deq_stats()
    assert stats["deq/converged"] == 1.0 and stats["deq/rel_res_max"] <= 1e-6
    torch.testing.assert_close(logits, model.head(z[:, 0] if pool == "cls" else z.mean(1)))


def test_deq_gpt_is_causal_with_fixed_point_iteration_and_backward_reaches_the_cell():
    torch.manual_seed(0)
    model = DEQGPT(**GPT, posenc="rope", deq={"solver": "fixed_point", "tol": 0.0, "max_iter": 6})
    idx = torch.randint(0, 256, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 256
    with torch.no_grad():
        a, b = model.eval()(idx), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=0)  # every iterate is causal
    assert not torch.allclose(a[:, 10:], b[:, 10:])
    model.train()
    logits = model(idx)
    assert logits.shape == (2, 16, 256)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten()).backward()
    cell = model.equilibrium.f
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cell.parameters())
    assert model.tok_emb.weight.grad.abs().sum() > 0 and model.lm_head.weight is model.tok_emb.weight


@pytest.mark.parametrize("posenc", TWO_D)
def test_deq_vit_takes_every_2d_posenc(posenc):
    torch.manual_seed(0)
    model = DEQViT(**VIT, pool="cls", posenc=posenc, deq={"max_iter": 4})
    model(torch.randn(2, 1, 8, 8)).square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("posenc", ONE_D)
def test_deq_gpt_takes_every_1d_posenc(posenc):
    torch.manual_seed(0)
    model = DEQGPT(**GPT, posenc=posenc, deq={"max_iter": 4})
    model(torch.randint(0, 256, (2, 16))).float().logsumexp(-1).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_stats_and_the_jacobian_regulariser_go_through_the_classifier_task(tmp_path):
    torch.manual_seed(0)
    model = DEQViT(**VIT, posenc="rope", deq={"jac_reg_weight": 0.5, "max_iter": 6})
    task = EquilibriumClassifier(model, OPTIMIZER, SCHEDULER, max_steps=3, num_classes=10)
    data = TensorDataset(torch.randn(16, 1, 8, 8), torch.arange(16) % 10)
    _trainer(tmp_path).fit(task, train_dataloaders=DataLoader(data, batch_size=8))
    rows = _rows(tmp_path)
    assert len(rows) == 3
    for row in rows:
        assert 1 <= float(row["deq/iters"]) <= 6 and float(row["deq/abs_res"]) >= 0 and float(row["deq/fallbacks"]) == 0
        assert float(row["deq/jac_loss"]) == pytest.approx(0.5 * float(row["deq/jac_fro2"]), rel=1e-5)
    # the regulariser is in the loss that is trained: its gradient reaches the cell
    model.train()(torch.randn(4, 1, 8, 8))
    model.equilibrium.f.zero_grad()
    model.deq_aux_loss().backward()
    assert model.equilibrium.f.block.attn.qkv.weight.grad.abs().sum() > 0


class _NaNAt(torch.nn.Module):
    def __init__(self, cell, at):
        super().__init__()
        self.cell, self.at, self.calls = cell, at, 0

    def forward(self, z, inputs):
        self.calls += 1
        out = self.cell(z, inputs)
        return out * float("nan") if self.calls == self.at else out


def test_lm_task_logs_a_solver_fallback_and_training_continues(tmp_path):
    torch.manual_seed(0)
    model = DEQGPT(**GPT, posenc="rope", deq={"solver": "broyden", "max_iter": 8, "tol": 1e-6})
    model.equilibrium.f = _NaNAt(model.equilibrium.f, at=3)
    task = EquilibriumLM(model, OPTIMIZER, SCHEDULER, max_steps=3)
    idx = torch.randint(0, 256, (8, 17))
    _trainer(tmp_path).fit(task, train_dataloaders=DataLoader(TensorDataset(idx[:, :-1], idx[:, 1:]), batch_size=4))
    rows = _rows(tmp_path)
    assert len(rows) == 3 and float(rows[0]["deq/fallbacks"]) == 1.0 and float(rows[2]["deq/fallbacks_total"]) == 1.0
    assert all(torch.isfinite(torch.tensor(float(r["train/loss"]))) for r in rows)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bad_options_are_clear_errors():
    with pytest.raises(LowbitError, match="unknown DEQ solver 'newton'; valid: anderson, broyden, fixed_point"):
        DEQViT(**VIT, deq={"solver": "newton"})
    with pytest.raises(LowbitError, match="DEQ max_iter must be a positive integer, got 0"):
        DEQGPT(**GPT, deq={"max_iter": 0})
    with pytest.raises(LowbitError, match="positional encoding T5Bias takes 1-D \\(text\\) positions only; a DEQ ViT"):
        DEQViT(**VIT, posenc="t5")
    with pytest.raises(LowbitError, match="unknown layers 'dee'; installed: deq"):
        DEQViT(**VIT, deq={"name": "dee"})


def test_implicit_gradient_memory_does_not_grow_with_solver_iterations():
    torch.manual_seed(0)
    images, sizes = torch.randn(4, 1, 8, 8), {}
    for iters in (4, 20):
        model = DEQViT(**VIT, posenc="rope", deq={"grad": "implicit", "tol": 0.0, "max_iter": iters}).train()
        total = 0

        def pack(tensor):
            nonlocal total
            total += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(images)
        sizes[iters] = total
        assert model.deq_stats()["deq/iters"] == iters
    assert sizes[4] == sizes[20] > 0
