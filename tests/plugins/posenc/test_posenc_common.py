"""Every registered positional encoding: attention forward/backward, state dict, longer and 2-D evaluation, GPT, YAML."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

import lowbit.recipes
from lowbit.nn.posenc import PositionalEncoding, positions_1d, positions_2d
from lowbit.registry import registry

NAMES = registry.names("posenc")
TEXT = [name for name in NAMES if 1 in registry.load("posenc", name).pos_dims]  # lookhere: image grids only
CONTEXT = {"dim": 32, "n_heads": 4, "head_dim": 8, "max_len": 16}
CONTEXT_KEYS = ("dim", "n_heads", "head_dim", "max_len", "grid")


def _build(name: str, grid: tuple[int, int] | None = None, seed: int = 0) -> PositionalEncoding:
    """Build by name as a trunk would; image encodings get causal=false when they take it."""
    torch.manual_seed(seed)
    takes_causal = "causal" in inspect.signature(registry.load("posenc", name)).parameters
    options = {"causal": False} if grid is not None and takes_causal else {}
    return registry.build("posenc", {"name": name, **options}, **CONTEXT, grid=grid)


def _attend(pe: PositionalEncoding, x: torch.Tensor, pos: torch.Tensor, qkv: nn.Linear, causal: bool) -> torch.Tensor:
    """A minimal multi-head attention driven through the protocol: embed, rotate, bias, SDPA."""
    B, T, C = x.shape
    nh = CONTEXT["n_heads"]
    x = pe.embed(x, pos)  # (B, T, C)
    q, k, v = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in qkv(x).split(C, dim=2))  # (B, nh, T, hs)
    q, k = pe.rotate(q, k, pos)
    bias = pe.bias(pos, pos)  # (nh, T, T) or None
    if bias is None:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    else:
        if causal:
            bias = bias.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
    return y.transpose(1, 2).reshape(B, T, C)


def _assert_gradients_match_finite_differences(
    loss64: Callable[[], torch.Tensor], tensors64: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]
) -> None:
    """Each autograd gradient in ``grads`` (float32) agrees with a float64 central difference of ``loss64``:
    ⟨g, v⟩ = (L(t + h·v) − L(t − h·v)) / 2h along a random v, moving one float64 tensor t of ``tensors64`` at a time.
    h = 1e-4: the O(h²) truncation and the float64 rounding (~1e-12) are far below float32's ~1e-6 relative error."""
    gen, h = torch.Generator().manual_seed(0), 1e-4
    assert set(grads) == set(tensors64)
    for name, t in tensors64.items():
        v = torch.randn(t.shape, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            t.add_(h * v)
            up = float(loss64())
            t.sub_(2 * h * v)
            down = float(loss64())
            t.add_(h * v)
        g = grads[name].double()
        # a gradient off by more than ~1e-4 of its size moves ⟨g, v⟩ by more than this
        along = float((g * v).sum())
        tolerance = 1e-4 * abs(along) + 1e-6 * float(g.norm() * v.norm())
        assert along == pytest.approx((up - down) / (2 * h), abs=tolerance), name


def _double_copy(pe: PositionalEncoding, qkv: nn.Linear) -> tuple[PositionalEncoding, nn.Linear]:
    """float64 copies of an encoding and its projection, for the finite differences."""
    return copy.deepcopy(pe).double(), copy.deepcopy(qkv).double()


@pytest.mark.parametrize("name", TEXT)
def test_forward_backward_state_dict_and_longer_text(name):
    pe = _build(name)
    assert pe.lowbit_plugin_api == 1
    torch.manual_seed(1)
    qkv = nn.Linear(32, 96)
    x = torch.randn(2, 16, 32, requires_grad=True)
    pe64, qkv64 = _double_copy(pe, qkv)
    y = _attend(pe, x, positions_1d(16), qkv, causal=True)
    assert y.shape == (2, 16, 32) and torch.isfinite(y).all()
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for pname, p in pe.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname
    # the gradients are the derivatives: the input's and every parameter's, against finite differences
    x64 = x.detach().double()
    _assert_gradients_match_finite_differences(
        lambda: _attend(pe64, x64, positions_1d(16), qkv64, causal=True).square().mean(),
        {"x": x64, **dict(pe64.named_parameters())},
        {"x": x.grad, **{pname: p.grad for pname, p in pe.named_parameters()}},
    )

    # state-dict round trip: a differently seeded copy loaded from it gives the same outputs
    other = _build(name, seed=123)
    other.load_state_dict(pe.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(
            _attend(other, x, positions_1d(16), qkv, True), _attend(pe, x, positions_1d(16), qkv, True), rtol=0, atol=0
        )

    # evaluation at 2.5× the training length
    pe.eval()
    x_long = torch.randn(1, 40, 32)
    with torch.inference_mode():
        long = _attend(pe, x_long, positions_1d(40), qkv, causal=True)
        prefix = _attend(pe, x_long[:, :16], positions_1d(16), qkv, causal=True)
    assert long.shape == (1, 40, 32) and torch.isfinite(long).all()
    if name == "learned":  # its 16-row table is stretched over the 40 positions: the first 16 move too
        assert not torch.allclose(long[:, :16], prefix, atol=1e-3)
    else:  # causal attention: the first 16 outputs see only the first 16 tokens, at unchanged positions
        torch.testing.assert_close(long[:, :16], prefix, rtol=0, atol=1e-6)
    # ... and training again afterwards (nothing built under inference_mode leaks into autograd)
    pe.train()
    _attend(pe, x, positions_1d(16), qkv, causal=True).sum().backward()


@pytest.mark.parametrize("name", NAMES)
def test_image_grids_train_and_evaluate_larger(name):
    pe = _build(name, grid=(4, 4))
    if 2 not in pe.pos_dims:
        with pytest.raises(Exception, match="takes 1-D positions, got 2-D"):
            _attend(pe, torch.randn(1, 16, 32), positions_2d(4, 4), nn.Linear(32, 96), causal=False)
        return
    torch.manual_seed(2)
    qkv = nn.Linear(32, 96)
    x = torch.randn(2, 16, 32, requires_grad=True)
    pe64, qkv64 = _double_copy(pe, qkv)
    y = _attend(pe, x, positions_2d(4, 4), qkv, causal=False)
    assert torch.isfinite(y).all()
    y.square().mean().backward()
    for pname, p in pe.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname
    x64 = x.detach().double()
    _assert_gradients_match_finite_differences(
        lambda: _attend(pe64, x64, positions_2d(4, 4), qkv64, causal=False).square().mean(),
        {"x": x64, **dict(pe64.named_parameters())},
        {"x": x.grad, **{pname: p.grad for pname, p in pe.named_parameters()}},
    )
    if name != "none":  # positions matter: shuffling the tokens' grid positions changes the output
        swapped = positions_2d(4, 4)[torch.randperm(16, generator=torch.Generator().manual_seed(0))]
        with torch.no_grad():
            assert not torch.allclose(_attend(pe, x, swapped, qkv, False), y)
    with torch.no_grad():
        big = _attend(pe, torch.randn(1, 30, 32), positions_2d(6, 5), qkv, causal=False)
    assert big.shape == (1, 30, 32) and torch.isfinite(big).all()


@pytest.mark.parametrize("name", TEXT)
def test_tiny_gpt_trains_round_trips_and_evaluates_longer(name):
    from lowbit.models.gpt import GPT

    torch.manual_seed(3)
    model = GPT(vocab_size=256, dim=32, n_layers=2, n_heads=4, max_len=16, posenc={"name": name})
    idx = torch.randint(0, 256, (2, 16))
    logits = model(idx)
    assert logits.shape == (2, 16, 256)
    F.cross_entropy(logits.flatten(0, 1), idx.roll(-1, 1).flatten()).backward()
    for pname, p in model.posenc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    model.eval()
    longer = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        logits = model(longer)
        prefix = model(longer[:, :16])
    assert logits.shape == (1, 40, 256) and torch.isfinite(logits).all()
    if name != "learned":  # a causal LM's first 16 logits see only the first 16 bytes (learned stretches its table)
        torch.testing.assert_close(logits[:, :16], prefix, rtol=0, atol=1e-5)

    # state-dict round trip of the whole GPT: a differently seeded copy gives the same logits, longer length too
    torch.manual_seed(4)
    other = GPT(vocab_size=256, dim=32, n_layers=2, n_heads=4, max_len=16, posenc={"name": name}).eval()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(other(longer), logits, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_component_yaml_lists_every_option_with_its_default(name):
    path = Path(lowbit.recipes.__file__).parent / "posenc" / f"{name}.yaml"
    config = OmegaConf.to_container(OmegaConf.load(path))
    assert config.pop("name") == name
    params = inspect.signature(registry.load("posenc", name)).parameters
    defaults = {k: p.default for k, p in params.items() if k not in CONTEXT_KEYS}
    assert config == defaults
    text = path.read_text().splitlines()
    for key in config:  # one comment line above each option
        line = next(i for i, s in enumerate(text) if s.startswith(f"{key}:"))
        assert text[line - 1].startswith("#"), key
    registry.build("posenc", {"name": name, **config}, **CONTEXT, grid=None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", TEXT)
def test_tiny_gpt_on_cuda_under_bf16_autocast(name):
    from lowbit.models.gpt import GPT

    model = GPT(vocab_size=256, dim=32, n_layers=2, n_heads=4, max_len=16, posenc={"name": name}).cuda()
    idx = torch.randint(0, 256, (2, 16), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(idx)
    F.cross_entropy(logits.float().flatten(0, 1), idx.roll(-1, 1).flatten()).backward()
    assert torch.isfinite(logits).all()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.isfinite(model(torch.randint(0, 256, (1, 40), device="cuda"))).all()
