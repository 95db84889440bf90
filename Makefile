# make test: lint + the CPU test suite.  make demo: the embedded demo.
# Each creates .venv if missing and installs what it needs; nothing downloads weights or data.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: test demo lint format clean bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e ".[dev]"
	touch $@

$(VENV)/.demo-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e ".[demo]"
	touch $@

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

test: lint
	$(BIN)/python -m pytest -q

demo: $(VENV)/.demo-installed
	$(BIN)/dlip demo

# Re-measure size, latency (CPU, one thread) and dlip vs transformers, then re-render the tables
# of docs/benchmarks.md from benchmarks/results/*.json (the slow eval / training / KD results are
# rendered from their stored JSON; their scripts are in benchmarks/).
bench: $(VENV)/.dev-installed
	OMP_NUM_THREADS=1 $(BIN)/dlip bench all --threads 1
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/hf_speed.py --threads 1
	$(BIN)/python benchmarks/report.py

format: $(VENV)/.dev-installed
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
