"""``lowbit export`` and ``load_exported``: packed codes round-trip exactly, the exported model evaluates
as the fake-quantized one does (FP32), the integer GEMMs equal the dequantize path, INT4 weights in
groups of 64 take 0.27x their BF16 bytes (FP16 scales), and bad input is one line that writes nothing."""

import json
import math

import lightning as L
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn

from lowbit.cli import main
from lowbit.config import compose
from lowbit.errors import LowbitError
from lowbit.numerics import fake_quantize, get_spec, pack_fp4, quantize, unpack_int4
from lowbit.quant.export import (
    PackedLinear,
    _fast_int_input,
    _int_codes,
    _pad_for_int_mm,
    export_checkpoint,
    export_main,
    int8_matmul,
    integer_gemm,
    load_exported,
)
from lowbit.quant.qat import FakeQuant, QATLinear
from lowbit.registry import registry
from lowbit.run import train

SMOKE = ["recipe=bf16_llm", "debug=smoke", "logger=csv", "precision.mode=fp32", "trainer.max_steps=4"]
SMOKE += ["trainer.val_check_interval=100", "checkpoint.save_best=false"]
RUNS = {
    # W4A8 with learned step sizes; 192 wide (SwiGLU hidden 512) in groups of 64, so that the quantized
    # layers dominate the model and the INT4 weights with their FP32 scales fit in 0.30x BF16
    "qat_int4": ["precision=qat_int4", "precision.group_size=64", "model.dim=192", "model.n_layers=1"],
    "qat_int8": ["precision=qat_int8"],  # per-channel weights, dynamic per-token inputs
    "qat_nvfp4": ["precision=qat_nvfp4", "precision.activations=true"],  # FP4 weights and inputs
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """name -> (run dir, final FP32 fake-quantized val loss) of a few QAT steps, each trained once."""
    runs = {}

    def get(name: str):
        if name not in runs:
            run_dir = tmp_path_factory.mktemp(name) / "run"
            result = train(compose([*SMOKE, *RUNS[name], f"hydra.run.dir={run_dir}"]), echo=lambda *_: None)
            runs[name] = run_dir, result.metrics["val/loss"]
        return runs[name]

    return get


@pytest.fixture(params=list(RUNS))
def run(request, trained):
    return trained(request.param)


def _val_loss(task: L.LightningModule, run_dir) -> float:
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    data = registry.build("data", config["data"], seed=int(config["seed"]))
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return trainer.validate(task, datamodule=data, verbose=False)[0]["val/loss"]


def test_packed_int4_codes_round_trip_exactly():
    pairs = torch.cartesian_prod(torch.arange(-8, 8), torch.arange(-8, 8)).to(torch.int8)  # (256, 2): every (even, odd)
    packed = pack_fp4(pairs)
    assert packed.dtype == torch.uint8 and packed.shape == (256, 1)
    torch.testing.assert_close(unpack_int4(packed), pairs, rtol=0, atol=0)


def _qat_linear(weight_spec, weight_mode, input_spec=None, input_mode="minmax", in_features=256, out_features=64):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features)
    weight_quant = FakeQuant(weight_spec, weight_mode, shape=tuple(linear.weight.shape))
    input_quant = None if input_spec is None else FakeQuant(input_spec, input_mode, per_sample=True)
    layer = QATLinear.from_linear(linear, weight_quant, input_quant)
    layer(torch.randn(3, 5, in_features))  # initializes learned scales from the data, as the first step does
    return layer.eval()


INT8_TOKEN, INT8_TENSOR = {"element": "int8", "block": "row"}, {"element": "int8", "block": "tensor"}
LAYERS = {
    "w8a8 per channel, per token": (INT8_TOKEN, "minmax", INT8_TOKEN, "minmax"),
    "w4a8 groups of 32, lsq": ({"element": "int4", "block": [1, 32]}, "lsq", INT8_TOKEN, "minmax"),
    "w3a8 groups of 64, lsq": ({"element": "int3", "block": [1, 64]}, "lsq", INT8_TOKEN, "minmax"),
    "w6a8 static per tensor": ({"element": "int6", "block": "row"}, "static", INT8_TENSOR, "static"),
    "fixed point, 8 bits": (INT8_TENSOR, "fixed", INT8_TENSOR, "fixed"),
}


