# leasectl developer entry points. `make run` = quick start, `make test` = everything CI checks.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: venv run test test-live lint typecheck unit integration bench bench-quick clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

run: venv
	bash scripts/quickstart.sh

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest

# Against a real Daytona organization: needs DAYTONA_API_KEY and DAYTONA_API_URL (skips otherwise).
# Every sandbox the run creates carries its own instance label and is deleted at the end.
test-live: venv
	$(BIN)/pytest tests/live -v -rs

unit: venv
	$(BIN)/pytest tests/unit

integration: venv
	$(BIN)/pytest tests/integration

bench: venv
	$(BIN)/python -m bench --full

bench-quick: venv
	$(BIN)/python -m bench --quick

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis build dist *.egg-info
