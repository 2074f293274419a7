"""QAT presets: each converts the debug GPT with its paper's quantizers (the head kept) and trains a
step with finite quantizer gradients; every option is a CLI override; the digits ViT and a stock
timm ViT convert; bad options are one line (exit 2); a QAT run resumes bit for bit."""

import csv
import warnings

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from lowbit.cli import train_main
from lowbit.config import compose
from lowbit.errors import LowbitError
from lowbit.numerics import get_spec
from lowbit.quant.qat import QATLinear, qat_layers
from lowbit.run import build, train

GPT_SMOKE = ["recipe=bf16_llm", "debug=smoke"]
TRUNK_LINEARS = {
    f"model.trunk.blocks.{b}.{n}" for b in (0, 1) for n in ("attn.qkv", "attn.proj", "mlp.fc_in", "mlp.fc_out")
}

INT8_ROW = {"element": "int8", "block": "row"}
INT8_TENSOR = {"element": "int8", "block": "tensor"}


def _int(bits, block=(1, 32), **extra):
    return {"element": f"int{bits}", "block": block, **extra}


# overrides -> (weight spec, weight mode), (input spec, input mode) or None: the papers' schemes
PRESETS = {
    "qat_int8 dynamic": ([], (INT8_ROW, "minmax"), (INT8_ROW, "minmax")),  # Krishnamoorthi 2018 W8A8
    "qat_int8 static": (["precision.activations=static"], (INT8_ROW, "minmax"), (INT8_TENSOR, "static")),
    "qat_int8 lsq": (
        ["precision.activations=static", "precision.lsq=true"],
        (INT8_ROW, "lsq"),
        (INT8_TENSOR, "lsq"),
    ),
    "qat_int4 W4A8": ([], (_int(4), "lsq"), (INT8_ROW, "minmax")),  # torchao's 8da4w, LSQ step sizes
    "qat_int4 weight-only": (["precision.activations=none"], (_int(4), "lsq"), None),
    "qat_int4 LSQ+": (["precision.zero_point=true"], (_int(4, asymmetric=True), "lsq"), (INT8_ROW, "minmax")),
    "qat_int4 group_size=64": (
        ["model.dim=64", "precision.group_size=64"],
        (_int(4, (1, 64)), "lsq"),
        (INT8_ROW, "minmax"),
    ),
    "qat_int4 minmax": (["precision.lsq=false"], (_int(4), "minmax"), (INT8_ROW, "minmax")),
    **{
        f"qat_int4 bits={b}": ([f"precision.bits={b}"], (_int(b), "lsq"), (INT8_ROW, "minmax"))
        for b in (2, 8)  # the ends; every width's grid below
    },
    **{  # QFX (Dong et al. 2024): one learned binary point per tensor
        f"qat_fixed bits={b}": ([f"precision.bits={b}"], (_int(b, "tensor"), "fixed"), (_int(b, "tensor"), "fixed"))
        for b in (4, 6, 8)
    },
    "qat_nvfp4": ([], ("nvfp4", "minmax"), None),
    "qat_nvfp4 activations": (["precision.activations=true"], ("nvfp4", "minmax"), ("nvfp4", "minmax")),
    "qat_mxfp4 activations": (["precision.activations=true"], ("mxfp4", "minmax"), ("mxfp4", "minmax")),
}


def _build(*overrides):
    return build(compose(list(overrides)).cfg)


def _train_step(built, x, y) -> torch.Tensor:
    """One forward and backward of the task's model in the precision's autocast; the loss."""
    with built.precision.forward_context():
        logits = built.task(x)
    loss = F.cross_entropy(logits.float().flatten(0, -2), y.flatten())
    loss.backward()
    return loss


def _check_quantizer_grads(task: nn.Module) -> int:
    """Every quantizer parameter has a finite, nonzero gradient; how many there are."""
    params = {n: p for n, p in task.named_parameters() if "_quant." in n}
    for name, p in params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    return len(params)


@pytest.mark.parametrize("case", PRESETS)
def test_each_preset_converts_the_gpt_and_trains_a_step(case):
    overrides, (w_spec, w_mode), inputs = PRESETS[case]
    name = case.split()[0]
    built = _build(*GPT_SMOKE, f"precision={name}", *overrides)
    layers = qat_layers(built.task)
    assert set(layers) == TRUNK_LINEARS
    head = built.task.model.lm_head
    assert type(head) is nn.Linear  # the head stays in high precision
    for layer in layers.values():
        assert (layer.weight_quant.spec, layer.weight_quant.mode) == (get_spec(w_spec), w_mode)
        if inputs is None:
            assert layer.input_quant is None
        else:
            assert (layer.input_quant.spec, layer.input_quant.mode) == (get_spec(inputs[0]), inputs[1])
    assert "8 of 9 Linear layers quantized" in built.precision.description

    torch.manual_seed(0)
    x = torch.randint(0, 256, (2, 16))
    loss = _train_step(built, x, torch.roll(x, -1, 1))
    assert 4.0 < loss.item() < 7.0  # about ln 256 = 5.5 at init
    learned = sum(m.mode in ("lsq", "fixed") for q in layers.values() for m in (q.weight_quant, q.input_quant) if m)
    per_quantizer = 2 if w_spec == _int(4, asymmetric=True) else 1  # LSQ+: a scale and a zero point
    assert _check_quantizer_grads(built.task) == learned * per_quantizer
    assert all(torch.isfinite(p.grad).all() for p in built.task.parameters() if p.grad is not None)
    if inputs and inputs[1] == "static":  # the training forward calibrated the input scales
        assert all(int(q.input_quant.observed) == 1 for q in layers.values())


