"""The int4 precision plugin (Xi et al. 2023, "Training Transformers with 4-bit Integers"): the
Hadamard quantizer's forward against its definition computed independently, bit splitting, leverage
score sampling (unbiased, Σp = N, p <= 1), dgrad, wgrad, the clip masks and LSQ's step-size gradients
against explicit formulas, a smoke training run of each recipe, and one-line errors."""

import copy
import csv
import math

import numpy as np
import pytest
import torch
from torch import nn

from lowbit.cli import train_main
from lowbit.config import compose
from lowbit.errors import LowbitError
from lowbit.plugins.precision.int4 import (
    Int4Linear,
    Int4Precision,
    bit_split,
    block_hadamard,
    int4_layers,
    lsq_codes,
    lss_probabilities,
    lss_row_weights,
)
from lowbit.run import build, train

N, C, D, BLOCK = 8, 16, 64, 32  # tokens, out_features, in_features, Hadamard block


def _sylvester(n: int) -> np.ndarray:
    """H_n by the Sylvester recursion H_2k = [[H_k, H_k], [H_k, -H_k]] / √2, in float64 (paper §3.3)."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]]) / math.sqrt(2)
    return h


def _block_diag(width: int, block: int) -> np.ndarray:
    return np.kron(np.eye(width // block), _sylvester(block))


def _layer(lss: bool = True, bias: bool = True, seed: int = 0) -> Int4Linear:
    torch.manual_seed(seed)
    return Int4Linear.from_linear(nn.Linear(D, C, bias=bias), hadamard_block=BLOCK, lss=lss)


def _inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """x (2, 4, D) with a few outlier features, and an output gradient G (N, C) (the loss (y · G).sum())."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, D, generator=gen)
    x[..., 5] *= 8  # an outlier channel: what the Hadamard transform spreads over its block
    grad = torch.randn(N, C, generator=gen) * torch.linspace(0.1, 2.0, N)[:, None]  # rows of different norms
    return x, grad


def _backward(layer: Int4Linear, x: torch.Tensor, grad: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """One forward and backward with the layer's draws from a generator seeded with ``seed``; the grads."""
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    layer.sr_generator = torch.Generator().manual_seed(seed)
    y = layer(x)
    (y.reshape(N, C) * grad).sum().backward()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    return {"x": x.grad.reshape(N, D), **grads}


def _split_expectation(grad: torch.Tensor) -> torch.Tensor:
    """E[s↑U + s↓L] over the lower part's stochastic rounding: s↑U + s↓ clamp(r, -6, 6) with r the
    residual (G - s↑U) / s↓ (SR is unbiased inside [-6, 6]; beyond it both neighbours clamp to ±6)."""
    m = grad.abs().max()
    s_down, s_up = m / 98, 14 * (m / 98)
    upper = torch.clamp(torch.round(grad / s_up), -6, 6)
    return s_up * upper + s_down * torch.clamp((grad - s_up * upper) / s_down, -6, 6)


# ---- the Hadamard quantizer (forward) -----------------------------------------------------------


def test_h_is_the_orthonormal_block_diagonal_sylvester_matrix():
    h = block_hadamard(torch.eye(D), BLOCK).double().numpy()  # the rows of I times H: H itself
    expected = _block_diag(D, BLOCK)
    assert np.array_equal(h, expected.astype(np.float32).astype(np.float64))
    assert np.allclose(h @ h.T, np.eye(D), rtol=0, atol=1e-6)  # orthonormal (float32 entries ±1/√32)
    on_block = np.kron(np.eye(D // BLOCK), np.ones((BLOCK, BLOCK))).astype(bool)
    assert np.all(h[~on_block] == 0)  # block diagonal: nothing mixes features of different blocks
    assert np.allclose(np.abs(h[on_block]), 1 / math.sqrt(BLOCK), rtol=1e-7)
    x = torch.randn(5, D, generator=torch.Generator().manual_seed(0))
    back = block_hadamard(block_hadamard(x, BLOCK), BLOCK, transpose=True)  # H Hᵀ = I
    torch.testing.assert_close(back, x, rtol=0, atol=2e-6)


def test_forward_equals_an_independent_computation_of_its_definition():
    layer, (x, _) = _layer(), _inputs()
    y = layer(x)  # the first training forward also sets the steps
    # independently, in float64 numpy: explicit H, LSQ's initial steps, round to nearest, clamp to [-8, 7]
    h = _block_diag(D, BLOCK)
    xh, wh = x.reshape(N, D).double().numpy() @ h, layer.weight.detach().double().numpy() @ h
    s_x, s_w = 2 * np.abs(xh).mean() / math.sqrt(7), 2 * np.abs(wh).mean() / math.sqrt(7)
    codes_x, codes_w = np.clip(np.round(xh / s_x), -8, 7), np.clip(np.round(wh / s_w), -8, 7)
    expected = codes_x @ codes_w.T * s_x * s_w + layer.bias.detach().double().numpy()
    assert y.shape == (2, 4, C) and y.dtype == torch.float32
    np.testing.assert_allclose(y.detach().reshape(N, C).double().numpy(), expected, rtol=1e-5, atol=1e-6)
    assert float(layer.x_step.detach()) == pytest.approx(s_x, rel=1e-6)
    assert float(layer.w_step.detach()) == pytest.approx(s_w, rel=1e-6)
    assert layer.initialized.tolist() == [True, True]
    # the transform spreads the outlier channel over its block: XH stays inside the range where X would clip
    assert np.abs(xh).max() / s_x < 7.5 < float(x.abs().max()) / s_x


def test_fprop_is_the_product_of_the_int4_codes_times_both_steps_exactly():
    layer, (x, _) = _layer(), _inputs()
    with torch.no_grad():
        layer.x_step.fill_(0.05)  # small steps: many codes clamp at -8 and 7
        layer.w_step.fill_(-0.004)  # a negative step counts as its magnitude (the reference's |s|)
        layer.initialized.fill_(True)
    y = layer(x).reshape(N, C)
    s_x, s_w = torch.tensor([0.05]), torch.tensor([0.004])
    codes_x = lsq_codes(block_hadamard(x.reshape(N, D), BLOCK) / s_x)
    codes_w = lsq_codes(block_hadamard(layer.weight.detach(), BLOCK) / s_w)
    for codes in (codes_x, codes_w):
        assert torch.equal(codes, codes.round()) and codes.min() == -8 and codes.max() == 7
    expected = (codes_x @ codes_w.t()) * (s_x * s_w) + layer.bias.detach()
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_steps_are_set_at_the_first_training_forward_not_in_an_earlier_evaluation():
    layer, (x, _) = _layer(), _inputs()
    layer.eval()
    evaluated = layer(x)
    assert layer.initialized.tolist() == [False, False] and float(layer.x_step.detach()) == 1.0  # nothing kept
    layer.train()
    trained = layer(x)
    assert layer.initialized.tolist() == [True, True]
    torch.testing.assert_close(evaluated, trained, rtol=0, atol=0)  # the same initial steps, measured alike
    with torch.no_grad():
        layer.weight.mul_(3)
    layer(x)
    expected_w_step = 2 * block_hadamard(layer.weight.detach() / 3, BLOCK).abs().mean() / math.sqrt(7)
    assert float(layer.w_step.detach()) == pytest.approx(
        float(expected_w_step), rel=1e-6
    )  # learned from then on, not reset


def test_an_all_zero_weight_waits_for_data_and_its_step_still_gets_a_gradient():
    layer, (x, grad) = _layer(), _inputs()
    with torch.no_grad():
        layer.weight.zero_()  # adaLN-Zero's output layer
    y = layer(x)
    assert torch.equal(y, layer.bias.detach().expand(2, 4, C))  # zero codes: the exact product, 0
    assert layer.initialized.tolist() == [True, False]
    (y.reshape(N, C) * grad).sum().backward()
    assert torch.equal(layer.w_step.grad, torch.zeros(1))  # zero, not None: DDP reduces every parameter
    assert layer.weight.grad.abs().sum() > 0  # inside the range (v = 0): the straight-through gradient flows


# ---- bit splitting ------------------------------------------------------------------------------


def test_bit_split_reconstructs_the_gradient_within_the_lower_step_and_saturates_as_defined():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(64, 48, generator=gen) ** 3  # heavy tails: some entries beyond the split's range
    upper, lower, s_up, s_down = bit_split(g, torch.Generator().manual_seed(1))
    m = g.abs().max()
    assert float(s_down) == pytest.approx(float(m) / 98, rel=1e-7) and float(s_up) == pytest.approx(14 * float(s_down))
    assert upper.abs().max() == 6 and lower.abs().max() == 6  # both halves clamp to ±6
    assert torch.equal(upper, torch.clamp(torch.round(g / s_up), -6, 6))  # the upper part is rounded to nearest
    g_hat = s_up * upper + s_down * lower
    inside = g.abs() <= 91 * s_down  # below round(g / s↑) = 7 and a residual within [-7, 7]
    assert inside.float().mean() > 0.95
    assert (g_hat - g)[inside].abs().max() <= s_down * (1 + 1e-6)
    # beyond it both halves saturate: the reference's ±6 clamps cap |Ĝ| at 90 s↓ (~0.918 m)
    big = g.abs() > 91.5 * s_down
    assert big.any()
    torch.testing.assert_close(g_hat[big].abs(), (90 * s_down).expand(int(big.sum())), rtol=1e-6, atol=0)
    assert torch.equal(upper[big].abs(), torch.full((int(big.sum()),), 6.0))


def test_bit_split_is_exact_on_its_grid():
    s_down = 1 / 16  # m = 98 s↓ sets it; every value s↓ (14 up + low), |up|, |low| <= 6, is represented exactly
    up, low = torch.meshgrid(torch.arange(-6.0, 7), torch.arange(-6.0, 7), indexing="ij")
    grid = s_down * (14 * up + low).flatten()
    g = torch.cat([grid, torch.tensor([98 * s_down])])  # the max sets the scale (and saturates to 90 s↓)
    upper, lower, s_up, s_down_got = bit_split(g, torch.Generator().manual_seed(3))
    assert float(s_down_got) == s_down and float(s_up) == 14 * s_down
    assert torch.equal(upper[:-1], up.flatten()) and torch.equal(lower[:-1], low.flatten())
    assert torch.equal(s_up * upper + s_down * lower, torch.cat([grid, torch.tensor([90 * s_down])]))


def test_the_lower_part_is_stochastically_rounded_without_bias_and_reproducibly():
    g = torch.randn(32, 16, generator=torch.Generator().manual_seed(4))
    draws = 4000
    mean = sum(bit_split(g, torch.Generator().manual_seed(k))[1] for k in range(draws)) / draws
    m = g.abs().max()
    s_down, s_up = m / 98, 14 * (m / 98)
    residual = (g - s_up * torch.clamp(torch.round(g / s_up), -6, 6)) / s_down
    expected = torch.clamp(residual, -6, 6)
    # SR of r draws floor(r) + Bernoulli(frac r): variance <= 1/4, so the mean is within 0.5 / √draws per sigma
    assert (mean - expected).abs().max() <= 5 * 0.5 / math.sqrt(draws)
    assert not torch.equal(residual, residual.round())  # the test is not vacuous: real fractions
    first, again = (bit_split(g, torch.Generator().manual_seed(7))[1] for _ in range(2))
    assert torch.equal(first, again) and not torch.equal(first, bit_split(g, torch.Generator().manual_seed(8))[1])


# ---- leverage score sampling --------------------------------------------------------------------


def _a2_reference(scores: np.ndarray, budget: int) -> np.ndarray:
    """Paper App. A.2 as the reference code's Q/utils.py loop: clamp to 1, rescale the others to the budget."""
    p = scores * budget / scores.sum()
    while p.max() > 1:
        full = p >= 1
        p = np.where(full, 1.0, p * (budget - full.sum()) / p[~full].sum())
    return p


def test_lss_probabilities_sum_to_n_are_at_most_one_and_follow_the_scores():
    scores = torch.rand(32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    scores[:4] *= 40  # four rows that proportional sampling would keep with probability > 1
    p = lss_probabilities(scores, 16)
    assert float(p.sum()) == pytest.approx(16, abs=1e-9) and float(p.max()) <= 1 and float(p.min()) > 0
    assert torch.equal(p[:4], torch.ones(4, dtype=torch.float64))  # clamped and kept for sure
    ratio = p[4:] / scores[4:]  # the rest stay proportional to their scores
    torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio), rtol=1e-12, atol=0)
    np.testing.assert_allclose(p.numpy(), _a2_reference(scores.numpy(), 16), rtol=1e-12)
    # zero rows are never kept; with fewer nonzero rows than the budget, every one is kept
    sparse = torch.tensor([0.0, 3.0, 0.0, 1.0, 2.0], dtype=torch.float64)
    assert lss_probabilities(sparse, 4).tolist() == [0.0, 1.0, 0.0, 1.0, 1.0]
    assert lss_probabilities(torch.zeros(6), 3).tolist() == [0.0] * 6


def test_lss_is_unbiased_with_the_variance_it_should_have():
    gen = torch.Generator().manual_seed(6)
    a = torch.randn(2 * N, C, generator=gen) * torch.rand(2 * N, 1, generator=gen) ** 2  # the stacked split rows
    b = torch.randn(2 * N, D, generator=gen)  # the paired rows of [X̂; X̂]
    scores = a.norm(dim=1) * b.norm(dim=1)
    p = lss_probabilities(scores, N).float()
    assert float(p.sum()) == pytest.approx(N, rel=1e-6) and float(p.max()) <= 1 and float(p.min()) < 0.5
    draws = 1000
    estimates = torch.stack(
        [(lss_row_weights(scores, N, torch.Generator().manual_seed(k))[:, None] * a).t() @ b for k in range(draws)]
    )
    exact = a.t() @ b
    # Var = Σ_i (1 - p_i) / p_i a_i² b_i² per element (independent Bernoulli draws, weights 1/p)
    variance = ((1 - p) / p)[:, None, None] * a.t()[None].permute(2, 1, 0) ** 2 * b[:, None, :] ** 2
    sigma = (variance.sum(0) / draws).sqrt()
    assert ((estimates.mean(0) - exact).abs() <= 5 * sigma + 1e-5).all()
    assert estimates.var(0).mean() == pytest.approx(float((variance.sum(0)).mean()), rel=0.15)
    kept = torch.stack([lss_row_weights(scores, N, torch.Generator().manual_seed(k)) > 0 for k in range(draws)])
    assert float(kept.float().sum(1).mean()) == pytest.approx(N, rel=0.05)  # half of the 2N rows in expectation


# ---- the backward GEMMs -------------------------------------------------------------------------


def _explicit(layer: Int4Linear, x: torch.Tensor, grad: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """dgrad, wgrad, the step and bias gradients from their formulas (explicit H, masks and LSQ δ), with
    the layer's draws repeated from the same seed: the split first, then LSS's uniforms."""
    h = torch.from_numpy(_block_diag(D, BLOCK)).float()
    s_x, s_w = layer.x_step.detach().abs(), layer.w_step.detach().abs()
    v_x, v_w = x.reshape(N, D) @ h / s_x, layer.weight.detach() @ h / s_w
    codes_x, codes_w = v_x.round().clamp(-8, 7), v_w.round().clamp(-8, 7)
    mask_x, mask_w = ((v_x >= -8) & (v_x <= 7)).float(), ((v_w >= -8) & (v_w <= 7)).float()
    gen = torch.Generator().manual_seed(seed)
    upper, lower, s_up, s_down = bit_split(grad, gen)
    g_up, g_down = s_up * upper, s_down * lower
    dx_h = (g_up + g_down) @ (s_w * codes_w)  # (N, D): every row in dgrad
    x_deq = s_x * codes_x
    if layer.lss:
        scores = torch.cat([g_up.norm(dim=1), g_down.norm(dim=1)]) * x_deq.norm(dim=1).repeat(2)
        weights = lss_row_weights(scores, N, gen)
        g_sampled = g_up * weights[:N, None] + g_down * weights[N:, None]
    else:
        g_sampled = g_up + g_down
    dw_h = g_sampled.t() @ x_deq  # (C, D)

    def delta(v):  # LSQ: round(v) - v inside, the clamp bound outside
        return torch.where(v < -8, -8.0, torch.where(v > 7, 7.0, v.round() - v))

    return {
        "x": (mask_x * dx_h) @ h.t(),
        "weight": (mask_w * dw_h) @ h.t(),
        "bias": grad.sum(0),
        "x_step": ((delta(v_x) * dx_h).sum() / math.sqrt(7 * N * D)).reshape(1),
        "w_step": ((delta(v_w) * dw_h).sum() / math.sqrt(7 * C * D)).reshape(1),
        "mask_x": mask_x,
        "mask_w": mask_w,
    }


def _clipping_layer(lss: bool) -> tuple[Int4Linear, torch.Tensor, torch.Tensor]:
    """A layer whose steps clip some of both operands, and its inputs."""
    layer, (x, grad) = _layer(lss=lss), _inputs()
    layer(x)  # set the steps from data
    with torch.no_grad():
        layer.x_step.mul_(0.3)
        layer.w_step.mul_(0.3)
    return layer, x, grad


@pytest.mark.parametrize("lss", [True, False])
def test_dgrad_wgrad_masks_and_step_gradients_follow_their_formulas(lss):
    layer, x, grad = _clipping_layer(lss)
    got, want = _backward(layer, x, grad, seed=11), _explicit(layer, x, grad, seed=11)
    for mask in (want["mask_x"], want["mask_w"]):
        assert 0.01 < float((mask == 0).float().mean()) < 0.5  # the clip masks are not trivial here
    for name in ("x", "weight", "x_step", "w_step"):
        scale = float(want[name].abs().max())
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5 * scale, msg=name)
    assert torch.equal(got["bias"], want["bias"])  # the bias gradient is G's column sums, in FP32
    # in the Hadamard domain the gradients vanish exactly where XH / s_X or WH / s_W left [-8, 7]
    for name, mask in (("x", want["mask_x"]), ("weight", want["mask_w"])):
        in_h = block_hadamard(got[name], BLOCK)
        assert float(in_h[mask == 0].abs().max()) < 1e-6 * float(in_h.abs().max())


def test_without_lss_the_wgrad_is_deterministic_and_the_unsampled_one():
    layer, x, grad = _clipping_layer(lss=False)
    first, again = _backward(layer, x, grad, seed=3), _backward(layer, x, grad, seed=3)
    assert torch.equal(first["weight"], again["weight"])
    # the unsampled bit-split wgrad: every row of s↑U + s↓L, weight 1
    h = torch.from_numpy(_block_diag(D, BLOCK)).float()
    s_x, s_w = layer.x_step.detach(), layer.w_step.detach()
    v_w = layer.weight.detach() @ h / s_w
    upper, lower, s_up, s_down = bit_split(grad, torch.Generator().manual_seed(3))
    x_deq = s_x * (x.reshape(N, D) @ h / s_x).round().clamp(-8, 7)
    unsampled = (((v_w >= -8) & (v_w <= 7)) * ((s_up * upper + s_down * lower).t() @ x_deq)) @ h.t()
    torch.testing.assert_close(first["weight"], unsampled, rtol=1e-4, atol=1e-5 * float(unsampled.abs().max()))


def test_the_lss_wgrad_averaged_over_seeds_converges_to_the_unsampled_one():
    layer, x, grad = _clipping_layer(lss=True)
    draws = 1000
    samples = torch.stack([_backward(layer, x, grad, seed=k)["weight"] for k in range(draws)])
    # E over SR and LSS: the unsampled wgrad of the split's expectation (LSS is unbiased given any split)
    h = torch.from_numpy(_block_diag(D, BLOCK)).float()
    s_x, s_w = layer.x_step.detach(), layer.w_step.detach()
    v_w = layer.weight.detach() @ h / s_w
    x_deq = s_x * (x.reshape(N, D) @ h / s_x).round().clamp(-8, 7)
    expected = (((v_w >= -8) & (v_w <= 7)) * (_split_expectation(grad).t() @ x_deq)) @ h.t()
    sigma = samples.std(0) / math.sqrt(draws)
    assert float(samples.std(0).mean()) > 0.05 * float(expected.abs().mean())  # it does sample
    assert ((samples.mean(0) - expected).abs() <= 6 * sigma + 1e-5 * float(expected.abs().max())).all()


def test_draws_are_reproducible_from_the_seed_and_the_backward_count():
    x, grad = _inputs()
    runs = []
    for _ in range(2):
        layer = Int4Linear.from_linear(nn.Linear(D, C), hadamard_block=BLOCK, seed=5, index=2)
        torch.manual_seed(0)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(C, D) / 8)
        grads = []
        for _ in range(2):
            layer.zero_grad()
            (layer(x).reshape(N, C) * grad).sum().backward()
            grads.append(layer.weight.grad.clone())
        runs.append(grads)
        assert layer.draws == 2
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], runs[0][1])  # each backward draws anew


