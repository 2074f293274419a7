"""LookHere: direction masks and distance penalties by hand on a 3×3 grid, head layouts, the per-grid cache,
ViT / DEQ-ViT training and extrapolation, the class token, a stock timm ViT, errors, and a grid property test."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import LowbitError
from lowbit.models.deq import DEQViT
from lowbit.models.vit import ViT, _PatchTokensOnly
from lowbit.nn.posenc import positions_1d, positions_2d
from lowbit.plugins.posenc.lookhere import LookHere, head_layout

INF = float("-inf")
R2, R5, R8 = math.sqrt(2), math.sqrt(5), math.sqrt(8)
SMALL = dict(image_size=16, patch_size=4, in_chans=1, num_classes=10, dim=32)


def _with_lookhere(model, **options):
    """Swap a model's posenc for LookHere (until the entry point exists, a ViT cannot build it by name)."""
    attn = next(m for name, m in model.named_modules() if name.endswith("attn"))
    model.posenc = LookHere(n_heads=attn.n_heads, **options)
    return model


def _picture(rows: str) -> list[bool]:
    """'##./##./...' → which of the 9 keys of a 3×3 grid (row-major) the query sees."""
    return [c == "#" for c in rows.replace("/", "")]


def _seen(bias: torch.Tensor, head: int, query: int) -> list[bool]:
    return torch.isfinite(bias[head, query]).tolist()


# what the centre patch (row 1, col 1) sees in each directed head, worked out by hand from the reference's
# definitions (``halves``, ``diagonals``, ``corners``, ``triangles``, ``eighths1``, ``eighths2``): row 0 is "up"
CENTRE_VIEWS = {
    180: [
        "###/###/...",  # N half: rows above and the own row
        ".../###/###",  # S half
        "##./##./##.",  # W half
        ".##/.##/.##",  # E half
        "###/.##/..#",  # NE half: from NW round to SE, both boundary diagonals included
        "###/##./#..",  # NW half
        "..#/.##/###",  # SE half
        "#../##./###",  # SW half
    ],
    90: [
        "##./##./...",  # NW quadrant (the reference's corners)
        ".##/.##/...",  # NE quadrant
        ".../##./##.",  # SW quadrant
        ".../.##/.##",  # SE quadrant
        "###/.#./...",  # N cone, ±45° (the reference's triangles)
        ".../.#./###",  # S cone
        "#../##./#..",  # W cone
        "..#/.##/..#",  # E cone
    ],
    45: [
        "##./.#./...",  # N to NW (eighths1)
        ".../.#./##.",  # S to SW
        "#../##./...",  # W to NW
        "..#/.##/...",  # E to NE
        ".##/.#./...",  # N to NE (eighths2)
        ".../.#./.##",  # S to SE
        ".../##./#..",  # W to SW
        ".../.##/..#",  # E to SE
    ],
}


@pytest.mark.parametrize("fov", [180, 90, 45])
def test_direction_masks_of_the_centre_patch_on_a_3x3_grid(fov):
    lh = LookHere(n_heads=12, fov=fov)  # the paper's 12-head layout: 8 directed heads, then 4 seeing everything
    pos = positions_2d(3, 3)
    bias = lh.bias(pos, pos)
    assert bias.shape == (12, 9, 9) and bias.dtype == torch.float32
    for head, view in enumerate(CENTRE_VIEWS[fov]):
        assert _seen(bias, head, 4) == _picture(view), (fov, head)
    for head in range(8, 12):
        assert _seen(bias, head, 4) == [True] * 9
    assert torch.all(bias.diagonal(dim1=-2, dim2=-1) == 0)  # every patch sees itself, unpenalised


