"""PaTH (Yang et al. 2025): the blockwise algorithm equals the definition, β = 0 is NoPE bit for bit, gradients
are right, and a PaTH GPT (and DEQ GPT) trains, stays causal and quantizes its projections."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lowbit.errors import LowbitError
from lowbit.nn.attention import SelfAttention
from lowbit.nn.posenc import positions_1d
from lowbit.plugins.posenc.path import (
    PaTH,
    PaTHProjections,
    path_attention,
    path_attention_reference,
    path_logit_corrections,
    path_logits_reference,
)
from lowbit.quant import QuantLinear, convert_linears, quant_layers
from lowbit.registry import PluginInfo, registry

TINY_GPT = dict(vocab_size=256, dim=32, n_layers=2, n_heads=2, max_len=16)


@pytest.fixture
def path_registered():
    """``posenc=path`` by name before the lead adds its entry point (a no-op once it is installed)."""
    infos = registry.infos("posenc")
    if "path" in infos:
        yield
        return
    infos["path"] = PluginInfo("posenc", "path", "lowbit.plugins.posenc.path:PaTH", "lowbit", "dev")
    try:
        yield
    finally:
        registry.refresh()  # forget the stand-in: a later lookup sees only what is installed


def _inputs(B=2, nh=2, T=7, d=4, seed=0, dtype=torch.float64):
    """q, k, v (B, nh, T, d), unit w (B, nh, T, d) and β (B, nh, T) in (0, 2)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v, w = (torch.randn(B, nh, T, d, generator=gen, dtype=dtype) for _ in range(4))
    beta = 2 * torch.rand(B, nh, T, generator=gen, dtype=dtype)
    return q, k, v, F.normalize(w, dim=-1), beta


def _path_logits(q, k, w, beta, chunk_size):
    """q·k − Δ with −inf above the diagonal: the blockwise logits, comparable with the reference's."""
    T = q.shape[-2]
    logits = q @ k.transpose(-1, -2) - path_logit_corrections(q, k, w, beta, chunk_size)
    return logits.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))


# ---- the definition and the blockwise algorithm --------------------------------------------------


def test_reference_multiplies_the_householders_between_key_and_query_latest_next_to_the_query():
    q, k, _, w, beta = _inputs(B=1, nh=1, T=4, d=3)
    H = [torch.eye(3, dtype=torch.float64) - beta[0, 0, t] * torch.outer(w[0, 0, t], w[0, 0, t]) for t in range(4)]
    logits = path_logits_reference(q, k, w, beta)[0, 0]  # (T, T)
    qi, kj = q[0, 0], k[0, 0]
    assert logits[3, 0].item() == pytest.approx((qi[3] @ H[3] @ H[2] @ H[1] @ kj[0]).item(), abs=1e-14)
    assert logits[3, 3].item() == pytest.approx((qi[3] @ kj[3]).item(), abs=1e-14)  # j = i: no product
    assert logits[2, 1].item() == pytest.approx((qi[2] @ H[2] @ kj[1]).item(), abs=1e-14)
    assert torch.isinf(logits[1, 2]) and logits[1, 2] < 0  # a key after the query
    assert abs((qi[3] @ H[1] @ H[2] @ H[3] @ kj[0]) - logits[3, 0]) > 1e-3  # the order matters


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("T", [1, 5, 7, 16, 17])
def test_blockwise_equals_the_definition_in_float64(T, chunk_size):
    q, k, v, w, beta = _inputs(T=T, seed=T)
    reference = path_logits_reference(q, k, w, beta)
    torch.testing.assert_close(_path_logits(q, k, w, beta, chunk_size), reference, rtol=0, atol=1e-10)
    out = path_attention(q, k, v, w, beta, chunk_size)
    torch.testing.assert_close(out, path_attention_reference(q, k, v, w, beta), rtol=0, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 2),
    nh=st.integers(1, 3),
    T=st.integers(1, 12),
    d=st.integers(1, 5),
    chunk_size=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_blockwise_equals_the_definition_on_random_shapes(B, nh, T, d, chunk_size, seed):
    q, k, v, w, beta = _inputs(B, nh, T, d, seed)
    out = path_attention(q, k, v, w, beta, chunk_size)
    torch.testing.assert_close(out, path_attention_reference(q, k, v, w, beta), rtol=0, atol=1e-10)


def test_beta_zero_is_nope_bit_for_bit():
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        q, k, v, w, _ = _inputs(T=17, d=8, dtype=dtype)
        q.requires_grad_()
        beta = torch.zeros(q.shape[:3], dtype=dtype, requires_grad=True)
        out = path_attention(q, k, v, w, beta, chunk_size=4)
        assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, is_causal=True)), dtype
        assert not path_logit_corrections(q, k, w, beta, 4).any()


