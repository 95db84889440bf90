# make test: lint + the CPU test suite.  make demo: the embedded demo.
# Each creates .venv if missing and installs what it needs; nothing downloads weights or data.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: test demo lint format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e ".[dev]"
	touch $@

$(VENV)/.base-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e .
	touch $@

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

test: lint
	$(BIN)/python -m pytest -q

demo: $(VENV)/.base-installed
	$(BIN)/dlip demo

format: $(VENV)/.dev-installed
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
