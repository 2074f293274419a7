"""Contract tests over the plugin registry: every installed precision, posenc, model, data and
layers plugin, built-in or third-party, gets them for free (as timm's ``tests/test_models.py``
parametrizes over its model registry).

Each plugin must build from its default config (its YAML, or the config the registry generates
from its constructor, composed exactly as ``train`` does, with ``debug=smoke`` sizes), round-trip
its state, and keep its group's protocol: the shapes ``lowbit.nn.posenc``, the models, the data
modules and the equilibrium layers document.
"""

from __future__ import annotations

import copy
import functools
import importlib.resources
import inspect

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.plugins.precision import Precision
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

from lowbit.config import compose, list_recipes, plain
from lowbit.errors import LowbitError
from lowbit.models.deq import EquilibriumCell
from lowbit.nn.posenc import PositionalEncoding, positions_1d, positions_2d
from lowbit.nn.transformer import attention_mask
from lowbit.plugins.precision.int4 import Int4Precision
from lowbit.quant.qat import QATPrecision
from lowbit.registry import CONFIG_GROUPS, registry

CONFIG_GROUP = {plugin_group: config_group for config_group, plugin_group in CONFIG_GROUPS.items()}
"""Plugin group -> the config group that selects it (``models`` -> ``model``)."""


# ---- default configs ---------------------------------------------------------------------------


@functools.cache
def _composed(overrides: tuple[str, ...]):
    return compose(list(overrides)).cfg


def _user_inputs(group: str, name: str, tmp_path) -> list[str]:
    """Overrides for the options a built-in plugin's default config leaves to the user (``???``,
    or a recipe that quantizes nothing until told what): tiny local files, never a download."""
    if (group, name) == ("data", "text"):
        path = tmp_path / "corpus.txt"
        path.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(80)))
        return [f"data.path='{path}'", f"data.cache_dir='{tmp_path / 'cache'}'"]
    if (group, name) == ("data", "imagefolder"):
        root = tmp_path / "images"
        rng = torch.Generator().manual_seed(0)
        for split, count in (("train", 4), ("val", 2)):
            for label in ("cat", "dog"):
                folder = root / split / label
                folder.mkdir(parents=True)
                for i in range(count):
                    pixels = torch.randint(0, 256, (12, 12, 3), generator=rng, dtype=torch.uint8).numpy()
                    Image.fromarray(pixels).save(folder / f"{i}.png")
        return [f"data.root='{root}'", "data.num_classes=2"]
    if (group, name) == ("precision", "custom"):
        return ["precision.fprop.x={preset: mxfp8_e4m3}", "precision.fprop.w={preset: mxfp8_e4m3}"]
    return []


def _default_config(group: str, name: str, tmp_path=None) -> dict:
    """The plugin's config as ``train {group}={name} debug=smoke`` composes it (YAML where the
    plugin ships one, else the registry's generated config), with user inputs filled in."""
    config_group = CONFIG_GROUP[group]
    inputs = _user_inputs(group, name, tmp_path) if tmp_path is not None else []
    cfg = _composed((f"{config_group}={name}", "debug=smoke", *inputs))
    missing = sorted(OmegaConf.missing_keys(cfg[config_group]))
    if missing:
        pytest.skip(f"{group} '{name}' leaves {', '.join(missing)} to the user; add a value to _user_inputs")
    return plain(cfg[config_group])


def _recipe_choosing(model: str) -> str | None:
    """The first recipe whose defaults select this model (its data and posenc are the model's own)."""
    for recipe, _, package in list_recipes():
        text = (importlib.resources.files(package) / "recipe" / f"{recipe}.yaml").read_text()
        defaults = (yaml.safe_load(text) or {}).get("defaults", [])
        if any(isinstance(d, dict) and d.get("override /model") == model for d in defaults):
            return recipe
    return None


def _model_run_config(name: str) -> dict:
    """(model, posenc, data) configs of a smoke run of this model: its recipe's, else the default
    run's with text data, else with image data (models whose config reads ``data.image_size``)."""
    recipe = _recipe_choosing(name)
    attempts = [(f"recipe={recipe}",)] if recipe else [(f"model={name}",), (f"model={name}", "data=digits")]
    for overrides in attempts[:-1]:
        try:
            return _run_groups(overrides)
        except LowbitError:  # an interpolation the default data cannot fill (data.image_size)
            continue
    return _run_groups(attempts[-1])