def test_lh180_distance_penalties_on_a_3x3_grid():
    lh = LookHere(n_heads=12)  # defaults: LH-180, global slope 2; directed heads s_h = 1/2, so m_h = 1
    pos = positions_2d(3, 3)
    bias = lh.bias(pos, pos)
    expect = {
        (0, 4): [-R2, -1, -R2, -1, 0, -1, INF, INF, INF],  # N half from the centre
        (3, 4): [INF, -1, -R2, INF, 0, -1, INF, -1, -R2],  # E half from the centre
        (0, 0): [0, -1, -2, INF, INF, INF, INF, INF, INF],  # N half from the top-left corner: its own row only
        (1, 0): [0, -1, -2, -1, -R2, -R5, -2, -R5, -R8],  # S half from the corner: the whole grid
        (4, 8): [-R8, -R5, -2, INF, -R2, -1, INF, INF, 0],  # NE half from the bottom-right corner: NW to SE
        # the all-direction heads: m_h = 2 · (1/4, 1/16, 1/64, 1/256)
        (8, 4): [-R2 / 2, -1 / 2, -R2 / 2, -1 / 2, 0, -1 / 2, -R2 / 2, -1 / 2, -R2 / 2],
        (9, 0): [0, -1 / 8, -2 / 8, -1 / 8, -R2 / 8, -R5 / 8, -2 / 8, -R5 / 8, -R8 / 8],
        (11, 0): [0, -1 / 128, -2 / 128, -1 / 128, -R2 / 128, -R5 / 128, -2 / 128, -R5 / 128, -R8 / 128],
    }
    for (head, query), row in expect.items():
        assert bias[head, query].tolist() == pytest.approx(row, rel=1e-6), (head, query)
    # global_slope scales every penalty and leaves the masks alone
    half = LookHere(n_heads=12, global_slope=1.0).bias(pos, pos)
    torch.testing.assert_close(half, bias / 2, rtol=0, atol=0)


def test_head_layouts_and_slopes():
    names = [name for name, _, _ in head_layout(12)]
    assert names == ["N", "S", "W", "E", "NE", "NW", "SE", "SW", "all", "all", "all", "all"]
    assert [s for _, _, s in head_layout(12)] == [1 / 2] * 8 + [1 / 4, 1 / 16, 1 / 64, 1 / 256]
    assert [name for name, _, _ in head_layout(12, fov=90)][:8] == ["NW", "NE", "SW", "SE", "N", "S", "W", "E"]
    assert [name for name, _, _ in head_layout(8, fov=45, unmasked_heads=0)] == [
        "NNW", "SSW", "WNW", "ENE", "NNE", "SSE", "WSW", "ESE"
    ]  # fmt: skip
    # more heads than cones: copy c of each cone gets s_h = 2^-(c+1), as the reference's get_slopes
    four = head_layout(16, directions=4, unmasked_heads=0)
    assert [name for name, _, _ in four] == ["N", "S", "W", "E"] * 4
    assert [s for _, _, s in four] == [1 / 2] * 4 + [1 / 4] * 4 + [1 / 8] * 4 + [1 / 16] * 4
    twenty = [1 / 2] * 4 + [1 / 4] * 4 + [1 / 2] * 4 + [1 / 4] * 4 + [1 / 4, 1 / 16, 1 / 64, 1 / 256]
    assert [s for _, _, s in head_layout(20)] == twenty  # N S W E twice, then NE NW SE SW twice, then 4 all
    # more all-direction heads: each of the four slopes for a quarter of them (the reference's np.repeat)
    assert [s for _, _, s in head_layout(16, unmasked_heads=8)][8:] == [4**-1] * 2 + [4**-2] * 2 + [4**-3] * 2 + [
        4**-4
    ] * 2
    assert [s for _, _, s in head_layout(10, unmasked_heads=2)][8:] == [1 / 4, 1 / 16]


