"""Options of the recipe tests: ``--update-golden`` rewrites tests/recipes/golden_losses.json."""

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden",
        action="store_true",
        default=False,
        help="rewrite tests/recipes/golden_losses.json from this run instead of comparing with it",
    )


@pytest.fixture
def update_golden(request: pytest.FixtureRequest) -> bool:
    """True under ``--update-golden``; False also when pytest started from a directory above this one
    (the option exists only when this conftest is loaded at start-up, as it is for a path under it)."""
    return bool(request.config.getoption("update_golden", default=False))
