"""The README stays true: its recipe table lists exactly the shipped recipes, with their descriptions."""

import re
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