@pytest.mark.parametrize("case", list(LAYERS))
def test_integer_gemm_equals_the_dequantize_path_and_the_qat_layer(case):
    layer = _qat_linear(*LAYERS[case])
    packed = PackedLinear.from_qat(layer)
    grouped = not isinstance(layer.weight_quant.spec.block, str)
    assert packed.kernel == ("dequantize" if grouped else "int_mm")  # one _int_mm per group is slower on CPU
    assert integer_gemm(layer.weight_quant.spec, layer.input_quant.spec)
    x = torch.randn(4, 7, 256)
    with torch.no_grad():
        expected = layer(x)
        integer, reference = packed.integer_forward(x), packed.dequantize_forward(x)
    torch.testing.assert_close(reference, expected, rtol=0, atol=0)  # the same numerics calls, bit for bit
    torch.testing.assert_close(integer, reference, rtol=1e-5, atol=1e-5)  # int32 sums vs FP32 sums


def test_exported_codes_are_the_quantizers_and_weight_only_layers_dequantize():
    layer = _qat_linear({"element": "int4", "block": [1, 32], "asymmetric": True}, "minmax")
    packed = PackedLinear.from_qat(layer)
    q = quantize(layer.weight.detach(), layer.weight_quant.spec)
    assert packed.kernel == "dequantize" and packed.weight_codes.dtype == torch.uint8
    assert packed.weight_codes.shape == (64, 128) and packed.weight_zero_points.dtype == torch.int8
    torch.testing.assert_close(packed.weight_qtensor().codes, q.codes, rtol=0, atol=0)
    x = torch.randn(2, 256)
    torch.testing.assert_close(packed(x), layer(x), rtol=0, atol=0)


def _assert_int_codes_are_the_references(x: torch.Tensor) -> None:
    for element in ("int8", "int4"):
        for block in ("row", "tensor"):
            spec = get_spec({"element": element, "block": block})
            codes, scales = _int_codes(x, spec)
            q = quantize(x, spec)
            assert torch.equal(codes, q.codes) and torch.equal(scales.reshape(q.scales.shape), q.scales)
            fake = (codes.float() * scales).to(x.dtype)  # the dequantize path's inputs: fake_quantize's values
            assert torch.equal(fake.float().nan_to_num(7.0), fake_quantize(x, spec).float().nan_to_num(7.0))


def test_the_fast_input_codes_decline_specs_they_do_not_define():
    """``_int_codes`` maps amax to qmax with an exact scale: other targets and power-of-two scales take the reference."""
    assert _fast_int_input(get_spec({"element": "int8", "block": "row"}))
    assert not _fast_int_input(get_spec({"element": "int8", "block": "row", "amax_target": 100.0}))
    assert not _fast_int_input(get_spec({"element": "int8", "block": "row", "pow2_scale": True}))


def test_fast_input_codes_equal_the_reference_on_adversarial_rows():
    x = torch.randn(12, 96, generator=torch.Generator().manual_seed(0))
    x[0] = 0.0  # an all-zero token: scale 1
    x[1, 3] = float("nan")  # NaN: code 0, the row's scale 1
    x[2, 5], x[3, 7] = float("inf"), -float("inf")  # Inf: the row saturates
    x[4] = 1e-45  # subnormal amax: the encode factor overflows and clamps to FLT_MAX
    x[5] = 2.5  # ties to even at every element
    x[6] = torch.arange(96) - 47.5  # every half step
    x[7] *= 3e38  # near FLT_MAX
    x[8] *= 1e-30
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        _assert_int_codes_are_the_references(x.to(dtype))


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        "float32",
        st.tuples(st.integers(1, 9), st.integers(1, 70)),
        elements=st.floats(width=32, allow_nan=True, allow_infinity=True),
    )
)
def test_fast_input_codes_equal_the_reference_on_any_floats(array):
    _assert_int_codes_are_the_references(torch.from_numpy(array))


