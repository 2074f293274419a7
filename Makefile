# The two set-up commands (README): `make train` and `make test`. Both create .venv and
# install lowbit on first use (again only when pyproject.toml changes), so each is idempotent.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lowbit-installed
RECIPE ?= nvfp4_llm
# pip constraints for the install; CI passes .ci/constraints.txt (the versions it tests against)
CONSTRAINTS ?=
ARGS ?=
# test workers (pytest-xdist): one per core, at most 4; TEST_WORKERS=0 runs the tests in this process
TEST_WORKERS ?= auto

.PHONY: setup train test test-all lint format clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]' $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
	touch $(STAMP)

setup: $(STAMP)

train: $(STAMP)
	$(BIN)/train recipe=$(RECIPE) $(ARGS)

test: $(STAMP)
	WANDB_MODE=disabled $(BIN)/pytest -n $(TEST_WORKERS) --maxprocesses=4 --dist worksteal $(ARGS)

test-all: $(STAMP)
	WANDB_MODE=disabled $(BIN)/pytest -n $(TEST_WORKERS) --maxprocesses=4 --dist worksteal -m 'not gpu or gpu' $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache
