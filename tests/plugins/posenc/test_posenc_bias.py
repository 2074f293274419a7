"""Attention-bias encodings: ALiBi slopes and distances, KERPLE constraints, T5 buckets."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.nn.posenc import positions_1d, positions_2d
from lowbit.plugins.posenc.alibi import ALiBi, alibi_slopes
from lowbit.plugins.posenc.kerple import KERPLE
from lowbit.plugins.posenc.t5 import T5Bias, t5_bucket
from lowbit.registry import registry

# ---- ALiBi -------------------------------------------------------------------------------------


def _paper_slopes(n: int) -> list[float]:
    """Press et al. 2022: powers of two get 2^(−8k/n), k = 1..n; others the closest lower power of two's
    slopes, then every other slope of twice that power (the odd k of 2^(−8k/2n)) until n."""
    if n & (n - 1) == 0:
        return [2 ** (-8 * k / n) for k in range(1, n + 1)]
    p = 2 ** int(math.log2(n))
    return [2 ** (-8 * k / p) for k in range(1, p + 1)] + [2 ** (-8 * k / (2 * p)) for k in range(1, 2 * p + 1, 2)][
        : n - p
    ]


def test_alibi_slopes_for_8_heads_are_the_papers():
    assert alibi_slopes(8) == [1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128, 1 / 256]


@pytest.mark.parametrize("n", [12, 16, 20, 1, 3, 6])
def test_alibi_slopes_follow_the_published_rule(n):
    assert alibi_slopes(n) == pytest.approx(_paper_slopes(n), rel=1e-12)
    if n == 12:
        assert alibi_slopes(12)[8:] == pytest.approx([2**-0.5, 2**-1.5, 2**-2.5, 2**-3.5])


@pytest.mark.parametrize("causal", [True, False])
def test_alibi_bias_is_minus_slope_times_distance(causal):
    alibi = ALiBi(n_heads=8, causal=causal)
    pos = positions_1d(10)
    bias = alibi.bias(pos, pos)
    assert bias.shape == (8, 10, 10) and bias.dtype == torch.float32
    slopes = torch.tensor(alibi_slopes(8))
    i, j = torch.meshgrid(pos, pos, indexing="ij")
    past = (j <= i).expand(8, -1, -1)
    expected = -slopes[:, None, None] * (i - j).abs().float()
    torch.testing.assert_close(bias[past], expected[past], rtol=0, atol=0)
    assert torch.all(bias.diagonal(dim1=-2, dim2=-1) == 0)
    # monotone: farther keys get strictly lower bias
    row = bias[:, 9, :]  # query 9 looking back
    assert torch.all(row[:, 1:] > row[:, :-1])
    if causal:
        assert torch.all(bias[~past] == 0)  # future keys left to the causal mask
    else:
        torch.testing.assert_close(bias, bias.transpose(-1, -2), rtol=0, atol=0)


def test_alibi_2d_uses_euclidean_distance():
    alibi = ALiBi(n_heads=4, causal=False)
    pos = positions_2d(3, 4)
    bias = alibi.bias(pos, pos)
    slopes = alibi_slopes(4)
    for a, b in ((0, 11), (5, 6), (2, 8)):
        dist = math.dist(pos[a].tolist(), pos[b].tolist())
        assert bias[:, a, b].tolist() == pytest.approx([-m * dist for m in slopes], rel=1e-6)
    with pytest.raises(LowbitError, match="causal=true takes 1-D"):
        ALiBi(n_heads=4).bias(pos, pos)


def test_alibi_bias_is_cached_per_positions():
    alibi = ALiBi(n_heads=4)
    pos = positions_1d(8)
    assert alibi.bias(pos, pos) is alibi.bias(pos, pos)
    assert alibi.bias(pos, pos) is alibi.bias(positions_1d(8), positions_1d(8))  # equal positions, next forward
    assert alibi.bias(positions_1d(9), positions_1d(9)).shape == (4, 9, 9)


# ---- KERPLE ------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["log", "power"])
def test_kerple_bias_formula(variant):
    torch.manual_seed(0)
    kerple = KERPLE(n_heads=3, variant=variant, causal=False)
    pos = positions_1d(7)
    bias = kerple.bias(pos, pos)
    r1, r2 = kerple.r1.detach(), kerple.r2.detach()
    for h, i, j in ((0, 0, 6), (1, 3, 1), (2, 4, 4), (2, 5, 0)):
        d = abs(i - j)
        expected = -r1[h] * math.log(1 + r2[h] * d) if variant == "log" else -r1[h] * d ** r2[h]
        assert bias[h, i, j].item() == pytest.approx(float(expected), rel=1e-5, abs=1e-7)
    assert torch.all(bias.diagonal(dim1=-2, dim2=-1) == 0)


def _kerple_sum_grads(r1: torch.Tensor, r2: torch.Tensor, variant: str, d: torch.Tensor):
    """(∂/∂r1, ∂/∂r2) of Σ_d bias over positive distances d, (nh,) each, in float64, differentiated by hand:
    log: −log(1 + r2·d) and −r1·d / (1 + r2·d); power: −d^r2 and −r1·d^r2·ln d."""
    r1, r2, d = r1.detach().double()[:, None], r2.detach().double()[:, None], d.double()[None]  # (nh, 1), (1, n)
    if variant == "log":
        return -torch.log1p(r2 * d).sum(-1), -(r1 * d / (1 + r2 * d)).sum(-1)
    return -(d**r2).sum(-1), -(r1 * d**r2 * d.log()).sum(-1)


def _past_distances(n: int) -> torch.Tensor:
    """i − j for every query i and earlier key j < i of n causal positions (later keys and j = i add 0)."""
    return torch.tensor([i - j for i in range(n) for j in range(i)], dtype=torch.float64)


@pytest.mark.parametrize("variant, sign", [("log", -1.0), ("log", 1.0), ("power", 1.0), ("power", -1.0)])
def test_kerple_parameters_stay_in_range_after_big_steps(variant, sign):
    torch.manual_seed(1)
    kerple = KERPLE(n_heads=4, variant=variant)
    optimizer = torch.optim.SGD(kerple.parameters(), lr=100.0)
    pos = positions_1d(32)
    r2_max = 2.0 if variant == "power" else math.inf
    for _ in range(5):
        loss = sign * kerple.bias(pos, pos).sum()  # pushes r1, r2 hard towards 0 (sign −1) or up (sign +1)
        optimizer.zero_grad()
        loss.backward()
        assert torch.isfinite(kerple.r1.grad).all() and torch.isfinite(kerple.r2.grad).all()
        # inside the range the gradient is exactly the derivative (at a bound the clamp decides it)
        want_r1, want_r2 = _kerple_sum_grads(kerple.r1, kerple.r2, variant, _past_distances(32))
        r1, r2 = kerple.r1.detach(), kerple.r2.detach()
        inside_r1, inside_r2 = r1 > kerple.eps, (r2 > kerple.eps) & (r2 < r2_max)
        torch.testing.assert_close(kerple.r1.grad[inside_r1].double(), sign * want_r1[inside_r1], rtol=1e-5, atol=0)
        torch.testing.assert_close(kerple.r2.grad[inside_r2].double(), sign * want_r2[inside_r2], rtol=1e-5, atol=0)
        optimizer.step()
        eff = kerple.effective_params()
        assert torch.all(eff["r1"] >= 1e-2) and torch.all(eff["r2"] >= 1e-2) and torch.all(eff["r2"] <= r2_max)
        kerple.bias(pos, pos)  # the next forward projects the stored parameters too
        assert torch.all(kerple.r1 >= 1e-2) and torch.all(kerple.r2 >= 1e-2) and torch.all(kerple.r2 <= r2_max)
    moved_out = sign < 0 or variant == "power"
    assert not moved_out or bool((kerple.r2 == 1e-2).any() or (kerple.r2 == r2_max).any())


def test_kerple_two_forwards_then_one_backward():
    torch.manual_seed(2)
    kerple = KERPLE(n_heads=2)
    pos = positions_1d(5)
    loss = kerple.bias(pos, pos).sum() + kerple.bias(pos, pos).sum()
    loss.backward()
    # both forwards reach the parameters: twice the derivative of one bias's sum
    want_r1, want_r2 = _kerple_sum_grads(kerple.r1, kerple.r2, "log", _past_distances(5))
    torch.testing.assert_close(kerple.r1.grad.double(), 2 * want_r1, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(kerple.r2.grad.double(), 2 * want_r2, rtol=1e-6, atol=1e-7)


def test_kerple_bad_variant_is_a_clear_error():
    with pytest.raises(LowbitError, match="unknown kerple variant 'exp'; valid: log, power"):
        registry.build("posenc", {"name": "kerple", "variant": "exp"}, n_heads=4)


# ---- T5 ----------------------------------------------------------------------------------------


def _t5_reference_bucket(relative_position: int, bidirectional: bool, num_buckets: int, max_distance: int) -> int:
    """Mesh TensorFlow's _relative_position_bucket, one offset at a time (n = query − key)."""
    ret = 0
    n = -relative_position
    if bidirectional:
        num_buckets //= 2
        ret += (n < 0) * num_buckets
        n = abs(n)
    else:
        n = max(n, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return ret + n
    val = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact))
    return ret + min(val, num_buckets - 1)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (16, 64), (8, 20)])
