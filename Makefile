# Two entry points: `make serve` runs the daemon on its defaults, `make test` runs every check.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test lint types pytest bench-e2e clean

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "smtpq needs Python 3.11+"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,fast]'
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/smtpq serve

test: lint types pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

types: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest -q $(PYTEST_ARGS)

# End to end against Postfix and python-slimta (installs them on first use; see bench/README.md).
bench-e2e: $(STAMP)
	$(BIN)/python bench/e2e.py --all --json-out bench/work/e2e.json

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