def test_an_additive_bias_is_added_to_the_logits():
    """The trunk's folded bias (causal −inf included) passes through, as for SDPA, with its gradient."""
    q, k, v, w, beta = _inputs(T=9)
    bias = torch.randn(2, 9, 9, dtype=torch.float64).masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), -torch.inf)
    logits = path_logits_reference(q, k, w, beta) / 2.0 + bias  # d = 4: 1/sqrt(d) = 1/2
    torch.testing.assert_close(
        path_attention(q, k, v, w, beta, 4, attn_mask=bias), torch.softmax(logits, -1) @ v, rtol=0, atol=1e-10
    )
    bias = bias.requires_grad_()
    assert torch.autograd.gradcheck(lambda b: path_attention(q, k, v, w, beta, 4, attn_mask=b), (bias,))


def test_gradients_pass_gradcheck_and_gradgradcheck():
    q, k, v, w, beta = (t.requires_grad_() for t in _inputs(B=1, nh=2, T=6, d=3))
    for chunk_size in (1, 4):  # 4: two chunks, the second padded

        def attention(*tensors, chunk_size=chunk_size):
            return path_attention(*tensors, chunk_size)

        assert torch.autograd.gradcheck(attention, (q, k, v, w, beta))
    # a double backward (the DEQ's Jacobian regulariser differentiates a vector-Jacobian product)
    assert torch.autograd.gradgradcheck(lambda *t: path_attention(*t, 4), (q, k, v, w, beta))


# ---- the module in models ------------------------------------------------------------------------


def test_projections_give_unit_w_and_beta_in_zero_two_and_are_causal():
    torch.manual_seed(0)
    projections = PaTHProjections(dim=32, n_heads=2, w_rank=8, conv_size=3)
    x = torch.randn(2, 10, 32)
    w, beta = projections(x)
    assert w.shape == (2, 2, 10, 16) and beta.shape == (2, 2, 10) and w.dtype == beta.dtype == torch.float32
    # unit up to the 1e-12 guard: ‖v‖ is ~1e-4 at this small init, least at token 0 (the convolution's padding)
    torch.testing.assert_close(w.norm(dim=-1), torch.ones(2, 2, 10), rtol=0, atol=1e-3)
    assert ((beta > 0) & (beta < 2)).all()
    later = x.clone()
    later[:, 6:] += 1.0  # tokens 6.. change: the convolution reaches back only
    w2, beta2 = projections(later)
    assert torch.equal(w2[:, :, :6], w[:, :, :6]) and torch.equal(beta2[:, :, :6], beta[:, :, :6])
    assert not torch.allclose(w2[:, :, 6], w[:, :, 6])


@pytest.mark.usefixtures("path_registered")
def test_gpt_with_zero_beta_is_the_nope_gpt_bit_for_bit():
    torch.manual_seed(0)
    with_path = _gpt(posenc="path")
    nope = _gpt(posenc="none")
    state = {name: p for name, p in with_path.state_dict().items() if ".attn.path." not in name}
    nope.load_state_dict(state)
    with torch.no_grad():
        for block in with_path.trunk.blocks:
            block.attn.path.beta.weight.zero_()
            block.attn.path.beta.bias.fill_(float("-inf"))  # β = 2·sigmoid(−∞) = 0: every H_t = I
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    assert torch.equal(with_path(idx), nope(idx))


def _gpt(**options):
    from lowbit.models.gpt import GPT

    return GPT(**{**TINY_GPT, **options})


@pytest.mark.usefixtures("path_registered")
def test_gpt_trains_is_causal_and_keeps_its_init():
    torch.manual_seed(0)
    model = _gpt(posenc={"name": "path", "chunk_size": 4})
    names = {name for name, _ in model.named_parameters() if ".attn.path." in name}
    assert names == {
        f"trunk.blocks.{i}.attn.path.{p}"
        for i in range(2)
        for p in ("w.0.weight", "w.1.weight", "conv.weight", "beta.weight", "beta.bias")
    }
    # GPT-2's init re-draws the authors' N(0, 0.02) weights and zero biases: β starts at 2·sigmoid(0) = 1
    for block in model.trunk.blocks:
        path = block.attn.path
        assert torch.equal(path.beta.bias, torch.zeros(2))
        for weight in (path.w[0].weight, path.w[1].weight, path.beta.weight):
            assert 0.012 < weight.std().item() < 0.028
    idx = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(5):
        loss = F.cross_entropy(model(idx).flatten(0, 1), idx.roll(-1, 1).flatten())
        optimizer.zero_grad()
        loss.backward()
        if not losses:
            grads = [p.grad for n, p in model.named_parameters() if n in names]
            assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.2, losses
    model.eval()
    later = idx.clone()
    later[:, 9:] = (later[:, 9:] + 1) % 256  # tokens 9.. change: logits 0..8 must not
    with torch.no_grad():
        assert torch.equal(model(later)[:, :9], model(idx)[:, :9])