def test_bias_is_built_once_per_grid_and_reused(monkeypatch):
    lh = LookHere(n_heads=12)
    builds = []
    build = lh._bias
    monkeypatch.setattr(lh, "_bias", lambda q, k: builds.append(q.shape[0]) or build(q, k))
    pos = positions_2d(4, 4)
    first = lh.bias(pos, pos)
    assert lh.bias(pos, pos) is first
    assert lh.bias(positions_2d(4, 4), positions_2d(4, 4)) is first  # equal positions of the next forward
    bigger = lh.bias(positions_2d(6, 6), positions_2d(6, 6))
    assert bigger.shape == (12, 36, 36) and bigger is not first
    assert lh.bias(positions_2d(4, 4), positions_2d(4, 4)) is first  # still cached
    assert builds == [16, 36]

    # a ViT builds it once for all its forwards and layers; a DEQ-ViT asks once per forward, outside the solve
    torch.manual_seed(0)
    model = _with_lookhere(ViT(**SMALL, n_heads=4, posenc="none"), directions=4, unmasked_heads=0)
    vit_builds = []
    vit_build = model.posenc._bias
    monkeypatch.setattr(model.posenc, "_bias", lambda q, k: vit_builds.append(1) or vit_build(q, k))
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(2, 1, 16, 16))
    assert vit_builds == [1]
    deq = _with_lookhere(DEQViT(**SMALL, n_heads=4, posenc="none", deq={"max_iter": 6}), directions=4, unmasked_heads=0)
    deq_calls = []
    deq_bias = deq.posenc.bias
    monkeypatch.setattr(deq.posenc, "bias", lambda q, k: deq_calls.append(1) or deq_bias(q, k))
    with torch.no_grad():
        deq(torch.randn(2, 1, 16, 16))
    assert len(deq_calls) == 1 and deq.deq_stats()["deq/iters"] > 1


LAYOUTS = [
    (4, 32, {"fov": 90, "directions": 4, "unmasked_heads": 0}),
    (8, 32, {"fov": 45, "unmasked_heads": 0}),
    (12, 48, {}),  # the paper's LH-180 layout
]


@pytest.mark.parametrize("n_heads, dim, options", LAYOUTS)
def test_vit_trains_a_step_and_runs_on_larger_images(n_heads, dim, options):
    torch.manual_seed(0)
    model = _with_lookhere(ViT(**{**SMALL, "dim": dim}, n_layers=2, n_heads=n_heads, posenc="none"), **options)
    images, labels = torch.randn(4, 1, 16, 16), torch.arange(4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    start = model.trunk.blocks[0].attn.qkv.weight.detach().clone()
    loss = F.cross_entropy(model(images), labels)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(math.log(10), abs=0.5)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    optimizer.step()
    assert not torch.equal(model.trunk.blocks[0].attn.qkv.weight, start)
    model.eval()
    with torch.no_grad():
        for side in (24, 32):  # 6×6 and 8×8 patches: more patches than in training
            logits = model(torch.randn(2, 1, side, side))
            assert logits.shape == (2, 10) and torch.isfinite(logits).all()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the mask reaches SDPA in bf16: -inf stays -inf
            assert torch.isfinite(model(torch.randn(2, 1, 32, 32))).all()
    assert {key[0][0] for key in model.posenc._cache._entries} == {(16, 2), (36, 2), (64, 2)}


def test_class_token_sees_and_is_seen_by_every_patch_unpenalised():
    torch.manual_seed(0)
    model = _with_lookhere(ViT(**SMALL, n_layers=1, n_heads=4, posenc="none"), directions=4, unmasked_heads=0)
    x, pos, posenc = model._tokens(torch.randn(1, 1, 16, 16))
    assert isinstance(posenc, _PatchTokensOnly) and x.shape[1] == 17
    mask = posenc.bias(pos, pos)  # (nh, 1 + 16, 1 + 16) what the trunk folds into SDPA
    assert mask.shape == (4, 17, 17)
    assert torch.all(mask[:, 0, :] == 0) and torch.all(mask[:, :, 0] == 0)  # the reference pads zeros
    patches = positions_2d(4, 4)
    torch.testing.assert_close(mask[:, 1:, 1:], model.posenc.bias(patches, patches), rtol=0, atol=0)
    # in the N head the top-left patch sees the class token and its own row only
    assert torch.isfinite(mask[0, 1]).tolist() == [True] * 5 + [False] * 12


def test_deq_vit_forward_and_backward():
    torch.manual_seed(0)
    model = _with_lookhere(DEQViT(**SMALL, n_heads=4, pool="cls", posenc="none"), directions=4, unmasked_heads=0)
    logits = model(torch.randn(2, 1, 16, 16))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.tensor([1, 2])).backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():
        assert torch.isfinite(model.eval()(torch.randn(1, 1, 24, 24))).all()


