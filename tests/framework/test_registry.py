"""Registry: lazy discovery, clear errors, API versions, and real third-party distributions."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lowbit.errors import LowbitError
from lowbit.registry import GROUPS, PLUGIN_API, Registry, call_with_options, registry

VENV_BIN = Path(sys.executable).parent


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def _install(tmp: Path, name: str, files: dict[str, str], entry_points: str) -> Path:
    """Build and install a distribution into ``tmp/site`` with pip (no network, no isolation)."""
    src = tmp / name
    _write(src, files)
    _write(
        src,
        {
            "pyproject.toml": f"""
                [build-system]
                requires = ["setuptools"]
                build-backend = "setuptools.build_meta"
                [project]
                name = "{name.replace("_", "-")}"
                version = "0.3.1"
                {entry_points}
                [tool.setuptools.packages.find]
                where = ["."]
                [tool.setuptools.package-data]
                "*" = ["**/*.yaml"]
            """
        },
    )
    site = tmp / "site"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-deps",
        "--no-build-isolation",
        "--target",
        str(site),
        str(src),
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    return site


FANCY = {
    "lowbit_fancy/__init__.py": "",
    "lowbit_fancy/posenc.py": """
        import torch
        from lowbit.nn.posenc import PositionalEncoding

        class FancyPE(PositionalEncoding):
            '''Adds a learned per-position vector (a third party's encoding).'''
            lowbit_plugin_api = 1
            pos_dims = (1,)

            def __init__(self, *, dim, max_len, gain=1.0):
                super().__init__()
                self.gain = gain
                self.table = torch.nn.Parameter(torch.zeros(max_len, dim))

            def embed(self, x, pos):
                return x + self.gain * self.table[pos]
    """,
    "lowbit_fancy/recipes/__init__.py": "lowbit_plugin_api = 1\n",
    "lowbit_fancy/recipes/posenc/fancy.yaml": "name: fancy\ngain: 2.0\n",
    "lowbit_fancy/recipes/recipe/fancy_llm.yaml": """
        # @package _global_
        defaults:
          - override /posenc: fancy
        description: "a third party's GPT with its own positional encoding"
    """,
}
FANCY_EP = """
[project.entry-points."lowbit.posenc"]
fancy = "lowbit_fancy.posenc:FancyPE"
[project.entry-points."lowbit.recipes"]
fancy = "lowbit_fancy.recipes"
"""
BROKEN = {
    "lowbit_broken/__init__.py": "",
    "lowbit_broken/posenc.py": "import not_a_real_module_xyz\n",
    "lowbit_broken/future.py": "class FuturePE:\n    lowbit_plugin_api = 99\n",
}
BROKEN_EP = """
[project.entry-points."lowbit.posenc"]
broken = "lowbit_broken.posenc:BrokenPE"
future = "lowbit_broken.future:FuturePE"
"""


BARE = {  # plugins that ship no YAML: their configs come from their constructors
    "lowbit_bare/__init__.py": "",
    "lowbit_bare/precision.py": """
        from lowbit.plugins.precision.bf16 import BF16Precision

        class LevelPrecision(BF16Precision):
            "BF16 with a typed option and any extra keyword (kept in .extra)."
            lowbit_plugin_api = 1

            def __init__(self, *, device_type: str = "cpu", level: int = 3, label: str = "x", **extra):
                super().__init__(device_type=device_type)
                self.level, self.label, self.extra = level, label, extra
    """,
    "lowbit_bare/posenc.py": """
        from lowbit.nn.posenc import PositionalEncoding

        class ScaledNoPE(PositionalEncoding):
            lowbit_plugin_api = 1

            def __init__(self, *, dim: int, strength: float = 0.5):
                super().__init__()
                self.strength = strength
    """,
    "lowbit_bare/exits.py": "import sys\nsys.exit(3)\n",
}
BARE_EP = """
[project.entry-points."lowbit.precision"]
level = "lowbit_bare.precision:LevelPrecision"
exits = "lowbit_bare.exits:Nothing"
[project.entry-points."lowbit.posenc"]
scaled_nope = "lowbit_bare.posenc:ScaledNoPE"
"""


@pytest.fixture(scope="module")
def third_party(tmp_path_factory):
    """Install the good, the broken and the YAML-less distributions into one target folder on sys.path."""
    tmp = tmp_path_factory.mktemp("dists")
    site = _install(tmp, "lowbit_fancy", FANCY, FANCY_EP)
    _install(tmp, "lowbit_broken", BROKEN, BROKEN_EP)
    _install(tmp, "lowbit_bare", BARE, BARE_EP)
    sys.path.insert(0, str(site))
    registry.refresh()
    yield site
    sys.path.remove(str(site))
    for mod in [m for m in sys.modules if m.startswith(("lowbit_fancy", "lowbit_broken", "lowbit_bare"))]:
        del sys.modules[mod]
    registry.refresh()


def test_builtin_groups_are_discovered_without_importing():
    reg = Registry()
    assert set(GROUPS) == {
        "formats",
        "precision",
        "posenc",
        "layers",
        "models",
        "data",
        "optimizers",
        "schedulers",
        "tasks",
        "recipes",
    }
    assert {"none", "rope"} <= set(reg.names("posenc"))
    assert reg.infos("models")["gpt"].dist == "lowbit"
    assert reg.infos("models")["gpt"].status == "not loaded"
    assert "lowbit.models.gpt" in reg.infos("models")["gpt"].value


def test_unknown_name_lists_installed():
    with pytest.raises(LowbitError, match=r"unknown posenc 'nope'; installed: .*none.*rope.* \(lowbit plugins\)"):
        registry.load("posenc", "nope")
    with pytest.raises(LowbitError, match="unknown plugin group 'widgets'"):
        registry.names("widgets")


def test_build_checks_options():
    pe = registry.build("posenc", {"name": "none"}, dim=8, n_heads=2)
    assert type(pe).__name__ == "NoPE"
    with pytest.raises(LowbitError, match=r"posenc 'none' has no option 'thetaa'"):
        registry.build("posenc", {"name": "none", "thetaa": 3})
    with pytest.raises(LowbitError, match="needs a 'name'"):
        registry.build("posenc", {"theta": 3})


def test_call_with_options_follows_kwargs_to_base_class():
    class Base:
        def __init__(self, *, a=1, b=2):
            self.a, self.b = a, b

    class Child(Base):
        def __init__(self, *, c=3, **kwargs):
            super().__init__(**kwargs)
            self.c = c

    obj = call_with_options(Child, "thing", {"b": 5, "c": 6}, {"a": 9, "unused": 0})
    assert (obj.a, obj.b, obj.c) == (9, 5, 6)
    with pytest.raises(LowbitError, match="thing has no option 'd'; valid: c, b"):
        call_with_options(Child, "thing", {"d": 1}, {"a": 9})


def test_third_party_plugin_is_discovered_and_built(third_party):
    info = registry.infos("posenc")["fancy"]
    assert (info.dist, info.version) == ("lowbit-fancy", "0.3.1")
    pe = registry.build("posenc", {"name": "fancy", "gain": 3.0}, dim=8, max_len=4, n_heads=2)
    assert type(pe).__module__ == "lowbit_fancy.posenc" and pe.gain == 3.0 and pe.table.shape == (4, 8)


def test_broken_plugin_names_itself_and_breaks_nothing_else(third_party):
    with pytest.raises(LowbitError) as err:
        registry.load("posenc", "broken")
    msg = str(err.value)
    assert "posenc plugin 'broken' (lowbit-broken 0.3.1) failed to import" in msg
    assert "No module named 'not_a_real_module_xyz'" in msg and "\n" not in msg
    assert registry.load("posenc", "fancy") is not None  # the good one still loads
    with pytest.raises(
        LowbitError,
        match=rf"'future' \(lowbit-broken 0.3.1\) targets plugin API 99; this lowbit provides plugin API {PLUGIN_API}",
    ):
        registry.load("posenc", "future")
    status = {(i.group, i.name): i.status for i in registry.status()}
    assert status[("posenc", "fancy")] == "ok"
    assert status[("posenc", "broken")].startswith("error: ModuleNotFoundError")
    assert status[("posenc", "future")].startswith("error: targets plugin API 99")


def test_recipe_selects_third_party_plugin_by_name(third_party):
    from lowbit.config import compose, list_recipes
    from lowbit.run import build

    assert (
        "fancy_llm",
        "a third party's GPT with its own positional encoding",
        "lowbit_fancy.recipes",
    ) in list_recipes()
    composed = compose(["recipe=fancy_llm", "debug=smoke"])
    assert composed.cfg.posenc.name == "fancy" and composed.cfg.posenc.gain == 2.0
    model = build(composed.cfg).task.model
    assert type(model.posenc).__module__ == "lowbit_fancy.posenc" and model.posenc.gain == 2.0


def test_third_party_recipe_trains_from_the_console_script(third_party, tmp_path):
    env = {"PYTHONPATH": str(third_party), "WANDB_MODE": "disabled", "PATH": str(VENV_BIN)}
    run = subprocess.run(
        [str(VENV_BIN / "train"), "recipe=fancy_llm", "debug=smoke", f"hydra.run.dir={tmp_path / 'run'}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "recipe: fancy_llm" in run.stdout
    assert "name: fancy" in (tmp_path / "run" / "config.yaml").read_text()
    listing = subprocess.run(
        [str(VENV_BIN / "lowbit"), "plugins"], env=env, capture_output=True, text=True, timeout=120
    )
    line = next(row for row in listing.stdout.splitlines() if row.split()[:2] == ["posenc", "broken"])
    assert "lowbit-broken" in line and "0.3.1" in line and "error: ModuleNotFoundError" in line


def test_a_plugin_without_yaml_is_selected_by_name_with_its_constructor_defaults(third_party):
    from lowbit.config import compose
    from lowbit.run import build

    composed = compose(["recipe=bf16_llm", "precision=level", "posenc=scaled_nope", "debug=smoke"])
    assert dict(composed.cfg.precision) == {"name": "level", "level": 3, "label": "x"}  # no 'mode' left over
    assert dict(composed.cfg.posenc) == {"name": "scaled_nope", "strength": 0.5}  # 'dim' is context
    built = build(composed.cfg)
    assert (built.precision.level, built.precision.extra) == (3, {})
    assert type(built.task.model.posenc).__name__ == "ScaledNoPE" and built.task.model.posenc.strength == 0.5
    changed = compose(["recipe=bf16_llm", "precision=level", "precision.level=5", "+precision.gain=0.25"])
    precision = build(changed.cfg).precision
    assert (precision.level, precision.extra) == (5, {"gain": 0.25})  # **extra takes any option


def test_options_are_checked_against_the_constructor_annotations(third_party):
    from lowbit.config import compose

    factory = registry.load("precision", "level")
    with pytest.raises(LowbitError, match=r"precision 'level' option 'level' must be an integer, got 'high'"):
        call_with_options(factory, "precision 'level'", {"level": "high"}, {})
    with pytest.raises(LowbitError, match=r"precision.level must be an integer \(default 3\), got 'high'"):
        compose(["precision=level", "precision.level=high"])
    pe = registry.load("posenc", "scaled_nope")
    with pytest.raises(LowbitError, match=r"posenc 'scaled_nope' has no option 'strenght'; valid: strength"):
        call_with_options(pe, "posenc 'scaled_nope'", {"strenght": 1.0}, {"dim": 8})


def test_selecting_a_broken_plugin_names_its_error_not_unknown(third_party):
    from lowbit.config import compose

    with pytest.raises(LowbitError) as err:
        compose(["posenc=broken"])
    assert "posenc plugin 'broken' (lowbit-broken 0.3.1) failed to import: ModuleNotFoundError" in str(err.value)
    with pytest.raises(
        LowbitError, match=r"precision plugin 'exits' \(lowbit-bare 0.3.1\) failed to import: SystemExit"
    ):
        compose(["precision=exits"])
    with pytest.raises(LowbitError) as err:
        compose(["precision=nope"])
    assert "unknown precision 'nope'; valid: " in str(err.value) and "level" in str(err.value)


def test_renaming_a_group_name_key_points_to_selecting_the_plugin():
    from lowbit.config import compose

    message = r"precision.name=nvfp4 would keep bf16's options \(mode\); select the plugin with precision=nvfp4"
    with pytest.raises(LowbitError, match=message):
        compose(["precision.name=nvfp4"])


def test_the_plugin_api_changes_only_with_its_version():
    """What a plugin may rely on: the groups and the context each receives. Changing either without
    raising PLUGIN_API (and updating CONTRIBUTING.md's table) fails here."""
    from lowbit.registry import CONFIG_GROUPS, CONTEXT

    surface = {
        1: (
            # optimizers, schedulers and tasks joined version 1 as new groups: no existing plugin changes
            (
                "formats",
                "precision",
                "posenc",
                "layers",
                "models",
                "data",
                "optimizers",
                "schedulers",
                "tasks",
                "recipes",
            ),
            {
                "precision": ("device_type",),
                "posenc": ("dim", "n_heads", "head_dim", "max_len", "grid"),
                "layers": ("f",),
                "models": ("posenc",),
                "data": ("seed",),
                "optimizers": ("model",),
                "schedulers": ("optimizer", "max_steps"),
                "tasks": ("model", "optimizer", "scheduler", "max_steps"),
            },
            {
                "precision": "precision",
                "posenc": "posenc",
                "model": "models",
                "data": "data",
                "optimizer": "optimizers",
                "scheduler": "schedulers",
                "task": "tasks",
            },
        )
    }
    assert surface[PLUGIN_API] == (GROUPS, CONTEXT, CONFIG_GROUPS), "plugin API changed: raise PLUGIN_API"
    contributing = (Path(__file__).resolve().parents[2] / "CONTRIBUTING.md").read_text()
    assert f"## The plugin API, version {PLUGIN_API}" in contributing


def test_a_plugin_that_fails_to_construct_is_named_in_one_line(third_party):
    with pytest.raises(LowbitError) as err:
        registry.build("posenc", {"name": "fancy"}, dim=8, max_len=-1, n_heads=2)  # torch.zeros(-1, 8) raises
    message = str(err.value)
    assert message.startswith("posenc plugin 'fancy' (lowbit-fancy 0.3.1) failed to construct: RuntimeError: ")
    assert "\n" not in message and isinstance(err.value.__cause__, RuntimeError)
