"""The distribution: the wheel builds without a warning, holds every package and recipe, and a
venv that has lowbit only from that wheel runs ``train debug=smoke``.

The wheel is built from a copy of the sources (setuptools reuses ``build/`` in the tree, so a module
deleted since the last build would still ship from there). The fresh venv takes its dependencies
from this venv's site-packages through a ``.pth`` path line, so nothing is downloaded or
reinstalled; a path line does not run that directory's own ``.pth`` files, so the editable
install's finder never loads there, and the venv's own site-packages comes first on ``sys.path``.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGE_DIRS = PYPROJECT["tool"]["setuptools"]["package-dir"]  # import name -> folder
SOURCES = ["pyproject.toml", "README.md", *PACKAGE_DIRS.values()]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, str]:
    """(the wheel, pip's verbose output) built from a fresh copy of the sources."""
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    out = tmp_path_factory.mktemp("wheel")
    # PYTHONDONTWRITEBYTECODE only makes distutils say "byte-compiling is disabled": not a packaging matter
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v", "-w", str(out), "."]
    done = subprocess.run(command, cwd=src, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    (wheel,) = out.glob("lowbit-*.whl")
    return wheel, output


def test_the_wheel_builds_without_a_warning(built):
    _, output = built
    warnings = [line for line in output.splitlines() if "warn" in line.lower()]
    assert not warnings, "\n".join(warnings)


def test_every_folder_is_a_listed_package():
    """A folder missing from the list would not ship (and a YAML-only one makes setuptools warn)."""
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    folders = set()
    for name, folder in PACKAGE_DIRS.items():
        root = ROOT / folder
        for path in [root, *(p for p in root.rglob("*") if p.is_dir())]:
            rel = path.relative_to(root).parts
            if not any(part == "__pycache__" or part.startswith(".") for part in rel):
                folders.add(".".join((name, *rel)))
    assert folders - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert listed - folders == set(), "these packages in pyproject.toml have no folder"


def test_the_wheel_holds_every_module_and_recipe(built):
    wheel, _ = built
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = set()
    for name, folder in PACKAGE_DIRS.items():
        prefix = name.replace(".", "/")
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".yaml") and "__pycache__" not in path.parts:
                expected.add(f"{prefix}/{path.relative_to(ROOT / folder).as_posix()}")
    assert "lowbit/recipes/recipe/nvfp4_llm.yaml" in expected and "lowbit/plugins/precision/nvfp4.py" in expected
    assert expected - names == set()
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "[lowbit.precision]" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_a_venv_with_only_the_wheel_trains(built, tmp_path):
    wheel, _ = built
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)]
    subprocess.run(install, check=True, capture_output=True, timeout=120)
    site = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], text=True
        ).strip()
    )
    deps = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}  # this venv's: torch, lightning, ...
    (site / "_lowbit_test_deps.pth").write_text("".join(f"{path}\n" for path in sorted(deps)))

    where = "import lowbit, lowbit.plugins, lowbit.recipes, lowbit.kernels, importlib.metadata as m; "
    where += "print(lowbit.__file__, lowbit.plugins.__file__, lowbit.recipes.__file__, lowbit.kernels.__file__, m.distribution('lowbit')._path)"
    paths = subprocess.check_output([python, "-c", where], text=True, cwd=tmp_path).split()
    assert all(Path(p).is_relative_to(site) for p in paths), paths

    env = {**os.environ, "WANDB_MODE": "disabled"}
    done = subprocess.run(
        [venv / "bin" / "train", "debug=smoke"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "val bits/byte:" in output