# ---- the plugin ---------------------------------------------------------------------------------


def test_the_gpt_converts_its_trunk_and_keeps_the_head():
    built = build(compose(["recipe=int4_llm", "debug=smoke"]).cfg)
    converted = set(int4_layers(built.task))
    assert converted == {
        f"model.trunk.blocks.{b}.{n}" for b in (0, 1) for n in ("attn.qkv", "attn.proj", "mlp.fc_in", "mlp.fc_out")
    }
    assert isinstance(built.task.model.lm_head, nn.Linear) and not isinstance(built.task.model.lm_head, Int4Linear)
    p = built.precision
    assert (p.hadamard_block, p.lss, p.seed) == (32, True, 1337)  # the recipe seeds the draws with the run's seed
    assert "int4 (HQ-32 + LSQ forward, bit split + LSS backward): 8 of 9 Linear layers quantized" in p.description
    vit = build(compose(["recipe=int4_vit", "debug=smoke", "precision.lss=false"]).cfg)
    kept = {n for n, m in vit.task.named_modules() if type(m) is nn.Linear}
    assert kept == {"model.head", "model.patch_embed.proj"} and len(int4_layers(vit.task)) == 8
    assert not vit.precision.lss and "bit split backward" in vit.precision.description


def test_state_dicts_round_trip_and_a_checkpoint_moves_between_precisions():
    x, _ = _inputs()
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, C))
    model = Int4Precision(mode="fp32", device_type="cpu").convert_module(copy.deepcopy(plain))
    out = model(x)
    state = model.state_dict()
    assert set(state) == {f"{i}.{k}" for i in (0, 2) for k in ("weight", "bias", "x_step", "w_step", "initialized")}
    fresh_precision = Int4Precision(mode="fp32", device_type="cpu")
    fresh = fresh_precision.convert_module(nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, C)))
    fresh.load_state_dict(state)
    fresh.eval()  # an evaluation uses the stored steps, as training does
    torch.testing.assert_close(fresh(x), out, rtol=0, atol=0)
    # the nn.Linear keys are the high-precision model's: its checkpoint loads, and back
    missing = fresh.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == sorted(f"{i}.{k}" for i in (0, 2) for k in ("x_step", "w_step", "initialized"))
    unexpected = plain.load_state_dict(state, strict=False).unexpected_keys
    assert sorted(unexpected) == sorted(missing)


