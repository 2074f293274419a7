"""The one-way import rule, read from the source (every import, also those inside functions):

    numerics -> nothing of lowbit but itself and ``lowbit.errors`` (a dependency-free leaf)
    kernels  -> numerics' public API, errors
    framework -> never a concrete plugin or the recipes (it asks the registry by name)
    plugins  -> never the recipes
and across packages only public names: no ``lowbit.x._private`` module, no ``_name`` imported.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "framework": "lowbit",
    "plugins": "lowbit.plugins",
    "kernels": "lowbit.kernels",
    "recipes": "lowbit.recipes",
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = [PACKAGES[rel.parts[0]], *rel.with_suffix("").parts[1:]]
    return ".".join(p for p in parts if p != "__init__")


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(lowbit module imported, names taken from it) for every import statement in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name.startswith("lowbit")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("lowbit"):
            found.append((node.module, [alias.name for alias in node.names]))
    return found


def _layer(module: str) -> str:
    for prefix in ("lowbit.numerics", "lowbit.kernels", "lowbit.plugins", "lowbit.recipes", "lowbit.errors"):
        if module == prefix or module.startswith(prefix + "."):
            return prefix.removeprefix("lowbit.")
    return "framework"


ALLOWED = {
    "numerics": {"numerics", "errors"},
    "errors": set(),
    "kernels": {"kernels", "numerics", "errors"},
    "framework": {"framework", "numerics", "kernels", "errors"},
    "plugins": {"plugins", "framework", "numerics", "kernels", "errors"},
    "recipes": {"recipes", "framework", "numerics", "errors", "plugins"},
}


def _violations() -> list[str]:
    out = []
    for folder in PACKAGES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            importer = _module_name(path)
            layer = _layer(importer)
            for module, names in _imports(path):
                target = _layer(module)
                where = f"{path.relative_to(ROOT)}: {importer} imports {module}"
                if target not in ALLOWED[layer]:
                    out.append(f"{where} ({layer} may not depend on {target})")
                if target == layer and layer != "framework":
                    continue  # a package's own private helpers are its business
                top = module.split(".")[: 3 if module.startswith(("lowbit.plugins", "lowbit.kernels")) else 2]
                private_module = any(p.startswith("_") for p in module.split(".")[len(top) - 1 :])
                if target != layer and (private_module or any(n.startswith("_") for n in names)):
                    out.append(f"{where} {names} (private across packages)")
    return out


def test_imports_follow_the_one_way_rule():
    assert _violations() == []


def test_the_rule_catches_a_violation(tmp_path, monkeypatch):
    fake = ROOT / "framework" / "numerics" / "zz_violation_probe.py"
    fake.write_text("from lowbit.registry import registry\nfrom lowbit.quant.linear import _private\n")
    try:
        found = _violations()
    finally:
        fake.unlink()
    assert any("numerics may not depend on framework" in v for v in found)


@pytest.mark.parametrize("blocked", ["lowbit.registry", "lightning", "hydra"])
def test_numerics_imports_with_the_registry_and_lightning_unimportable(blocked):
    code = (
        "import sys\n"
        f"sys.modules[{blocked!r}] = None  # import raises ImportError\n"
        "import lowbit.numerics as n\n"
        "x = n.fake_quantize(__import__('torch').linspace(-3, 3, 64), 'nvfp4')\n"
        "assert n.get_format('e2m1').max == 6.0\n"
        "print(sorted(m for m, mod in sys.modules.items() if mod is not None and m.startswith('lowbit')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = eval(out.stdout.strip().splitlines()[-1])
    assert all(m == "lowbit" or m.startswith(("lowbit.numerics", "lowbit.errors")) for m in loaded), loaded
