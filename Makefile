# One-command set-up on a fresh machine: `make finetune` (main job) and `make test` (test suite).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTEST := $(BIN)/python -m pytest -q -n 2 --durations=15

.PHONY: venv finetune test test-slow notebooks docs clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch 2.13.0 is a local CPU wheel here; installing it first keeps peft from pulling a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]' --config-settings editable_mode=compat
	touch $@

venv: $(BIN)/.installed

finetune: venv
	$(BIN)/python experiments/finetune_gemma.py

test: venv  # the suite minus the heaviest end-to-end runs (marked slow; CI runs them next)
	$(PYTEST) -m "not slow" tests

test-slow: venv  # the heaviest end-to-end runs: notebooks in quick mode, benchmark smoke, ...
	$(PYTEST) -m slow tests

lint: venv  # one dialect: ruff's formatter (Google 2-space) and linter, configured in pyproject.toml
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: venv  # rewrite the tree in the house dialect
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

notebooks: venv  # re-run every ablation in full mode; outputs written into notebooks/*.ipynb
	$(BIN)/python notebooks/execute.py --mode full
	$(BIN)/python experiments/render_docs.py

docs: venv  # rewrite every generated number in README, BENCHMARKS, RELIABILITY from committed results
	$(BIN)/python experiments/render_docs.py

clean:
	rm -rf $(VENV)
