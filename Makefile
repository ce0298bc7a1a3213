# leasectl developer entry points. `make run` = quick start, `make test` = everything CI checks.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: venv run test test-live lint typecheck unit integration bench bench-quick bench-huge soak screenshots clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The status page's browser tests drive Debian's Chromium through Playwright (never `playwright
# install`, which downloads a browser of its own). Installed when missing, as root; otherwise a note.
/usr/bin/chromium:
	@if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium; \
	else echo "note: /usr/bin/chromium is missing: 'sudo apt-get install chromium' for the browser tests"; fi

venv: $(STAMP) /usr/bin/chromium

run: venv
	bash scripts/quickstart.sh

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv
	$(BIN)/mypy

# Test files are spread over TEST_WORKERS processes (pytest-xdist; a file's tests stay together, so
# its module fixtures start once). TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= 3

test: lint typecheck
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile

# Against a real Daytona organization: needs DAYTONA_API_KEY and DAYTONA_API_URL (skips otherwise).
# Every sandbox the run creates carries its own instance label and is deleted at the end.
test-live: venv
	$(BIN)/pytest tests/live -v -rs

unit: venv
	$(BIN)/pytest tests/unit

integration: venv
	$(BIN)/pytest tests/integration

# Every benchmark at full size (the soak too: about an hour), its records appended to
# bench/results-full.jsonl, then bench/RESULTS.md regenerated from every records file.
RESULTS := bench/results-full.jsonl bench/results-huge.jsonl bench/results-pools.jsonl bench/results-soak.jsonl
bench: venv
	$(BIN)/python -m bench --full --jsonl bench/results-full.jsonl
	$(BIN)/python -m bench.report $(RESULTS) -o bench/RESULTS.md

bench-quick: venv
	$(BIN)/python -m bench --quick

# One no-op pass over 1,000, 10,000 and 100,000 leases on both databases (about half an hour; not
# run by CI). `make bench-huge HUGE_JSONL=bench/results-huge.jsonl` keeps the records for bench.report;
# BASELINE=main also runs main's controller on the same fleets (up to 10,000 leases) for the ratio.
HUGE_JSONL ?=
BASELINE   ?=
bench-huge: venv
	$(BIN)/python -m bench --huge $(if $(HUGE_JSONL),--jsonl $(HUGE_JSONL)) $(if $(BASELINE),--baseline $(BASELINE))

# Re-take the status page screenshots the README shows (docs/status-page*.png) with the browser test.
screenshots: venv
	UPDATE_SCREENSHOTS=1 $(BIN)/pytest tests/integration/test_status_page_browser.py

# The chaos soak (bench/soak.py): PostgreSQL with two replicas and a database outage, then SQLite with
# one; every fault of the local API, >= 100 SIGKILLs in 20 minutes. Exit status 1 on any loss.
# `make soak SOAK_MINUTES=5`; SOAK_JSONL=bench/results-soak.jsonl appends the records for bench.report.
SOAK_MINUTES ?= 20
SOAK_JSONL   ?=
soak: venv
	rc=0; \
	$(BIN)/python -m bench.soak --backend postgres --minutes $(SOAK_MINUTES) $(if $(SOAK_JSONL),--jsonl $(SOAK_JSONL)) || rc=1; \
	$(BIN)/python -m bench.soak --backend sqlite --minutes $(SOAK_MINUTES) $(if $(SOAK_JSONL),--jsonl $(SOAK_JSONL)) || rc=1; \
	exit $$rc

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis build dist *.egg-info
