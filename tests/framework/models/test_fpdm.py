"""FPDM: shapes, the fixed-point cell, S-JFB training, warm starts and iteration budgets in sampling
(measured), constant training memory in the no-grad iterations, fallbacks and bad input."""

import pytest
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.models.fpdm import FPDM
from lowbit.plugins.layers.deq import DEQ
from lowbit.registry import registry
from lowbit.tasks.diffusion import Diffusion

SMALL = dict(image_size=8, patch_size=2, in_chans=1, num_classes=10, dim=32, n_heads=4)
TWO_D = [name for name in registry.names("posenc") if 2 in registry.load("posenc", name).pos_dims]
OPTIMIZER = {"name": "adamw", "lr": 1e-3, "weight_decay": 0.0}
SCHEDULER = {"warmup_steps": 1, "min_lr_ratio": 1.0}


def wake(model: nn.Module, std: float = 0.05, mix_gain: float = 0.5, seed: int = 0) -> nn.Module:
    """Small random adaLN modulations and output layer (zero at init), and a contractive mixing MLP."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "adaLN_modulation" in name or name.startswith("final."):
            p.data = std * torch.randn(p.shape, generator=gen)
        if ".mix_" in name and name.endswith("weight"):
            p.data = mix_gain * p.data / torch.linalg.matrix_norm(p.data, ord=2)
    return model


def batch(b: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, 1, 8, 8, generator=gen), torch.randint(0, 1000, (b,), generator=gen), torch.arange(b) % 10


def test_forward_shapes_stats_and_the_cell_by_hand():
    torch.manual_seed(0)
    model = wake(FPDM(**SMALL, posenc="rope", deq={"solver": "anderson", "tol": 1e-6, "max_iter": 40})).eval()
    x, t, y = batch()
    with torch.no_grad():
        eps, z = model(x, t, y, return_z=True)
        assert eps.shape == x.shape and z.shape == (3, 16, 32)
        stats = model.deq_stats()
        assert {"deq/iters", "deq/abs_res", "deq/rel_res", "deq/fallbacks"} <= set(stats)
        assert stats["deq/converged"] == 1.0 and stats["deq/rel_res_max"] <= 1e-6
        # z is the fixed point of Block(W₂ gelu(W₁ [z ; W_inj h]), c), h = the pre blocks' output
        h, c, pos, mask = model.embed(x, t, y)
        for block in model.pre_blocks:
            h = block(h, c, pos, model.posenc, mask)
        cell = model.fixed_point_layer.f
        fz = cell.block(
            cell.mix_out(nn.functional.gelu(cell.mix_in(torch.cat([z, model.inject(h)], -1)), approximate="tanh")),
            c,
            pos,
            model.posenc,
            mask,
        )
        rel = ((fz - z).flatten(1).norm(dim=1) / fz.flatten(1).norm(dim=1)).max()
        assert rel <= 1e-6
    assert isinstance(model.fixed_point_layer, DEQ) and model.explicit_blocks == 2


def test_sjfb_training_iterations_and_gradients():
    torch.manual_seed(0)
    model = wake(FPDM(**SMALL, posenc="sinusoidal", deq={"nograd_iters_range": [2, 4], "grad_iters_range": [1, 2]}))
    model.train()
    x, t, y = batch()
    seen = set()
    for _ in range(12):
        model(x, t, y).square().mean().backward()
        stats = model.deq_stats()
        seen.add((int(stats["deq/iters"] - stats["deq/grad_iters"]), int(stats["deq/grad_iters"])))
    assert {n for n, _ in seen} <= {2, 3, 4} and {m for _, m in seen} == {1, 2}
    cell = model.fixed_point_layer.f
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cell.parameters())
    assert model.inject.weight.grad.abs().sum() > 0  # the injection is trained through the grad steps


def test_training_memory_does_not_grow_with_the_no_grad_iterations():
    torch.manual_seed(0)
    x, t, y = batch(4)
    sizes = {}
    for n in (1, 10):
        model = wake(
            FPDM(**SMALL, posenc="rope", deq={"nograd_iters_range": [n, n], "grad_iters_range": [2, 2], "tol": 0.0})
        )
        total = 0

        def pack(tensor):
            nonlocal total
            total += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model.train()(x, t, y)
        sizes[n] = total
        assert model.deq_stats()["deq/iters"] == n + 2
    assert sizes[1] == sizes[10] > 0


def _task(model: nn.Module, **options) -> Diffusion:
    options = {"image_size": 8, "in_chans": 1, "num_classes": 10, "timesteps": 100, "clip_x0": False, **options}
    return Diffusion(model, OPTIMIZER, SCHEDULER, max_steps=1, **options)


def test_warm_start_needs_fewer_solver_iterations_on_consecutive_timesteps():
    torch.manual_seed(0)
    # a slowly contracting cell (mixing gain 1.8), as a trained one is: cold solves take tens of iterations
    deq = {"solver": "fixed_point", "tol": 1e-5, "max_iter": 300}
    model = wake(FPDM(**SMALL, posenc="rope", deq=deq), mix_gain=1.8)
    task = _task(model, sample_steps=10, guidance_scale=1.0)
    labels = torch.arange(3)
    cold_images, cold = task.sample(labels, warm_start=False, use_ema=False)
    warm_images, warm = task.sample(labels, warm_start=True, use_ema=False)
    assert cold.steps == warm.steps == 10 and len(warm.fp_iters) == 10 and warm.fallbacks == cold.fallbacks == 0
    assert warm.fp_iters[0] == cold.fp_iters[0]  # the first timestep has nothing to start from
    assert sum(warm.fp_iters[1:]) <= 0.85 * sum(cold.fp_iters[1:]), (warm.fp_iters, cold.fp_iters)
    assert warm.fp_iters[-1] < cold.fp_iters[-1]
    assert warm.block_evals == 10 * 2 + sum(warm.fp_iters)  # pre + post blocks each step, plus the solver's evaluations
    torch.testing.assert_close(warm_images, cold_images, rtol=0, atol=1e-2)  # both solved to tolerance


@pytest.mark.parametrize("schedule", ["constant", "increasing", "decreasing"])
def test_iteration_budget_is_spent_as_reallocated(schedule):
    torch.manual_seed(0)
    model = wake(FPDM(**SMALL, posenc="rope", deq={"solver": "fixed_point", "tol": 0.0, "max_iter": 50}))
    task = _task(model, sample_steps=8, guidance_scale=1.0)
    _, stats = task.sample(torch.arange(2), fp_budget=40, fp_schedule=schedule, use_ema=False)
    assert sum(stats.fp_caps) == 40 and stats.fp_iters == stats.fp_caps  # tol 0: every allowed iteration runs
    assert stats.block_evals == 8 * 2 + 40
    if schedule == "increasing":  # more iterations at larger t, i.e. the first sampling steps
        assert stats.fp_iters[0] > stats.fp_iters[-1]
    elif schedule == "decreasing":
        assert stats.fp_iters[0] < stats.fp_iters[-1]
    else:
        assert stats.fp_iters == [5] * 8
    assert model.fixed_point_layer.max_iter == 50  # the per-call cap is restored


def _cell_input(model: FPDM, x, t, y):
    """(h, the cell's inputs) of one forward: the pre blocks' output and (W_inj h, c, pos, posenc, mask)."""
    h, c, pos, mask = model.embed(x, t, y)
    for block in model.pre_blocks:
        h = block(h, c, pos, model.posenc, mask)
    return h, (model.inject(h), c, pos, model.posenc, mask)


@pytest.mark.parametrize("solver", ["fixed_point", "anderson"])
def test_k_solver_evaluations_give_f_applied_k_times(solver):
    """The paper's z_k = f^k(z_0) at inference, as S-JFB trains it: every evaluation counts. The solver's
    lowest-residual iterate is the input of its last evaluation, so returning it wasted one: a budget of
    1 returned z_0 itself, and with warm starts every timestep reused the first one's state (the
    "2× steps" row of bench fpdm, one iteration per step, FID ~600)."""
    torch.manual_seed(0)
    model = wake(FPDM(**SMALL, posenc="rope", deq={"solver": solver, "tol": 0.0, "max_iter": 50})).eval()
    x, t, y = batch()
    with torch.no_grad():
        h, inputs = _cell_input(model, x, t, y)
        cell = model.fixed_point_layer.f
        z0 = torch.randn(h.shape, generator=torch.Generator().manual_seed(1))
        _, z1 = model(x, t, y, z0=z0, iters=1, return_z=True)
        assert model.deq_stats()["deq/iters"] == 1
        torch.testing.assert_close(z1, cell(z0, inputs), rtol=0, atol=0)
        _, cold = model(x, t, y, iters=1, return_z=True)  # no z0: the solve starts at h
        torch.testing.assert_close(cold, cell(h, inputs), rtol=0, atol=0)
        if solver == "fixed_point":
            _, z3 = model(x, t, y, z0=z0, iters=3, return_z=True)
            torch.testing.assert_close(z3, cell(cell(cell(z0, inputs), inputs), inputs), rtol=0, atol=0)


def test_one_iteration_per_step_with_warm_starts_moves_the_state_every_step():
    torch.manual_seed(0)
    model = wake(FPDM(**SMALL, posenc="rope", deq={"solver": "fixed_point", "tol": 0.0, "max_iter": 50}))
    task = _task(model, sample_steps=6, guidance_scale=1.0)
    states = []
    layer = model.fixed_point_layer
    handle = layer.register_forward_hook(lambda module, args, out: states.append(out.clone()))
    try:
        _, stats = task.sample(torch.arange(2), fp_budget=6, warm_start=True, use_ema=False)
    finally:
        handle.remove()
    assert stats.fp_iters == [1] * 6 and len(states) == 6
    assert all(not torch.equal(a, b) for a, b in zip(states, states[1:]))


class _NaNOnce(nn.Module):
    """Wraps the cell: its ``at``-th call returns NaN (a solver step blowing up)."""

    def __init__(self, cell: nn.Module, at: int) -> None:
        super().__init__()
        self.cell, self.at, self.calls = cell, at, 0

    def forward(self, z, inputs):
        self.calls += 1
        out = self.cell(z, inputs)
        return out * float("nan") if self.calls == self.at else out


def test_a_breaking_solver_falls_back_and_training_continues(tmp_path):
    import csv

    import lightning as L
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = wake(
        FPDM(
            **SMALL, posenc="rope", deq={"solver": "anderson", "nograd_iters_range": [4, 4], "grad_iters_range": [1, 1]}
        )
    )
    model.fixed_point_layer.f = _NaNOnce(model.fixed_point_layer.f, at=2)  # in the first step's no-grad solve
    task = _task(model, samples_per_class=0, fid_samples=0)
    x, _, y = batch(16)
    trainer = L.Trainer(
        max_steps=3,
        logger=CSVLogger(tmp_path, name="csv", version=""),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        accelerator="cpu",
    )
    trainer.fit(task, train_dataloaders=DataLoader(TensorDataset(x, y), batch_size=8))
    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(rows) == 3 and all(torch.isfinite(torch.tensor(float(r["train/loss"]))) for r in rows)
    assert float(rows[0]["deq/fallbacks"]) == 1.0 and float(rows[-1]["deq/fallbacks_total"]) == 1.0
    assert float(rows[1]["deq/fallbacks"]) == 0.0 and {"deq/iters", "deq/abs_res"} <= set(rows[0])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bad_input_is_a_clear_error_or_visible_in_the_stats():
    with pytest.raises(LowbitError, match="unknown DEQ solver 'newton'; valid: anderson, broyden, fixed_point"):
        FPDM(**SMALL, deq={"solver": "newton"})
    with pytest.raises(LowbitError, match="DEQ max_iter must be a positive integer, got 0"):
        FPDM(**SMALL, deq={"max_iter": 0})
    with pytest.raises(LowbitError, match="layers 'deq' has no option 'solvr'"):
        FPDM(**SMALL, deq={"solvr": "anderson"})
    with pytest.raises(LowbitError, match="model.n_pre must be an integer >= 0, got -1"):
        FPDM(**SMALL, n_pre=-1)
    model = wake(FPDM(**SMALL, posenc="rope")).eval()
    x, t, y = batch()
    with pytest.raises(LowbitError, match="FPDM iters .* must be a positive integer, got 0"):
        model(x, t, y, iters=0)
    with pytest.raises(LowbitError, match=r"FPDM z0 must be shaped like the tokens \(3, 16, 32\), got \(3, 16, 8\)"):
        model(x, t, y, z0=torch.zeros(3, 16, 8))
    # an expansive cell (mixing MLP with gain 20) has no reachable fixed point: never silently "solved"
    diverging = wake(
        FPDM(**SMALL, posenc="rope", deq={"solver": "fixed_point", "max_iter": 30}), std=0.5, mix_gain=20.0
    ).eval()
    with torch.no_grad():
        eps = diverging(x, t, y)
    stats = diverging.deq_stats()
    assert stats["deq/converged"] == 0.0 and stats["deq/rel_res_max"] > 1e-3 and torch.isfinite(eps).all()


def test_jacobian_regulariser_trains_through_the_attention():
    torch.manual_seed(0)
    model = wake(FPDM(**SMALL, posenc="rope", deq={"jac_reg_weight": 1.0, "grad_iters_range": [1, 1]})).train()
    x, t, y = batch()
    loss = model(x, t, y).square().mean() + model.deq_aux_loss()
    loss.backward()  # a double backward through SDPA: the math kernel is used for it
    assert model.deq_stats()["deq/jac_fro2"] > 0
    assert model.fixed_point_layer.f.block.attn.qkv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("posenc", TWO_D)
def test_every_2d_posenc_reaches_the_fixed_point_cell(posenc):
    torch.manual_seed(0)
    model = wake(FPDM(**SMALL, posenc=posenc, deq={"nograd_iters_range": [1, 1], "grad_iters_range": [1, 1]}))
    x, t, y = batch()
    model.train()(x, t, y).square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.fixed_point_layer.f.block.attn.qkv.weight.grad.abs().sum() > 0