def test_stock_timm_vit_takes_the_bias_through_its_attn_mask():
    pytest.importorskip("timm")
    from lowbit.models.timm import TimmModel

    torch.manual_seed(0)
    model = TimmModel(
        img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=4,
        kwargs={"pos_embed": "none", "dynamic_img_size": True},  # LookHere replaces the absolute embedding
    )  # fmt: skip
    lh = LookHere(n_heads=4, directions=4, unmasked_heads=0)
    net, n = model.net, model.net.num_prefix_tokens
    for side in (16, 24):
        images = torch.randn(2, 1, side, side)
        patches = positions_2d(side // 4, side // 4)
        mask = F.pad(lh.bias(patches, patches), (n, 0, n, 0))  # (nh, 1 + N, 1 + N): class token unmasked
        logits = net(images, attn_mask=mask)
        assert logits.shape == (2, 10) and torch.isfinite(logits).all()
        assert not torch.allclose(logits, net(images))  # the bias reaches timm's attention
    logits.square().sum().backward()
    assert torch.isfinite(net.blocks[0].attn.qkv.weight.grad).all()


def test_bad_input_is_one_clear_error():
    lh = LookHere(n_heads=12)
    cases = [
        (lambda: lh.bias(positions_1d(8), positions_1d(8)), "takes 2-D .*positions, got 1-D"),
        (lambda: LookHere(n_heads=2), "needs at least 4 heads .*, got n_heads=2"),
        (lambda: LookHere(n_heads=4, directions=8), r"needs n_heads = 4 \+ 8·k \(12, 20, 28, ...\), got n_heads=4"),
        (lambda: LookHere(n_heads=6, directions=4, unmasked_heads=0), "n_heads = 0 \\+ 4·k \\(4, 8, 12"),
        (lambda: LookHere(n_heads=12, fov=120), "unknown lookhere fov 120; valid: 180, 90, 45"),
        (lambda: LookHere(n_heads=12, directions=6), "unknown lookhere directions 6; valid: 4, 8"),
        (lambda: LookHere(n_heads=4, fov=45, directions=4, unmasked_heads=0), "fov=45 needs directions=8"),
        (lambda: LookHere(n_heads=14, unmasked_heads=6), "unmasked_heads must be 0-4 or a multiple of 4, got 6"),
        (lambda: LookHere(n_heads=12, global_slope=-1.0), "global_slope must be a number >= 0"),
        (lambda: LookHere(n_heads=12, global_slope=float("nan")), "global_slope must be a number >= 0"),
        # queries whose own position is not among the keys may see nothing: an error, never a NaN
        (lambda: lh.bias(torch.tensor([[0, 0]]), torch.tensor([[1, 0]])), r"\(0, 0\) sees no key in head 0 \(N\)"),
    ]
    for make, message in cases:
        with pytest.raises(LowbitError, match=message) as err:
            make()
        assert "\n" not in str(err.value)


def test_builds_by_name_through_the_registry_and_the_models():
    """Passes once pyproject.toml registers ``lookhere`` under ``lowbit.posenc``."""
    from lowbit.models.gpt import GPT
    from lowbit.registry import registry

    enc = registry.build(
        "posenc", {"name": "lookhere", "fov": 90}, dim=48, n_heads=12, head_dim=4, max_len=16, grid=None
    )
    assert isinstance(enc, LookHere) and enc.fov == 90
    torch.manual_seed(0)
    vit = ViT(**{**SMALL, "dim": 48}, n_layers=1, n_heads=12, posenc="lookhere")
    assert isinstance(vit.posenc, LookHere) and torch.isfinite(vit(torch.randn(1, 1, 16, 16))).all()
    small = ViT(**SMALL, n_layers=1, n_heads=4, posenc={"name": "lookhere", "directions": 4, "unmasked_heads": 0})
    assert small.posenc.layout[0][0] == "N"
    with pytest.raises(LowbitError, match="LookHere is 2-D only; a GPT needs a 1-D encoding"):
        GPT(vocab_size=256, dim=48, n_layers=1, n_heads=12, max_len=16, posenc="lookhere")


# ---- property: over grid sizes and layouts, every query sees itself, finite inside the cone, -inf outside ----

_CENTRES = {"N": 90, "S": 270, "W": 180, "E": 0, "NE": 45, "NW": 135, "SE": 315, "SW": 225}
_CENTRES.update({"NNW": 112.5, "SSW": 247.5, "WNW": 157.5, "ENE": 22.5})
_CENTRES.update({"NNE": 67.5, "SSE": 292.5, "WSW": 202.5, "ESE": 337.5})


def _inside(name: str, fov: int, d_row: int, d_col: int) -> bool:
    """The cone by its compass centre and half-angle, with float angles (the plugin uses integer cross products)."""
    if name == "all" or d_row == d_col == 0:
        return True
    angle = math.degrees(math.atan2(-d_row, d_col))  # up (towards row 0) is +90°
    off = abs((angle - _CENTRES[name] + 180) % 360 - 180)
    return off <= fov / 2 + 1e-9


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 7),
    cols=st.integers(1, 7),
    layout=st.sampled_from([(180, 8, 4), (90, 8, 4), (45, 8, 4), (180, 4, 0), (90, 4, 2), (45, 8, 1)]),
    copies=st.integers(1, 2),
)
def test_every_query_sees_itself_and_the_bias_is_finite_exactly_inside_the_cone(rows, cols, layout, copies):
    fov, directions, unmasked = layout
    lh = LookHere(n_heads=unmasked + copies * directions, fov=fov, directions=directions, unmasked_heads=unmasked)
    pos = positions_2d(rows, cols)
    bias = lh.bias(pos, pos)
    assert bias.diagonal(dim1=-2, dim2=-1).eq(0).all()
    offsets = (pos[None, :, :] - pos[:, None, :]).tolist()  # (T, T, 2) key − query (Δrow, Δcol)
    distance = torch.cdist(pos.double(), pos.double())  # (T, T)
    for h, (name, _, s) in enumerate(lh.layout):
        inside = torch.tensor([[_inside(name, fov, dr, dc) for dr, dc in row] for row in offsets])
        assert torch.equal(torch.isfinite(bias[h]), inside), (h, name)
        assert torch.all(bias[h][~inside] == INF)
        torch.testing.assert_close(bias[h][inside].double(), -2.0 * s * distance[inside], rtol=1e-6, atol=0)
    # each copy's cones together cover every direction: every key is seen by some directed head
    assert torch.isfinite(bias[: copies * directions]).any(0).all()
    q, k, v = torch.randn(3, 1, lh.n_heads, rows * cols, 4).unbind(0)
    assert torch.isfinite(F.scaled_dot_product_attention(q, k, v, attn_mask=bias)).all()


@pytest.mark.parametrize(
    ("n_heads", "fov", "names", "all_direction_heads"),
    [
        (4, 180, ["N", "S", "W", "E"], 0),  # lowbit's small ViTs: one family of halves
        (6, 90, ["NW", "NE", "SW", "SE"], 2),
        (8, 180, ["N", "S", "W", "E", "NE", "NW", "SE", "SW"], 0),
        (12, 180, ["N", "S", "W", "E", "NE", "NW", "SE", "SW"], 4),  # the paper's ViT-B layout
        (16, 90, ["NW", "NE", "SW", "SE"] * 2 + ["N", "S", "W", "E"] * 2, 0),
    ],
)
def test_auto_layout_takes_whole_copies_of_the_cones_and_gives_the_rest_every_direction(
    n_heads, fov, names, all_direction_heads
):
    layout = head_layout(n_heads, fov)  # directions and unmasked_heads "auto", the defaults
    assert [name for name, cone, _ in layout if cone is not None] == names
    assert sum(cone is None for _, cone, _ in layout) == all_direction_heads and len(layout) == n_heads
