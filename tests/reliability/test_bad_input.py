"""Bad input as a user gives it: every bad value is one line naming the key and the valid range,
before anything of the run is created; no traceback, no run directory, no hang.

Most cases are checked in-process (``check_config`` on a composed config, the data and model
constructors, W&B mode selection); a few go through the ``train`` console script as typed.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from trainproc import run_train

import lowbit.logging as lg
from lowbit.config import compose
from lowbit.data import corpus
from lowbit.data.text import StdlibText, TextFiles
from lowbit.errors import LowbitError
from lowbit.models.gpt import GPT
from lowbit.models.vit import ViT
from lowbit.tasks.equilibrium import FallbackNotice
from lowbit.validate import check_config


# ---- check_config ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke():
    return compose(["debug=smoke", "posenc=none"]).cfg


def _with(cfg, **values):
    cfg = OmegaConf.create(OmegaConf.to_container(cfg))  # a copy, struct mode off
    for key, value in values.items():
        OmegaConf.update(cfg, key, value)
    return cfg


BAD_VALUES = [
    ("trainer.max_steps", 0, "trainer.max_steps must be an integer of at least 1, got 0"),
    ("trainer.max_steps", -1, "trainer.max_steps must be an integer of at least 1, got -1"),
    ("trainer.max_steps", -5, "trainer.max_steps must be an integer of at least 1, got -5"),
    ("trainer.val_check_interval", 0, "trainer.val_check_interval must be an integer of at least 1, got 0"),
    ("trainer.val_check_interval", 0.5, "trainer.val_check_interval must be an integer of at least 1, got 0.5"),
    ("trainer.log_every_n_steps", 0, "trainer.log_every_n_steps must be an integer of at least 1, got 0"),
    ("trainer.accumulate_grad_batches", 0, "trainer.accumulate_grad_batches must be an integer of at least 1, got 0"),
    ("trainer.gradient_clip_val", -1.0, "trainer.gradient_clip_val must be a number >= 0 or null, got -1.0"),
    ("trainer.limit_val_batches", 0, "trainer.limit_val_batches must be an integer >= 1, a fraction in (0, 1] or null"),
    ("trainer.devices", 0, "trainer.devices must be an integer >= 1, a list of device ids or 'auto', got 0"),
    ("optimizer.lr", -1.0, "optimizer.lr must be a number > 0, got -1.0"),
    ("optimizer.lr", 0.0, "optimizer.lr must be a number > 0, got 0.0"),
    ("optimizer.lr", float("nan"), "optimizer.lr must be a number > 0, got nan"),
    ("optimizer.weight_decay", -0.1, "optimizer.weight_decay must be a number >= 0, got -0.1"),
    ("optimizer.eps", 0.0, "optimizer.eps must be a number > 0, got 0.0"),
    ("optimizer.betas", [0.9, 1.0], "optimizer.betas must be a list of numbers in [0, 1), got [0.9, 1.0]"),
    ("scheduler.warmup_steps", -1, "scheduler.warmup_steps must be an integer of at least 0, got -1"),
    ("scheduler.min_lr_ratio", 1.5, "scheduler.min_lr_ratio must be a number in [0, 1], got 1.5"),
    ("checkpoint.every_n_steps", 0, "checkpoint.every_n_steps must be an integer of at least 1, got 0"),
    ("health.every_n_steps", 0, "health.every_n_steps must be an integer of at least 1, got 0"),
    ("seed", -1, "seed must be an integer in [0, 4294967295], got -1"),
    ("seed", 2**32, "seed must be an integer in [0, 4294967295], got 4294967296"),
]


@pytest.mark.parametrize(("key", "value", "message"), BAD_VALUES, ids=[f"{k}={v}" for k, v, _ in BAD_VALUES])
def test_a_bad_core_value_is_one_line_naming_key_and_range(smoke, key, value, message):
    with pytest.raises(LowbitError) as err:
        check_config(_with(smoke, **{key: value}))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["trainer.gradient_clip_val=null", "trainer.limit_val_batches=0.5", "scheduler.warmup_steps=3"],
        ["recipe=nvfp4_llm"],
        ["recipe=deq_vit"],
        ["recipe=fpdm_dit", "scheduler=wsd"],
    ],
)
def test_good_configs_pass(overrides):
    check_config(compose(overrides).cfg)


def test_overrides_as_typed_reach_check_config():
    with pytest.raises(LowbitError, match=r"^optimizer.lr must be a number > 0, got -1$"):
        check_config(compose(["debug=smoke", "optimizer.lr=-1"]).cfg)


def test_a_key_a_config_does_not_have_is_not_checked(smoke):
    cfg = _with(smoke)
    del cfg.optimizer["betas"]
    check_config(cfg)


# ---- data --------------------------------------------------------------------------------------
@pytest.fixture
def text(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(bytes(range(256)) * 8)
    return path


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("val_windows", 0, "data.val_windows must be an integer of at least 1, got 0"),
        ("seq_len", 0, "data.seq_len must be an integer of at least 1, got 0"),
        ("batch_size", -2, "data.batch_size must be an integer of at least 1, got -2"),
        ("val_batch_size", 0, "data.val_batch_size must be an integer of at least 1, got 0"),
        ("num_workers", -1, "data.num_workers must be an integer of at least 0, got -1"),
        ("val_fraction", 1.0, "data.val_fraction must be in (0, 1), got 1.0"),
        ("seq_len", 300, "the val split has 205 bytes, fewer than data.seq_len+2 = 302; use more text"),
    ],
)
def test_bad_text_options_are_refused_at_construction(text, tmp_path, option, value, message):
    with pytest.raises(LowbitError) as err:
        TextFiles(path=str(text), cache_dir=str(tmp_path / "cache"), **{"val_fraction": 0.1, option: value})
    assert str(err.value).startswith(message)


def test_split_sizes_are_the_sizes_the_cache_gets(tmp_path):
    for i in range(12):
        (tmp_path / "docs").mkdir(exist_ok=True)
        (tmp_path / "docs" / f"{i}.txt").write_text("x" * (10 + i))
    for root, files in (corpus.text_files(tmp_path / "docs"), corpus.text_files(tmp_path / "docs" / "3.txt")):
        built = corpus.load_corpus(root, files, 0.3, tmp_path / "cache")
        assert corpus.split_sizes(root, files, 0.3) == {"train": len(built.train), "val": len(built.val)}


def test_an_empty_text_file_is_one_line(tmp_path):
    (tmp_path / "empty.txt").touch()
    with pytest.raises(LowbitError, match=r"^data.path '.*empty.txt' is an empty file \(0 bytes\); give a text file"):
        TextFiles(path=str(tmp_path / "empty.txt"), cache_dir=str(tmp_path / "cache"))


def test_an_unreadable_text_file_is_one_line(text, tmp_path, monkeypatch):
    def denied(path, mode="r", *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(corpus, "open", denied, raising=False)  # root reads any file: deny it here
    with pytest.raises(LowbitError, match=rf"^data.path '{text}': cannot read {text} \(Permission denied\)$"):
        TextFiles(path=str(text), cache_dir=str(tmp_path / "cache"))


def test_a_cache_under_a_regular_file_is_one_line_naming_lowbit_cache(tmp_path, monkeypatch):
    (tmp_path / "file").touch()
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "file" / "cache"))
    with pytest.raises(LowbitError) as err:
        StdlibText(seq_len=32)
    assert str(err.value) == (
        f"the corpus cache folder {tmp_path}/file/cache is not writable (Not a directory); "
        "set LOWBIT_CACHE (or data.cache_dir) to a writable folder"
    )


def test_a_read_only_cache_is_refused_unless_the_corpus_is_built(text, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == cache else real_access(p, mode))
    with pytest.raises(
        LowbitError,
        match=rf"^the corpus cache folder {cache} is not writable \(permission denied\); set data.cache_dir",
    ):
        TextFiles(path=str(text), cache_dir=str(cache), seq_len=16)
    monkeypatch.setattr(os, "access", real_access)
    TextFiles(path=str(text), cache_dir=str(cache), seq_len=16).prepare_data()  # built while writable
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == cache else real_access(p, mode))
    data = TextFiles(path=str(text), cache_dir=str(cache), seq_len=16)  # read-only, but nothing to write
    assert len(data.corpus.train) + len(data.corpus.val) == 256 * 8 + 1


def test_a_rebuilt_cache_says_so_in_one_line(text, tmp_path, caplog):
    root, files = corpus.text_files(text)
    first = corpus.load_corpus(root, files, 0.1, tmp_path / "cache")
    with caplog.at_level(logging.INFO, logger="lowbit"):
        corpus.load_corpus(root, files, 0.1, tmp_path / "cache")
        assert caplog.messages == []  # a valid cache: silent
        raw = bytearray((first.root / "train.bin").read_bytes())
        raw[3] ^= 0xFF
        (first.root / "train.bin").write_bytes(bytes(raw))
        corpus.load_corpus(root, files, 0.1, tmp_path / "cache")
    assert caplog.messages == [
        f"notice: corpus cache at {first.root} was stale or corrupt (train.bin sha256 mismatch); rebuilt"
    ]


# ---- models ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("model", "options", "message"),
    [
        (GPT, {"n_heads": 0}, "model.n_heads must be an integer of at least 1, got 0"),
        (GPT, {"dim": 30, "n_heads": 4}, "model.dim 30 is not divisible by model.n_heads 4"),
        (GPT, {"n_layers": 0}, "model.n_layers must be an integer of at least 1, got 0"),
        (GPT, {"max_len": 0}, "model.max_len must be an integer of at least 1, got 0"),
        (GPT, {"vocab_size": 0}, "model.vocab_size must be an integer of at least 1, got 0"),
        (ViT, {"patch_size": 0}, "model.patch_size must be an integer of at least 1, got 0"),
        (ViT, {"num_classes": 0}, "model.num_classes must be an integer of at least 1, got 0"),
    ],
)
def test_bad_model_sizes_are_one_line(model, options, message):
    with pytest.raises(LowbitError, match=f"^{message}"):
        model(posenc="none", **options)


# ---- W&B ---------------------------------------------------------------------------------------
@pytest.fixture
def online_without_key(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc


def test_online_without_a_key_falls_back_offline_with_a_notice(online_without_key):
    notices = []
    assert lg.wandb_mode(notice=notices.append) == "offline"
    assert notices == [
        "notice: WANDB_MODE=online but no W&B API key (WANDB_API_KEY or ~/.netrc from `wandb login`); "
        "logging offline (wandb sync later)"
    ]


def test_online_without_a_key_and_no_fallback_is_one_line(online_without_key):
    with pytest.raises(LowbitError, match=r"^WANDB_MODE=online but no W&B API key .*logger.offline_fallback=true"):
        lg.wandb_mode(offline_fallback=False)


def test_online_with_the_service_unreachable_falls_back_within_seconds(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "https://10.255.255.1:9")  # blackholed or refused: never answers
    notices = []
    start = time.monotonic()
    assert lg.wandb_mode(notice=notices.append) == "offline"
    assert time.monotonic() - start < 10
    assert len(notices) == 1 and notices[0].startswith("notice: WANDB_MODE=online but 10.255.255.1:9 is unreachable")
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.invalid")  # no such name
    assert lg.wandb_mode(notice=notices.append) == "offline" and "wandb.invalid:443 is unreachable" in notices[1]


def test_the_logger_configs_carry_offline_fallback():
    assert compose([]).cfg.logger.offline_fallback is True
    assert compose(["logger=csv"]).cfg.logger.offline_fallback is True


# ---- DEQ solver fallbacks ----------------------------------------------------------------------
def test_deq_fallbacks_are_one_notice_per_interval(caplog):
    notice = FallbackNotice(every=50)
    with caplog.at_level(logging.INFO, logger="lowbit"):
        for step in range(120):
            notice.update(1.0 if step in (3, 10, 47, 110) else 0.0)
        notice.flush()  # the end of training: the last 20 steps
        notice.flush()  # nothing new: silent
    assert caplog.messages == [
        "notice: DEQ solver fell back to damped fixed-point iteration in 3 of the last 50 steps (deq/fallbacks in the logs)",
        "notice: DEQ solver fell back to damped fixed-point iteration in 1 of the last 20 steps (deq/fallbacks in the logs)",
    ]


# ---- the console script ------------------------------------------------------------------------
def _train(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "WANDB_API_KEY")}
    return run_train(["debug=smoke", "posenc=none", *args], cwd=cwd, env={**base, "WANDB_MODE": "disabled", **env})


CLI_CASES = [
    # needs lowbit.config.compose to call check_config
    (["trainer.max_steps=0"], {}, "trainer.max_steps must be an integer of at least 1, got 0"),
    (["optimizer.lr=-1"], {}, "optimizer.lr must be a number > 0, got -1"),
    # plugin constructors, run by build()
    (["data.val_windows=0"], {}, "data.val_windows must be an integer of at least 1, got 0"),
    (["data=text", "data.path={tmp}/empty.txt"], {}, "data.path '{tmp}/empty.txt' is an empty file (0 bytes)"),
    ([], {"LOWBIT_CACHE": "{tmp}/file/cache"}, "the corpus cache folder {tmp}/file/cache is not writable"),
    # W&B, when the loggers are built
    (
        ["logger.wandb=true", "logger.offline_fallback=false"],
        {"WANDB_MODE": "online", "HOME": "{tmp}"},
        "WANDB_MODE=online but no W&B API key",
    ),
]


@pytest.mark.parametrize(("args", "env", "message"), CLI_CASES, ids=[" ".join([*a, *e]) for a, e, _ in CLI_CASES])
def test_bad_input_through_train_is_one_line_and_leaves_no_run_dir(tmp_path, args, env, message):
    (tmp_path / "empty.txt").touch()
    (tmp_path / "file").touch()
    fill = lambda s: s.replace("{tmp}", str(tmp_path))
    run_dir = tmp_path / "run"
    result = _train([*map(fill, args), f"hydra.run.dir={run_dir}"], tmp_path, **{k: fill(v) for k, v in env.items()})
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: {fill(message)}") and result.stderr.count("\n") == 1, result.stderr
    assert not run_dir.exists()