def test_the_plugin_state_restores_each_layers_backward_count():
    x, _ = _inputs()
    precision = Int4Precision(mode="fp32", device_type="cpu")
    model = precision.convert_module(nn.Sequential(nn.Linear(D, 32), nn.ReLU(), nn.Linear(32, C)))
    for _ in range(3):
        model(x).sum().backward()
    state = precision.state_dict()
    assert state == {"hadamard_block": 32, "lss": True, "seed": 0, "draws": {"0": 3, "2": 3}}
    fresh = Int4Precision(mode="fp32", device_type="cpu")
    fresh.load_state_dict(state)  # before conversion, as Lightning restores a checkpoint
    other = fresh.convert_module(nn.Sequential(nn.Linear(D, 32), nn.ReLU(), nn.Linear(32, C)))
    assert [layer.draws for layer in int4_layers(other).values()] == [3, 3]


def _losses(path) -> list[float]:
    with open(path / "csv" / "metrics.csv") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


@pytest.mark.parametrize("recipe", ["int4_llm", "int4_vit"])
def test_a_smoke_run_trains(recipe, tmp_path):
    overrides = [f"recipe={recipe}", "debug=smoke", "trainer.max_steps=4", "logger=csv", f"hydra.run.dir={tmp_path}"]
    result = train(compose(overrides), echo=lambda *_: None)
    losses = _losses(tmp_path)
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.02  # it learns: the INT4 gradients point downhill
    assert math.isfinite(result.metrics["val/loss"]) and result.metrics["val/loss"] < losses[0]


