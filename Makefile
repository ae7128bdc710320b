# `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install install-all demo test lint bench clean

# What the app needs: the same requirements.txt a Hugging Face Space installs.
$(BIN)/.runtime: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip check  # the pins resolve together, as a Space's plain `pip install -r` needs
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# Plus tests, lint, the browser driver and the evaluation suite's networks.
$(BIN)/.installed: $(BIN)/.runtime requirements-dev.txt requirements-eval.txt requirements-eval-nodeps.txt
	$(BIN)/pip install --quiet -r requirements.txt -r requirements-dev.txt -r requirements-eval.txt
	$(BIN)/pip install --quiet --no-deps -r requirements-eval-nodeps.txt
	touch $@

install: $(BIN)/.runtime

install-all: $(BIN)/.installed

demo: install
	$(BIN)/python app/app.py

test: install-all
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

bench: install-all
	$(BIN)/python bench/bench_training.py
	$(BIN)/python bench/bench_inference.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