def _run_groups(overrides: tuple[str, ...]) -> dict:
    cfg = _composed((*overrides, "debug=smoke"))
    return {group: plain(cfg[group]) for group in ("model", "posenc", "data")}


def _same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def _same_nested(a, b) -> bool:
    """Deep equality of state dicts holding tensors, mappings, sequences and scalars."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_nested(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_nested(x, y) for x, y in zip(a, b))
    return a == b


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().float(), ref.detach().float()
    return float((out - ref).norm() / ref.norm())


# ---- precision ---------------------------------------------------------------------------------


def _small_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))  # widths divide every block size


def _quantizes_forward(precision: Precision) -> bool:
    if isinstance(precision, (QATPrecision, Int4Precision)):  # fake-quantized or INT4 operands in the forward
        return True
    recipe = getattr(precision, "recipe", None)
    return recipe is not None and recipe.fprop.quantized


@pytest.mark.parametrize("name", registry.names("precision"))
def test_precision_converts_a_module_and_round_trips_its_state(name, tmp_path):
    config = _default_config("precision", name, tmp_path)
    precision = registry.build("precision", config, device_type="cpu")
    assert isinstance(precision, Precision)

    reference = _small_mlp()
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(x)  # (16, 64) FP32, unquantized
    module = copy.deepcopy(reference)
    assert precision.convert_module(module) is module  # in place: DDP discards the return value
    assert all(p.dtype == torch.float32 for p in module.parameters())  # master weights stay FP32

    torch.manual_seed(2)  # any stochastic rounding draws the same bits in both forwards below
    with precision.forward_context():
        out = module(x)
        with torch.no_grad():
            autocast_only = reference(x)  # the same compute dtype, nothing quantized
    assert not torch.is_autocast_enabled("cpu")  # forward_context restored autocast on exit
    assert out.shape == (16, 64) and torch.isfinite(out).all()
    error = _relative_error(out, expected)
    if _quantizes_forward(precision):
        assert _relative_error(out, autocast_only) > 0, f"{name}: the converted forward is not quantized"
        assert error < 0.5, f"{name}: relative error {error:.4f} of the quantized forward"
    else:
        assert error < 0.02, f"{name}: relative error {error:.4f} of a high-precision forward"

    out.float().square().mean().backward()
    grads = [p.grad for p in module.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0

    # state: saved, restored into a fresh plugin before conversion (as Lightning restores a checkpoint)
    state = precision.state_dict()
    fresh = registry.build("precision", config, device_type="cpu")
    fresh.load_state_dict(copy.deepcopy(state))
    other = copy.deepcopy(reference)
    fresh.convert_module(other)
    assert _same_nested(fresh.state_dict(), state)
    torch.manual_seed(2)
    with fresh.forward_context():
        again = other(x)
    assert torch.equal(again, out)


# ---- positional encodings ----------------------------------------------------------------------

POSENC_DIM, POSENC_HEADS, GRID = 32, 4, (4, 4)  # 4 heads: lookhere's smallest layout


def _build_posenc(config: dict, ndim: int) -> PositionalEncoding:
    """With the context the models pass: GPT's for text, ``build_grid_posenc``'s for image grids
    (where a ``causal`` option is set false, as the posenc YAMLs say images need)."""
    context = {"dim": POSENC_DIM, "n_heads": POSENC_HEADS, "head_dim": POSENC_DIM // POSENC_HEADS}
    if ndim == 1:
        return registry.build("posenc", config, **context, max_len=16, grid=None)
    if "causal" in config:
        config = {**config, "causal": False}
    return registry.build("posenc", config, **context, max_len=GRID[0] * GRID[1], grid=GRID, causal=False)


def _posenc_outputs(enc: PositionalEncoding, pos: torch.Tensor) -> dict:
    gen = torch.Generator().manual_seed(3)
    T, hs = pos.shape[0], POSENC_DIM // POSENC_HEADS
    x = torch.randn(2, T, POSENC_DIM, generator=gen)  # (B, T, C)
    q = torch.randn(2, POSENC_HEADS, T, hs, generator=gen)  # (B, nh, T, hs)
    k = torch.randn(2, POSENC_HEADS, T, hs, generator=gen)
    rq, rk = enc.rotate(q, k, pos)
    return {
        "embed": enc.embed(x, pos),
        "rotate_q": rq,
        "rotate_k": rk,
        "bias": enc.bias(pos, pos),
        "bias_last4": enc.bias(pos[-4:], pos),  # Tq != Tk: the last queries against every key
    }


@pytest.mark.parametrize("ndim", (1, 2))
@pytest.mark.parametrize("name", registry.names("posenc"))
def test_posenc_keeps_the_protocol_shapes_and_round_trips_its_state(name, ndim):
    config = _default_config("posenc", name)
    torch.manual_seed(0)
    enc = _build_posenc(config, ndim)
    assert isinstance(enc, PositionalEncoding)
    pos = positions_1d(16) if ndim == 1 else positions_2d(*GRID)  # (T,) or (T, 2)
    if ndim not in enc.pos_dims:
        with pytest.raises(LowbitError, match=f"takes .*positions, got {ndim}-D"):
            enc.check_positions(pos)
        return
    T, nh, hs = pos.shape[0], POSENC_HEADS, POSENC_DIM // POSENC_HEADS
    out = _posenc_outputs(enc, pos)
    assert out["embed"].shape == (2, T, POSENC_DIM) and out["embed"].dtype == torch.float32
    assert out["rotate_q"].shape == out["rotate_k"].shape == (2, nh, T, hs)
    for key, expected_shape in (("bias", (nh, T, T)), ("bias_last4", (nh, 4, T))):
        assert out[key] is None or out[key].shape == expected_shape, key
    for key, value in out.items():
        if key.startswith("bias") and value is not None:  # −inf masks a key (lookhere); every query sees one
            assert not value.isnan().any() and (value < float("inf")).all() and value.isfinite().any(-1).all(), key
        else:
            assert value is None or torch.isfinite(value).all(), key

    torch.manual_seed(1)  # a fresh instance starts from other parameters
    fresh = _build_posenc(config, ndim)
    fresh.load_state_dict(enc.state_dict())
    _same_state(fresh.state_dict(), enc.state_dict())
    for key, value in _posenc_outputs(fresh, pos).items():
        assert (value is None and out[key] is None) or torch.equal(value, out[key]), key


# ---- models ------------------------------------------------------------------------------------


def _model_inputs(model: nn.Module, model_cfg: dict, data_cfg: dict):
    """Inputs of the documented forward and the output shape it documents:
    LM idx (B, T) -> (B, T, vocab); classifier images (B, C, H, W) -> (B, num_classes);
    diffusion (x (B, C, H, W), t (B,), y (B,)) -> like x."""
    gen = torch.Generator().manual_seed(4)
    B = 2
    if "seq_len" in data_cfg:  # text data: a causal LM
        T, vocab = min(8, data_cfg["seq_len"]), model_cfg["vocab_size"]
        return (torch.randint(0, vocab, (B, T), generator=gen),), (B, T, vocab)
    C, S, classes = data_cfg["in_chans"], data_cfg["image_size"], data_cfg["num_classes"]
    images = torch.randn(B, C, S, S, generator=gen)
    if "t" in inspect.signature(model.forward).parameters:  # an ε-prediction model
        t = torch.randint(0, 1000, (B,), generator=gen)
        y = torch.randint(0, classes, (B,), generator=gen)
        return (images, t, y), (B, C, S, S)
    return (images,), (B, classes)


@pytest.mark.parametrize("name", registry.names("models"))
def test_model_gives_the_documented_shape_and_round_trips_its_state(name):
    cfg = _model_run_config(name)
    torch.manual_seed(0)
    model = registry.build("models", cfg["model"], posenc=cfg["posenc"])
    assert isinstance(model, nn.Module)
    inputs, expected_shape = _model_inputs(model, cfg["model"], cfg["data"])

    model.eval()
    with torch.no_grad():
        out = model(*inputs)
    assert out.shape == expected_shape and torch.isfinite(out).all()

    torch.manual_seed(1)  # a fresh instance starts from other weights
    fresh = registry.build("models", cfg["model"], posenc=cfg["posenc"]).eval()
    fresh.load_state_dict(model.state_dict())
    _same_state(fresh.state_dict(), model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(*inputs), out)

    model.train()
    torch.manual_seed(5)
    out = model(*inputs).float()
    # a loss linear in the output: adaLN-Zero models (DiT) start with a zero output, where out² has no gradient
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(7))).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


# ---- data --------------------------------------------------------------------------------------


def _check_batch(batch, config: dict, batch_size: int, dm) -> None:
    if "seq_len" in config:  # byte-level LM windows: x (B, T) ids, y shifted by one
        x, y = batch
        assert x.shape == y.shape and x.shape[1] == config["seq_len"] and 1 <= x.shape[0] <= batch_size
        assert x.dtype == y.dtype == torch.int64
        assert int(x.min()) >= 0 and int(x.max()) < getattr(dm, "vocab_size", 256)
        assert torch.equal(y[:, :-1], x[:, 1:])
    elif "image_size" in config:  # labelled images: (B, C, S, S) float, (B,) class ids
        images, labels = batch
        S = config["image_size"]
        assert images.shape[1:] == (config["in_chans"], S, S) and 1 <= images.shape[0] <= batch_size
        assert images.dtype == torch.float32 and torch.isfinite(images).all()
        assert labels.shape == images.shape[:1] and labels.dtype == torch.int64
        assert int(labels.min()) >= 0 and int(labels.max()) < config["num_classes"]
    else:
        pytest.skip(f"data config {sorted(config)} names neither seq_len nor image_size; no documented batch")


@pytest.mark.parametrize("name", registry.names("data"))
def test_data_yields_batches_of_the_documented_shapes(name, tmp_path):
    config = _default_config("data", name, tmp_path)
    seed = 1337
    dm = registry.build("data", config, seed=seed)
    assert isinstance(dm, L.LightningDataModule)
    dm.prepare_data()
    dm.setup("fit")
    train = next(iter(dm.train_dataloader()))
    val = next(iter(dm.val_dataloader()))
    _check_batch(train, config, config["batch_size"], dm)
    assert train[0].shape[0] == config["batch_size"]  # the endless training stream never runs short
    _check_batch(val, config, config.get("val_batch_size") or config["batch_size"], dm)

    again = registry.build("data", config, seed=seed)
    again.prepare_data()
    again.setup("fit")
    for a, b in zip(train, next(iter(again.train_dataloader()))):
        assert torch.equal(a, b)  # the stream is a function of the seed


# ---- layers ------------------------------------------------------------------------------------

LAYER_DIM = 16


class _Contraction(nn.Module):
    """f(z, x) = tanh(W z / 2 + x) with ‖W‖₂ = 1: Lipschitz 1/2 in z, so one fixed point exists."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(LAYER_DIM, LAYER_DIM, bias=False)
        with torch.no_grad():
            self.linear.weight /= torch.linalg.matrix_norm(self.linear.weight, ord=2)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(0.5 * self.linear(z) + x)