def test_int8_matmul_pads_exactly_to_cuda_shapes():
    a = torch.randint(-128, 128, (3, 13), dtype=torch.int8)
    b = torch.randint(-128, 128, (13, 5), dtype=torch.int8)
    a_pad, b_pad = _pad_for_int_mm(a, b)
    assert a_pad.shape == (17, 16) and b_pad.shape == (16, 8)
    exact = a.int() @ b.int()
    torch.testing.assert_close(torch._int_mm(a_pad, b_pad)[:3, :5], exact, rtol=0, atol=0)
    torch.testing.assert_close(int8_matmul(a, b), exact, rtol=0, atol=0)


def test_export_then_load_evaluates_as_the_fake_quantized_model(run, tmp_path, capsys):
    run_dir, fake_quant_loss = run
    out = tmp_path / "export"
    assert export_main([str(run_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out / "model.safetensors") in printed and str(out / "manifest.json") in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert f"exported {len(manifest['layers'])} quantized layers" in printed and manifest["layers"]
    model = load_exported(out)
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert len(packed) == len(manifest["layers"]) and not model.training
    assert not any(isinstance(m, QATLinear) for m in model.modules())
    assert manifest["tied"] == {"model.lm_head.weight": "model.tok_emb.weight"}  # stored once, tied again
    assert model.model.lm_head.weight is model.model.tok_emb.weight
    loss = _val_loss(model, run_dir)
    assert loss == pytest.approx(fake_quant_loss, rel=1e-4)
    kernels = {m.kernel for m in packed}
    name = manifest["precision"]["name"]
    assert kernels == ({"int_mm"} if name == "qat_int8" else {"dequantize"})  # int4: groups of 64
    if name == "qat_int4":
        size = manifest["bytes"]
        # per weight: 4-bit codes + one FP16 scale (learned on FP16's grid, qat_int4's default) per 64 bytes,
        # vs 2 in BF16; stored as float16 in the file and in the loaded layer
        assert size["ratio"] == pytest.approx((0.5 + 2 / 64) / 2) and size["ratio"] <= 0.30
        assert all(m.weight_scales.dtype == torch.float16 for m in packed)
        high_precision = (size["model_bf16"] - size["quantized_weights_bf16"]) // 2  # embedding (tied), norms
        assert size["file_tensors"] == size["quantized_weights"] + 4 * high_precision  # kept as trained: FP32
    if name == "qat_nvfp4":
        first = next(iter(manifest["layers"].values()))
        assert set(first["tensors"]) == {"weight_codes", "weight_scale_codes", "weight_global_scale"}


def test_default_out_is_the_run_dirs_export(trained):
    run_dir, _ = trained("qat_int8")
    assert export_checkpoint(run_dir / "checkpoints" / "last.ckpt") == run_dir / "export"
    assert (run_dir / "export" / "model.safetensors").is_file()


def _error_line(argv, capsys) -> str:
    assert main(["export", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_bad_input_is_one_line_and_writes_nothing(trained, tmp_path, capsys):
    run_dir, _ = trained("qat_int8")
    out = tmp_path / "out"
    assert "no checkpoint at" in _error_line([str(tmp_path / "missing"), "--out", str(out)], capsys)
    bf16 = tmp_path / "bf16"  # the same run, as if trained in BF16
    (bf16 / "checkpoints").mkdir(parents=True)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    (bf16 / "config.yaml").write_text(yaml.safe_dump({**config, "precision": {"name": "bf16", "mode": "fp32"}}))
    (bf16 / "checkpoints" / "last.ckpt").write_bytes((run_dir / "checkpoints" / "last.ckpt").read_bytes())
    err = _error_line([str(bf16), "--out", str(out)], capsys)
    assert "was trained with precision 'bf16'; export needs a QAT or PTQ checkpoint" in err
    assert "usage: lowbit export" in _error_line([], capsys)
    assert not out.exists() and not (bf16 / "export").exists()
    with pytest.raises(LowbitError, match="holds no export"):
        load_exported(tmp_path)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_codes_are_packed_two_per_byte_up_to_4_bits(bits):
    packed = PackedLinear(64, 8, get_spec({"element": f"int{bits}", "block": [1, 32]}))
    assert packed.weight_codes.dtype == (torch.uint8 if bits <= 4 else torch.int8)
    assert packed.weight_codes.shape == (8, 32 if bits <= 4 else 64)
    assert math.prod(packed.weight_scales.shape) == 16