@pytest.mark.usefixtures("path_registered")
def test_deq_gpt_attaches_to_its_cell_and_trains():
    from lowbit.models.deq import DEQGPT

    torch.manual_seed(0)
    model = DEQGPT(vocab_size=256, dim=32, n_heads=2, max_len=16, posenc="path", deq={"max_iter": 4})
    assert isinstance(model.equilibrium.f.block.attn.path, PaTHProjections)
    model(torch.randint(0, 256, (2, 16))).float().logsumexp(-1).sum().backward()
    path = model.equilibrium.f.block.attn.path
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in path.parameters())
    assert path.beta.weight.grad.abs().sum() > 0


@pytest.mark.usefixtures("path_registered")
def test_nvfp4_converts_the_projections_and_the_forward_stays_finite():
    torch.manual_seed(0)
    model = _gpt(posenc={"name": "path", "w_rank": 16})
    nvfp4 = registry.build("precision", "nvfp4", device_type="cpu").recipe
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = convert_linears(model, nvfp4, keep=["lm_head"], backend="emulate")
    converted = set(quant_layers(model))
    for i in range(2):
        assert {f"trunk.blocks.{i}.attn.path.w.0", f"trunk.blocks.{i}.attn.path.w.1"} <= converted
        assert isinstance(model.trunk.blocks[i].attn.path.w[1], QuantLinear)
    # β's projection has one output per head (2): not a multiple of NVFP4's 16-element blocks
    assert report.misfit == ["trunk.blocks.0.attn.path.beta (2x32)", "trunk.blocks.1.attn.path.beta (2x32)"]
    assert any("kept 2 Linear layer(s) in high precision" in str(w.message) for w in caught)
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    logits = model(idx)
    assert torch.isfinite(logits).all()
    F.cross_entropy(logits.flatten(0, 1), idx.roll(-1, 1).flatten()).backward()
    assert torch.isfinite(model.trunk.blocks[0].attn.path.w[0].weight.grad).all()


def test_registry_builds_path_by_name():
    """Passes once pyproject.toml's ``lowbit.posenc`` entry points name ``path``."""
    posenc = registry.build("posenc", "path", dim=32, n_heads=2, head_dim=16, max_len=16, grid=None)
    assert isinstance(posenc, PaTH) and posenc.chunk_size == 64 and posenc.w_rank == 32 and posenc.conv_size == 3
    assert isinstance(_gpt(posenc="path").trunk.blocks[1].attn.path, PaTHProjections)


# ---- errors --------------------------------------------------------------------------------------


def test_bidirectional_use_and_bad_options_are_one_line_errors():
    posenc = PaTH(dim=8, n_heads=2, head_dim=4)
    attn = SelfAttention(8, n_heads=2)
    x = torch.randn(1, 5, 8)
    with pytest.raises(LowbitError, match="path found no projections on SelfAttention: the model must call"):
        attn(x, positions_1d(5), posenc, None, causal=True)
    posenc.attach(attn)
    assert attn(x, positions_1d(5), posenc, None, causal=True).shape == (1, 5, 8)
    with pytest.raises(LowbitError, match="path is defined for causal attention only") as err:
        attn(x, positions_1d(5), posenc, None, causal=False)
    assert "\n" not in str(err.value)
    with pytest.raises(LowbitError, match="takes 1-D positions, got 2-D"):
        posenc.bias(torch.zeros(4, 2, dtype=torch.long), torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(
        LowbitError, match=r"path chunk_size must be an integer ≥ 1 \(64 as in the authors' code\), got 0"
    ):
        PaTH(dim=8, n_heads=2, head_dim=4, chunk_size=0)
    with pytest.raises(LowbitError, match="path conv_size must be an integer ≥ 0"):
        PaTH(dim=8, n_heads=2, head_dim=4, conv_size=-1)


@pytest.mark.usefixtures("path_registered")
def test_image_models_refuse_path_in_one_line():
    with pytest.raises(
        LowbitError, match="positional encoding PaTH takes 1-D \\(text\\) positions only; a ViT needs"
    ) as err:
        registry.build(
            "models", {"name": "vit", "image_size": 8, "patch_size": 4, "dim": 32, "n_heads": 2}, posenc="path"
        )
    assert "\n" not in str(err.value)


def test_attach_adds_nothing_for_other_encodings():
    from lowbit.nn.attention import attach_posenc
    from lowbit.plugins.posenc.none import NoPE

    attn = SelfAttention(8, n_heads=2)
    before = dict(attn.named_parameters())
    attach_posenc(nn.Sequential(attn), NoPE())
    assert dict(attn.named_parameters()).keys() == before.keys()