def _cell_and_input(cell: str):
    """(f, input injection, the tensor z is shaped like): a plain contraction, or the cell and
    input tuple the DEQ GPT hands its layer (``framework/models/deq.py``)."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 8, LAYER_DIM, generator=gen)  # (B, T, D)
    if cell == "contraction":
        return _Contraction(), x, x
    posenc = registry.build("posenc", "none")
    pos = positions_1d(8)
    inputs = (x, pos, posenc, attention_mask(posenc.bias(pos, pos), True, 8, 8), True)
    return EquilibriumCell(LAYER_DIM, 2, 8 / 3, False), inputs, x


@pytest.mark.parametrize("cell", ("contraction", "equilibrium_cell"))
@pytest.mark.parametrize("name", registry.names("layers"))
def test_layer_returns_the_input_shape_and_round_trips_its_state(name, cell):
    config = registry.default_config("layers", name)
    assert "???" not in config.values(), f"layers '{name}' needs options beyond f: {config}"
    torch.manual_seed(0)
    f, inputs, z_like = _cell_and_input(cell)
    layer = registry.build("layers", config, f=f)
    assert isinstance(layer, nn.Module)

    layer.eval()
    with torch.no_grad():
        z = layer(inputs)
        assert z.shape == z_like.shape and torch.isfinite(z).all()
        if cell == "contraction":  # its fixed point exists: the layer must find it
            fz = f(z, inputs)
            residual = float(((fz - z).flatten(1).norm(dim=1) / fz.flatten(1).norm(dim=1)).max())
            assert residual < 1e-2, f"relative residual {residual:.2e} at the returned z"

    torch.manual_seed(1)  # a fresh block starts from other weights
    fresh = registry.build("layers", config, f=_cell_and_input(cell)[0]).eval()
    fresh.load_state_dict(layer.state_dict())
    _same_state(fresh.state_dict(), layer.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(inputs), z)

    layer.train()
    out = layer(inputs)
    assert out.shape == z_like.shape
    out.square().mean().backward()
    grads = [p.grad for p in layer.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