@pytest.mark.parametrize("bits", range(2, 9))
def test_bits_put_the_weights_on_a_signed_bits_wide_grid(bits):
    from lowbit.plugins.precision.qat import QATInt4Precision

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 8))
    QATInt4Precision(bits=bits, activations="none").convert_module(model)
    quant = model[0].weight_quant
    w_hat = quant(model[0].weight).detach()  # (8, 64), the first forward sets the min/max scales
    codes = w_hat.reshape(8, 2, 32) / quant.current_scale().detach()[..., None]  # (8, 2 groups, 32)
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-5)
    assert codes.min() >= -(2 ** (bits - 1)) and codes.max() <= 2 ** (bits - 1) - 1
    assert codes.abs().amax() == 2 ** (bits - 1) - 1  # min/max scales: each group's absmax on Qmax


def test_options_are_cli_overrides_and_the_composed_config_shows_them(capsys, tmp_path):
    cfg = compose([*GPT_SMOKE, "precision=qat_int4", "precision.group_size=64", "precision.lsq=false"]).cfg
    assert (cfg.precision.group_size, cfg.precision.lsq, cfg.precision.bits) == (64, False, 4)
    assert train_main(["precision=qat_int4", "precision.group_size=64", "precision.lsq=false", "--cfg", "job"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)["precision"]
    assert printed["name"] == "qat_int4" and printed["group_size"] == 64 and printed["lsq"] is False
    built = _build(*GPT_SMOKE, "model.dim=64", "precision=qat_int4", "precision.group_size=64", "precision.lsq=false")
    quant = next(iter(qat_layers(built.task).values())).weight_quant
    assert quant.spec == get_spec(_int(4, (1, 64))) and quant.mode == "minmax"
    assert built.precision.description.startswith(
        "qat_int4: weights int4 groups of 64 (minmax), inputs int8 per token (minmax); 8 of 9 Linear layers quantized"
    )


def test_layers_a_group_does_not_divide_stay_high_precision_with_one_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        built = _build(*GPT_SMOKE, "precision=qat_int4", "precision.group_size=48")  # divides 96 only
    assert set(qat_layers(built.task)) == {"model.trunk.blocks.0.mlp.fc_out", "model.trunk.blocks.1.mlp.fc_out"}
    messages = [str(w.message) for w in caught if "high precision" in str(w.message)]
    assert len(messages) == 1 and messages[0].startswith("kept 6 Linear layer(s) in high precision")
    assert "model.trunk.blocks.0.attn.qkv (96x32)" in messages[0]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["precision=qat_int4", "precision.group_size=64"],  # widths 32 and 96 on the smoke GPT
            "error: precision 'qat_int4': block size 64 divides no Linear layer's in_features (32, 96); "
            "pick a group_size that divides them (such as 32 or 16)",
        ),
        (["precision=qat_int4", "precision.bits=1"], "error: qat_int4 bits must be an integer from 2 to 8, got 1"),
        (["precision=qat_int4", "precision.bits=9"], "error: qat_int4 bits must be an integer from 2 to 8, got 9"),
        (["precision=qat_fixed", "precision.bits=1"], "error: qat_fixed bits must be an integer from 2 to 8, got 1"),
        (["precision=qat_fixed", "precision.bits=9"], "error: qat_fixed bits must be an integer from 2 to 8, got 9"),
        (
            ["precision=qat_int4", "precision.group_size=0"],
            "error: qat_int4 group_size must be a positive integer such as 32, got 0",
        ),
        (
            ["precision=qat_int4", "precision.activations=static"],
            "error: qat_int4 activations must be one of dynamic, none, got 'static'",
        ),
        (
            ["precision=qat_int8", "precision.activations=per_token"],
            "error: qat_int8 activations must be one of dynamic, static, none, got 'per_token'",
        ),
        (  # learned step sizes are for integer formats: the FP4 presets have no such option
            ["precision=qat_nvfp4", "+precision.weight_mode=lsq"],
            "error: precision 'qat_nvfp4' has no option 'weight_mode'; valid: activations, keep, keep_last_blocks, mode",
        ),
        (
            ["precision=qat_int8", "precision.weight_mode=fixed"],
            "error: quantizer mode 'fixed' (QFX) has one symmetric power-of-two scale per tensor: block 'tensor'",
        ),
        (
            ["precision=qat_int4", "precision.weight_mode=lsqq"],
            "error: unknown quantizer mode 'lsqq'; valid: minmax, lsq, static, fixed",
        ),
    ],
)
def test_bad_options_exit_2_with_one_line(overrides, expected, capsys, tmp_path):
    code = train_main([*overrides, "debug=smoke", f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == expected + "\n"
    assert not (tmp_path / "run").exists()


def test_the_same_errors_are_lowbit_errors_in_python():
    from lowbit.plugins.precision.qat import QATFixedPrecision, QATInt4Precision, QATNVFP4Precision

    for make, message in [
        (lambda: QATInt4Precision(bits=9), "qat_int4 bits must be an integer from 2 to 8, got 9"),
        (lambda: QATInt4Precision(bits=True), "qat_int4 bits must be an integer from 2 to 8, got True"),
        (lambda: QATFixedPrecision(bits=1), "qat_fixed bits must be an integer from 2 to 8, got 1"),
        (lambda: QATInt4Precision(activations="static"), "qat_int4 activations must be one of dynamic, none"),
    ]:
        with pytest.raises(LowbitError) as err:
            make()
        assert str(err.value).startswith(message)
    with pytest.raises(TypeError, match="weight_mode"):
        QATNVFP4Precision(weight_mode="lsq")  # no learned scales on FP4: the option does not exist


def test_the_digits_vit_converts_and_trains_a_step():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        built = _build("recipe=bf16_vit", "precision=qat_int4", "debug=smoke")
    layers = qat_layers(built.task)
    assert set(layers) == TRUNK_LINEARS
    assert type(built.task.model.head) is nn.Linear
    assert type(built.task.model.patch_embed.proj) is nn.Linear  # 16 inputs: groups of 32 do not fit
    assert any("model.patch_embed.proj (32x16)" in str(w.message) for w in caught)
    built.data.setup("fit")
    x, y = next(iter(built.data.train_dataloader()))  # (8, 1, 8, 8) digits, (8,) labels
    assert torch.isfinite(_train_step(built, x, y))
    assert _check_quantizer_grads(built.task) == 8


def test_a_stock_timm_vit_converts_and_trains_a_step():
    built = _build("recipe=timm_nvfp4", "precision=qat_int4", "debug=smoke")  # vit_tiny layout, 2 blocks x 32
    layers = qat_layers(built.task)
    blocks = {f"model.net.blocks.{b}.{n}" for b in (0, 1) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert set(layers) == blocks
    assert type(built.task.model.net.head) is nn.Linear
    built.data.setup("fit")
    x, y = next(iter(built.data.train_dataloader()))
    assert torch.isfinite(_train_step(built, x, y))
    assert _check_quantizer_grads(built.task) == 8
    assert all(isinstance(m, QATLinear) for m in layers.values())


# ---- exact resume ----------------------------------------------------------------------------------------


def _losses(run_dir) -> dict[int, float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


@pytest.mark.parametrize(
    "precision",
    [
        ["precision=qat_int4"],  # LSQ step sizes: parameters, with their optimizer state
        ["precision=qat_int8", "precision.activations=static", "precision.calibration_steps=5"],  # calibrating at 3
    ],
    ids=["qat_int4 lsq", "qat_int8 static"],
)
def test_a_qat_run_resumes_bit_for_bit(tmp_path, precision):
    common = [
        *GPT_SMOKE,
        *precision,
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
    train(compose([*common, f"hydra.run.dir={tmp_path / 'resumed'}", f"resume={step3}"]), echo=quiet)
    full, resumed = _losses(tmp_path / "full"), _losses(tmp_path / "resumed")
    assert sorted(full) == [0, 1, 2, 3, 4, 5] and sorted(resumed) == [3, 4, 5]
    assert all(resumed[s] == full[s] for s in (3, 4, 5)), (full, resumed)
    states = [
        torch.load(tmp_path / d / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
        for d in ("full", "resumed")
    ]
    assert list(states[0]) == list(states[1])
    quantizer_keys = [k for k in states[0] if "_quant." in k]
    assert len(quantizer_keys) == 8 * (2 if "precision=qat_int4" in precision else 4)
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key
    mid = torch.load(step3, weights_only=False)["state_dict"]
    assert any(not torch.equal(mid[k], states[0][k]) for k in quantizer_keys)  # the scales moved after step 3
    observed = [k for k in quantizer_keys if k.endswith(".observed")]
    if observed:  # static inputs resumed mid-calibration: 3 of 5 forwards seen at the checkpoint, then 5
        assert {int(mid[k]) for k in observed} == {3} and {int(states[1][k]) for k in observed} == {5}