def test_a_resumed_run_draws_as_the_uninterrupted_one(tmp_path):
    common = [
        "recipe=int4_llm",
        "debug=smoke",
        "posenc=none",
        "logger=csv",
        "trainer.max_steps=6",
        "checkpoint.every_n_steps=3",
        "+checkpoint.keep_all=true",
        "trainer.val_check_interval=100",
    ]
    quiet = lambda *_: None  # noqa: E731
    train(compose([*common, f"hydra.run.dir={tmp_path / 'full'}"]), echo=quiet)
    step3 = tmp_path / "full" / "checkpoints" / "step-3.ckpt"
    assert torch.load(step3, weights_only=False)["Int4Precision"]["draws"]["model.trunk.blocks.0.attn.qkv"] == 3
    train(compose([*common, f"hydra.run.dir={tmp_path / 'resumed'}", f"resume={step3}"]), echo=quiet)
    full, resumed = _losses(tmp_path / "full"), _losses(tmp_path / "resumed")
    assert len(full) == 6 and resumed == full[3:]  # the same SR and LSS draws at steps 3, 4, 5: the same numbers
    states = [
        torch.load(tmp_path / d / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
        for d in ("full", "resumed")
    ]
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key


# ---- errors -------------------------------------------------------------------------------------


def test_a_width_the_block_does_not_divide_is_one_line_naming_the_layer(capsys, tmp_path):
    code = train_main(["recipe=int4_llm", "debug=smoke", "model.dim=48", f"hydra.run.dir={tmp_path / 'run'}"])
    assert code == 2 and not (tmp_path / "run").exists()
    assert capsys.readouterr().err == (
        "error: precision 'int4': hadamard_block 32 does not divide in_features 48 of Linear layer "
        "'model.trunk.blocks.0.attn.qkv' (and 5 more layers); blocks dividing every converted layer: "
        "1, 2, 4, 8, 16 (or keep the layer in high precision: precision.keep)\n"
    )
    # checked before anything changes: no layer of the model was converted
    model = nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 8))
    with pytest.raises(LowbitError, match=r"hadamard_block 64 does not divide in_features 96 of Linear layer '1';"):
        Int4Precision(hadamard_block=64).convert_module(model)
    assert not int4_layers(model)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "precision.hadamard_block=24",
            "error: int4 hadamard_block must be a power of two (1, 2, 4, ..., 32, 64, ...), got 24",
        ),
        (
            "+precision.block=16",
            "error: precision 'int4' has no option 'block'; valid: hadamard_block, lss, keep, keep_last_blocks, "
            "seed, mode",
        ),
    ],
)
def test_bad_options_are_one_line_errors(override, expected, capsys, tmp_path):
    code = train_main(["recipe=int4_llm", "debug=smoke", override, f"hydra.run.dir={tmp_path / 'run'}"])
    assert code == 2 and capsys.readouterr().err == expected + "\n"
    with pytest.raises(LowbitError, match="int4 hadamard_block must be a power of two"):
        Int4Precision(hadamard_block=True)
