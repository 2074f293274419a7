"""The command line: one-line errors with exit code 2, listings, --cfg, sweeps."""

import pytest

from lowbit.cli import main, train_main


def _run(fn, argv, capsys):
    code = fn(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["recipe=nvfp5_llm"], "error: unknown recipe 'nvfp5_llm'; valid: "),
        (["trainer.max_stepz=3"], "error: unknown config key 'trainer.max_stepz'"),
        (["trainer.max_steps=three"], "error: trainer.max_steps must be an integer"),
        (["posenc=none", "posenc.name=nope", "debug=smoke"], "error: unknown posenc 'nope'; installed: "),
        (["data=text", "debug=smoke"], "error: data.path has no value; set it on the command line: data.path=..."),
        (
            ["data=text", "data.path=/no/such/file.txt", "debug=smoke"],
            "error: data.path '/no/such/file.txt' does not exist",
        ),
        (["resume=/no/such.ckpt", "debug=smoke"], "error: resume=/no/such.ckpt: no checkpoint at /no/such.ckpt"),
        (["--fast"], "error: unrecognized arguments: --fast"),
        (["--cfg", "jobs"], "error: argument --cfg/-c: invalid choice: 'jobs' (choose from 'job', 'hydra', 'all')"),
        (["-m", "--cfg", "job"], "error: Only one of --run, --multirun, --cfg, --info and --shell_completion"),
        (["hydra/launcher=jobli"], "error: unknown hydra/launcher 'jobli'; valid: basic, joblib"),
        (
            ["model=vit", "debug=smoke"],
            "error: model.image_size cannot be set: Interpolation key 'data.image_size' not found",
        ),
        (["+trainer.precision=16-mixed", "debug=smoke"], "error: trainer.precision=16-mixed would fight the precision"),
        (
            ["+trainer.flux=1", "debug=smoke"],
            "error: trainer: Trainer.__init__() got an unexpected keyword argument 'flux'",
        ),
        (
            ["precision=nvfp4", "trainer.strategy=deepspeed", "debug=smoke"],
            "error: precision 'nvfp4' cannot run with trainer.strategy=deepspeed: DeepSpeed wraps the model's layers",
        ),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, expected, capsys, tmp_path):
    code, out, err = _run(train_main, [*argv, f"hydra.run.dir={tmp_path / 'run'}"], capsys)
    assert code == 2
    assert err.startswith(expected), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing created by a failed start


def test_verbose_shows_the_traceback():
    from lowbit.errors import LowbitError

    with pytest.raises(LowbitError):
        train_main(["recipe=nvfp5_llm", "--verbose"])


def test_lowbit_plugins_lists_groups(capsys):
    code, out, _ = _run(main, ["plugins"], capsys)
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == ["group", "name", "distribution", "version", "status"]
    gpt = next(r.split() for r in rows if r.split()[:2] == ["models", "gpt"])
    assert gpt[2:] == ["lowbit", "0.1.0", "ok"]


def test_lowbit_recipes_lists_descriptions(capsys):
    code, out, _ = _run(main, ["recipes"], capsys)
    assert code == 0
    assert any(line.startswith("bf16_llm") and "BF16 baseline" in line for line in out.splitlines())


def test_unknown_command_and_bench(capsys):
    assert _run(main, ["fly"], capsys)[0] == 2
    code, _, err = _run(main, ["bench", "warp"], capsys)
    assert code == 2 and err.startswith("error: unknown bench 'warp'; valid: ")


def test_cfg_job_prints_the_composed_config(capsys):
    code, out, _ = _run(train_main, ["--cfg", "job", "--resolve", "recipe=bf16_llm", "trainer.max_steps=111"], capsys)
    assert code == 0 and "max_steps: 111" in out and "max_len: 128" in out  # interpolations resolved


def test_a_sweep_checks_every_job_before_running_any(capsys, tmp_path):
    code, _, err = _run(train_main, ["-m", "debug=smoke", "seed=1,x", f"hydra.sweep.dir={tmp_path / 's'}"], capsys)
    assert code == 2 and err == "error: seed must be an integer (default 1337), got 'x'\n"
    assert not (tmp_path / "s").exists()


def test_help_lists_groups_and_plugins_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "usage: train [recipe=NAME]" in out
    assert "precision: bf16, custom, fp8, hif8, int4, mxfp4, mxfp4_bwd, mxfp8, nvfp4" in out
    for command in ("plugins", "recipes", "bench"):
        code, out, _ = _run(main, [command, "--help"], capsys)
        assert code == 0 and out.startswith(f"usage: lowbit {command}")
