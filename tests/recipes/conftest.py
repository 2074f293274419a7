"""Options of the recipe tests: ``--update-golden`` rewrites tests/recipes/golden_losses.json after a
change that moves numbers; ``--add-golden-machine`` adds this machine kind's losses beside the others'
(same code, another CPU instruction set)."""

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden",
        action="store_true",
        default=False,
        help="rewrite tests/recipes/golden_losses.json from this run instead of comparing with it",
    )
    parser.addoption(
        "--add-golden-machine",
        action="store_true",
        default=False,
        help="store this machine kind's golden losses beside the other kinds' (the code unchanged)",
    )


@pytest.fixture
def update_golden(request: pytest.FixtureRequest) -> str | None:
    """``replace`` under ``--update-golden``, ``add`` under ``--add-golden-machine``, else None; None also
    when pytest started from a directory above this one (the options exist only when this conftest is
    loaded at start-up, as it is for a path under it)."""
    if request.config.getoption("update_golden", default=False):
        return "replace"
    return "add" if request.config.getoption("add_golden_machine", default=False) else None