def test_t5_buckets_equal_the_reference(causal, num_buckets, max_distance):
    rel = torch.arange(-600, 601)
    got = t5_bucket(rel, causal=causal, num_buckets=num_buckets, max_distance=max_distance)
    expected = [_t5_reference_bucket(r, not causal, num_buckets, max_distance) for r in rel.tolist()]
    assert got.tolist() == expected
    assert got.min() >= 0 and got.max() == num_buckets - 1


def test_t5_bias_looks_up_the_table():
    torch.manual_seed(2)
    t5 = T5Bias(n_heads=3, causal=False)
    pos = positions_1d(20)
    bias = t5.bias(pos, pos)
    assert bias.shape == (3, 20, 20)
    for i, j in ((0, 19), (19, 0), (7, 7), (3, 15)):
        bucket = _t5_reference_bucket(j - i, True, 32, 128)
        torch.testing.assert_close(bias[:, i, j], t5.table[bucket], rtol=0, atol=0)
    bias.sum().backward()
    assert t5.table.grad.abs().sum() > 0
    # every (query, key) pair adds 1 to its bucket's row, for every head: the gradient counts the pairs per bucket
    counts = torch.zeros(32)
    for i in range(20):
        for j in range(20):
            counts[_t5_reference_bucket(j - i, True, 32, 128)] += 1
    assert counts.sum() == 400 and torch.equal(t5.table.grad, counts[:, None].expand(32, 3))


def test_t5_is_text_only_and_checks_its_buckets():
    with pytest.raises(LowbitError, match="takes 1-D positions, got 2-D"):
        T5Bias(n_heads=2, causal=False).bias(positions_2d(2, 2), positions_2d(2, 2))
    with pytest.raises(LowbitError, match="num_buckets ≥ 4"):
        registry.build("posenc", {"name": "t5", "num_buckets": 2, "causal": False}, n_heads=2)
