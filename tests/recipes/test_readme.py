"""The README stays true: its recipe table lists exactly the shipped recipes, with their descriptions."""

import csv
import math
import os
import re
import subprocess
import sys
from pathlib import Path

from lowbit.config import list_recipes

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_recipe_table_matches_lowbit_recipes():
    text = README.read_text()
    table = text.split("<!-- recipes:begin")[1].split("<!-- recipes:end -->")[0]
    rows = dict(re.findall(r"^\| `([^`]+)` \| (.+?) \|$", table, flags=re.M))
    shipped = {name: desc for name, desc, package in list_recipes() if package == "lowbit.recipes"}
    assert rows == shipped


def test_readme_shows_the_two_commands_first():
    text = README.read_text()
    first_block = text.split("```bash")[1].split("```")[0]
    assert "make train" in first_block and "make test" in first_block
    ci = (README.parent / ".ci" / "run").read_text()
    assert "make test" in ci


def test_readme_library_example_runs_as_written(tmp_path):
    """The "Use lowbit in your own LightningModule" block, run as a script: NVFP4 on a stock timm ViT."""
    section = README.read_text().split("## Use lowbit in your own LightningModule")[1].split("\n## ")[0]
    code = section.split("```python\n")[1].split("```")[0]
    script = tmp_path / "example.py"
    script.write_text(code)
    env = {**os.environ, "WANDB_MODE": "disabled"}
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    # 2 blocks x (qkv, proj, fc1, fc2) in NVFP4; net.head kept by default, though its 10 classes would not fit blocks
    assert "nvfp4: 8 of 9 Linear layers quantized" in done.stdout
    with open(tmp_path / "health.csv") as f:
        rows = list(csv.DictReader(f))
    assert {row["step"] for row in rows} == {"0", "2"}
    assert {row["layer"] for row in rows} == {
        f"net.blocks.{b}.{layer}" for b in (0, 1) for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    }
    assert all(math.isfinite(float(row["snr_db"])) and float(row["snr_db"]) > 5 for row in rows)
