"""RoPE: relative-position property, layouts, timm and complex references, scalings, xPos, errors."""

from __future__ import annotations

import math

import pytest
import torch
from timm.layers.pos_embed_sincos import apply_rot_embed, build_rotary_pos_embed

from lowbit.errors import LowbitError
from lowbit.nn.posenc import positions_1d, positions_2d
from lowbit.plugins.posenc.rope import RoPE, half_to_interleaved
from lowbit.registry import registry


def _rotate_at(rope: RoPE, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the same x as q and as k at positions pos; x (1, 1, T, hs)."""
    return rope.rotate(x, x, pos)


def _dot_at(rope: RoPE, q: torch.Tensor, k: torch.Tensor, m, n) -> float:
    """⟨R_m q, R_n k⟩ for single vectors q, k (hs,), with m, n positions (int or (row, col))."""
    pos = torch.tensor([m, n])  # (2,) or (2, 2)
    x = torch.stack([q, k])[None, None]  # (1, 1, 2, hs)
    rq, rk = rope.rotate(x, x, pos)
    return float(rq[0, 0, 0] @ rk[0, 0, 1])


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"layout": "interleaved"},
        {"fraction": 0.5},
        {"theta": 500.0, "layout": "interleaved", "fraction": 0.75},
        {"scaling": "yarn", "scale": 4.0},
        {"scaling": "ntk", "scale": 8.0},
    ],
)
def test_dot_product_depends_only_on_offset_1d(options):
    torch.manual_seed(0)
    rope = RoPE(head_dim=16, max_len=64, **options)
    q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    for offset in (0, 3, -5):
        dots = [_dot_at(rope, q, k, m, m - offset) for m in (7, 20, 151)]
        assert dots == pytest.approx([dots[0]] * 3, rel=1e-4, abs=1e-4)
    # and it does depend on the offset
    assert abs(_dot_at(rope, q, k, 10, 7) - _dot_at(rope, q, k, 10, 2)) > 1e-3


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_dot_product_depends_only_on_offset_2d(layout):
    torch.manual_seed(1)
    rope = RoPE(head_dim=16, grid=(8, 8), layout=layout)
    q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    for d_row, d_col in ((0, 0), (2, -3), (-4, 1)):
        dots = [_dot_at(rope, q, k, (r, c), (r - d_row, c - d_col)) for r, c in ((5, 5), (9, 2), (30, 17))]
        assert dots == pytest.approx([dots[0]] * 3, rel=1e-4, abs=1e-4)
    # rows and columns are told apart
    assert abs(_dot_at(rope, q, k, (3, 0), (0, 0)) - _dot_at(rope, q, k, (0, 3), (0, 0))) > 1e-3


@pytest.mark.parametrize("pos", [positions_1d(12), positions_2d(3, 4)])
def test_half_and_interleaved_agree_after_channel_permutation(pos):
    torch.manual_seed(2)
    perm = half_to_interleaved(16)
    assert perm[:6].tolist() == [0, 8, 1, 9, 2, 10]
    half, inter = RoPE(head_dim=16, layout="half"), RoPE(head_dim=16, layout="interleaved")
    q, k = torch.randn(2, 3, pos.shape[0], 16), torch.randn(2, 3, pos.shape[0], 16)
    hq, hk = half.rotate(q, k, pos)
    iq, ik = inter.rotate(q[..., perm], k[..., perm], pos)
    torch.testing.assert_close(hq[..., perm], iq, rtol=0, atol=1e-6)
    torch.testing.assert_close(hk[..., perm], ik, rtol=0, atol=1e-6)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("theta", [10000.0, 100.0])
def test_matches_timm_1d(layout, theta):
    # timm's axial RoPE over one axis with dim=2·hs has hs/2 bands θ^(−j/(hs/2)): exactly 1-D RoPE
    torch.manual_seed(3)
    T, hs = 20, 16
    x = torch.randn(2, 4, T, hs)
    sin, cos = build_rotary_pos_embed([T], dim=2 * hs, in_pixels=False, temperature=theta, rotate_half=layout == "half")
    expected = apply_rot_embed(x, sin, cos, half=layout == "half")
    got, _ = RoPE(head_dim=hs, theta=theta, layout=layout).rotate(x, x, positions_1d(T))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_matches_timm_2d_axial(layout):
    # timm: bands θ^(−j/(hs/4)) per axis, pair angles [row bands, col bands]; ours: a 1-D RoPE over hs/2 channels per axis
    torch.manual_seed(4)
    rows, cols, hs = 3, 5, 16
    x = torch.randn(2, 4, rows * cols, hs)
    sin, cos = build_rotary_pos_embed(
        [rows, cols], dim=hs, in_pixels=False, temperature=10000.0, rotate_half=layout == "half"
    )
    expected = apply_rot_embed(x, sin, cos, half=layout == "half")
    got, _ = RoPE(head_dim=hs, grid=(rows, cols), layout=layout).rotate(x, x, positions_2d(rows, cols))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_interleaved_matches_complex_reference():
    # Meta's Llama: pairs (2i, 2i+1) as complex numbers times e^{i·n·ω_i}
    torch.manual_seed(5)
    T, hs = 9, 8
    x = torch.randn(1, 2, T, hs)
    freqs = 1.0 / (10000.0 ** (torch.arange(0, hs, 2).float() / hs))
    freqs_cis = torch.polar(torch.ones(T, hs // 2), torch.outer(torch.arange(T).float(), freqs))
    expected = torch.view_as_real(torch.view_as_complex(x.reshape(1, 2, T, hs // 2, 2)) * freqs_cis).flatten(-2)
    got, _ = RoPE(head_dim=hs, layout="interleaved").rotate(x, x, positions_1d(T))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_partial_rotary_rotates_only_the_first_channels(layout):
    torch.manual_seed(6)
    x = torch.randn(2, 2, 10, 16)
    pos = positions_1d(10)
    got, _ = RoPE(head_dim=16, fraction=0.25, layout=layout).rotate(x, x, pos)
    full, _ = RoPE(head_dim=4, layout=layout).rotate(x[..., :4].contiguous(), x[..., :4].contiguous(), pos)
    torch.testing.assert_close(got[..., :4], full, rtol=0, atol=1e-6)
    assert torch.equal(got[..., 4:], x[..., 4:])


# ---- context extension -------------------------------------------------------------------------


def _plain(d: int, theta: float = 10000.0) -> torch.Tensor:
    return torch.tensor([theta ** (-2 * i / d) for i in range(d // 2)], dtype=torch.float64)


def test_pi_frequencies_and_positions():
    rope = RoPE(head_dim=16, scaling="pi", scale=4.0)
    torch.testing.assert_close(rope.inv_freq(1), _plain(16) / 4.0, rtol=1e-12, atol=0)
    # position 4·n under PI is position n without it
    x = torch.randn(1, 1, 5, 16)
    pi, _ = rope.rotate(x, x, torch.tensor([0, 4, 8, 40, 400]))
    plain, _ = RoPE(head_dim=16).rotate(x, x, torch.tensor([0, 1, 2, 10, 100]))
    torch.testing.assert_close(pi, plain, rtol=0, atol=1e-5)


def test_ntk_frequencies():
    d, s = 16, 8.0
    rope = RoPE(head_dim=d, scaling="ntk", scale=s)
    theta_prime = 10000.0 * s ** (d / (d - 2))
    torch.testing.assert_close(rope.inv_freq(1), _plain(d, theta_prime), rtol=1e-12, atol=0)
    assert rope.attention_factor == 1.0
    # 2-D: each axis is a d/2-channel RoPE, so d/2 in the formula
    rope2 = RoPE(head_dim=d, grid=(4, 4), scaling="ntk", scale=s)
    torch.testing.assert_close(
        rope2.inv_freq(2), _plain(d // 2, 10000.0 * s ** ((d // 2) / (d // 2 - 2))), rtol=1e-12, atol=0
    )


@pytest.mark.parametrize(
    "d, s, L, alpha, beta", [(64, 4.0, 128, 1.0, 32.0), (128, 16.0, 4096, 1.0, 32.0), (32, 2.0, 64, 2.0, 16.0)]
)
def test_yarn_frequencies_and_temperature(d, s, L, alpha, beta):
    rope = RoPE(head_dim=d, max_len=999, scaling="yarn", scale=s, original_max_len=L, yarn_alpha=alpha, yarn_beta=beta)
    expected = []
    for i in range(d // 2):
        theta_i = 10000.0 ** (-2 * i / d)
        r = L / (2 * math.pi / theta_i)  # r = L / λ_i
        gamma = 0.0 if r < alpha else 1.0 if r > beta else (r - alpha) / (beta - alpha)
        expected.append((1 - gamma) * theta_i / s + gamma * theta_i)
    torch.testing.assert_close(rope.inv_freq(1), torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    # the lowest frequency is interpolated (÷ s); the highest kept when it turns more than β times over L
    assert rope.inv_freq(1)[-1].item() == pytest.approx(_plain(d)[-1].item() / s)
    assert rope.inv_freq(1)[0].item() == (1.0 if L / (2 * math.pi) > beta else pytest.approx(expected[0]))
    # temperature: q and k each scaled by sqrt(1/t) = 0.1·ln(s) + 1, so their norms grow by that factor
    factor = 0.1 * math.log(s) + 1
    assert rope.attention_factor == pytest.approx(factor)
    x = torch.randn(1, 2, 7, d, dtype=torch.float64)
    rq, rk = rope.rotate(x, x, positions_1d(7))
    torch.testing.assert_close(rq.norm(dim=-1), factor * x.norm(dim=-1), rtol=1e-5, atol=0)
    torch.testing.assert_close(rk.norm(dim=-1), factor * x.norm(dim=-1), rtol=1e-5, atol=0)


def test_yarn_training_length_defaults_to_max_len():
    a = RoPE(head_dim=32, max_len=256, scaling="yarn", scale=4.0)
    b = RoPE(head_dim=32, scaling="yarn", scale=4.0, original_max_len=256)
    assert torch.equal(a.inv_freq(1), b.inv_freq(1))


# ---- xPos --------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_xpos_scores_are_rope_scores_times_decay(layout):
    torch.manual_seed(7)
    T, d, base = 12, 8, 4.0  # a small scale_base makes the decay visible
    q, k = torch.randn(1, 1, T, d, dtype=torch.float64), torch.randn(1, 1, T, d, dtype=torch.float64)
    pos = positions_1d(T)
    xq, xk = RoPE(head_dim=d, layout=layout, xpos=True, scale_base=base).rotate(q, k, pos)
    rq, rk = RoPE(head_dim=d, layout=layout).rotate(q, k, pos)
    # per pair i: ⟨q_n, k_m⟩_i · ζ_i^((n−m)/B), ζ_i = (2i/d + 0.4)/1.4
    zeta = torch.tensor([(2 * i / d + 0.4) / 1.4 for i in range(d // 2)], dtype=torch.float64)
    pair = (
        (lambda x: x.reshape(T, 2, d // 2).transpose(1, 2)) if layout == "half" else (lambda x: x.reshape(T, d // 2, 2))
    )
    per_pair = torch.einsum("nip,mip->nmi", pair(rq[0, 0]), pair(rk[0, 0]))  # (Tq, Tk, d/2)
    offset = (pos[:, None] - pos[None, :]).double()  # n − m
    expected = (per_pair * zeta ** (offset[..., None] / base)).sum(-1)
    torch.testing.assert_close(xq[0, 0] @ xk[0, 0].T, expected, rtol=1e-5, atol=1e-6)


# ---- caching and errors ------------------------------------------------------------------------


def test_tables_built_once_per_positions_and_dtype(monkeypatch):
    rope = RoPE(head_dim=8)
    calls = []
    build = rope._tables
    monkeypatch.setattr(rope, "_tables", lambda pos, dtype: calls.append(dtype) or build(pos, dtype))
    x = torch.randn(1, 2, 6, 8)
    pos = positions_1d(6)
    for _ in range(3):  # three layers of one forward
        rope.rotate(x, x, pos)
    rope.rotate(x, x, positions_1d(6))  # next forward, equal positions
    assert calls == [torch.float32]
    rope.rotate(x.double(), x.double(), pos)
    rope.rotate(x[:, :, :4], x[:, :, :4], positions_1d(4))
    assert calls == [torch.float32, torch.float64, torch.float32]


def test_tables_from_inference_mode_are_not_reused_for_training():
    rope = RoPE(head_dim=8)
    x = torch.randn(1, 2, 6, 8, requires_grad=True)
    with torch.inference_mode():
        rope.rotate(x.detach(), x.detach(), positions_1d(6))
    q, _ = rope.rotate(x, x, positions_1d(6))
    q.sum().backward()
    # half layout, pair (i, i + 4) at angle n·ω_i: q_i = x_i·cos − x_{i+4}·sin and q_{i+4} = x_i·sin + x_{i+4}·cos,
    # so ∂Σq/∂x_i = cos + sin and ∂Σq/∂x_{i+4} = cos − sin, the same for every batch row and head
    angle = positions_1d(6).double()[:, None] * _plain(8)[None]  # (T, hs/2)
    expected = torch.cat([angle.cos() + angle.sin(), angle.cos() - angle.sin()], dim=-1)  # (T, hs)
    torch.testing.assert_close(x.grad, expected.float().expand(1, 2, 6, 8), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "options, context, match",
    [
        ({}, {"head_dim": 15}, "even head_dim, got 15"),
        ({"fraction": 0.2}, {"head_dim": 16}, "= 3 channels; that must be a positive even number"),
        ({"scaling": "linear"}, {"head_dim": 16}, "unknown rope scaling 'linear'; valid: none, pi, ntk, yarn"),
        ({"layout": "neox"}, {"head_dim": 16}, "unknown rope layout 'neox'"),
        ({"scale": 2.0}, {"head_dim": 16}, "no effect with scaling='none'"),
        ({}, {"head_dim": 6, "grid": (4, 4)}, "must divide by 4"),
        ({"xpos": True}, {"head_dim": 8, "grid": (4, 4)}, "xpos is defined for 1-D"),
        ({"scaling": "yarn", "scale": 2.0}, {"head_dim": 8}, "needs original_max_len"),
        (
            {"scaling": "yarn", "scale": 2.0, "yarn_alpha": 32.0},
            {"head_dim": 8, "max_len": 64},
            "yarn_alpha=32.0, yarn_beta=32.0",
        ),
        ({"scaling": "yarn", "scale": 2.0, "original_max_len": 0}, {"head_dim": 8}, "training length ≥ 1, got 0"),
        ({"theta": 1e4, "colour": 3}, {"head_dim": 8}, "has no option 'colour'"),
    ],
)
def test_bad_configuration_is_a_clear_error_at_build(options, context, match):
    with pytest.raises(LowbitError, match=match):
        registry.build("posenc", {"name": "rope", **options}, **context)


def test_bad_positions_are_clear_errors():
    rope = RoPE(head_dim=6)  # 1-D fine; 6 rotary channels cannot split into row and column pairs
    x = torch.randn(1, 1, 4, 6)
    rope.rotate(x, x, positions_1d(4))
    with pytest.raises(LowbitError, match="must divide by 4"):
        rope.rotate(x, x, positions_2d(2, 2))
    with pytest.raises(LowbitError, match="takes 1-D or 2-D positions, got 3-D"):
        rope.rotate(x, x, torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(LowbitError, match="built for head_dim 6"):
        rope.rotate(torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8), positions_1d(4))
