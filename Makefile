# make run            - set up .venv if needed, then run the pipeline on the embedded default
# make test           - set up .venv if needed, then run the whole test suite (what CI runs; prints the 25 slowest)
# make test-fast      - the lint gate, then the tests to run while working: every unit test and one smoke pipeline (8 to 13 min on 2 cores)
# make lint           - ruff over the package, the tests and the benchmarks (its rules: pyproject.toml)
# make test-shuffled  - the fast tier with files and tests in a shuffled order (SEED=<n>, default 1; ARGS= for more)
# make chaos          - the smoke pipeline SIGKILLed at 5 random moments and started again: the same NLL (several minutes)
# make ui             - MLflow UI for ./mlruns.db on http://127.0.0.1:5000
# make classifier     - train the fixed MNIST classifier that scores digit samples (sample.classifier), once
# make bench          - the benchmarks' quick mode (a few minutes), BENCHMARKS.md regenerated
# make bench-full     - the full mode (about an hour on 2 cores)
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
MNIST := data/mnist.npz
CLASSIFIER := data/mnist_classifier.pt
BROWSER := $(VENV)/.browser-stamp

.PHONY: run test test-fast test-shuffled chaos ui bench bench-full clean classifier lint

$(STAMP): pyproject.toml
	@echo "[make] creating $(VENV) and installing hvae with torch, ray, mlflow (about 2-3 minutes, ~6.5 GB)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[test]' 2>&1 | { grep -v "^WARNING: Location" || true; }
	touch $(STAMP)

# the full MNIST (data.dataset=mnist), fetched once at set-up: never at run time
$(MNIST): | $(STAMP)
	$(BIN)/hvae fetch mnist --root data

# a headless browser for the UI test (tests/test_ui.py): Debian's chromium, installed when
# missing and possible (root, apt); otherwise that one test skips and says why
$(BROWSER): | $(STAMP)
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { echo "[make] installing chromium (apt-get) for the browser test"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } 2>&1 | tail -3 \
	    || echo "[make] chromium could not be installed: tests/test_ui.py will skip"; }
	touch $(BROWSER)

# the digit classifier that scores MNIST samples (models/digits.py), trained once (about 2 minutes)
$(CLASSIFIER): | $(MNIST)
	$(BIN)/python bench/classifier.py

classifier: $(CLASSIFIER)

run: $(STAMP) $(MNIST)
	$(BIN)/hvae run configs/default.yaml

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint $(STAMP) $(MNIST) $(BROWSER)
	$(BIN)/python -m pytest -q --durations=25 -m "not chaos"

test-fast: lint $(STAMP) $(MNIST)
	$(BIN)/python -m pytest -q -m "not slow and not chaos"

chaos: $(STAMP) $(MNIST)
	$(BIN)/python -m pytest -q -s -m chaos

SEED ?= 1
test-shuffled: $(STAMP) $(MNIST)
	HVAE_TEST_SHUFFLE=$(SEED) $(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow and not chaos" $(ARGS)

ui: $(STAMP)
	$(BIN)/hvae ui

bench: $(STAMP) $(MNIST)
	$(BIN)/python bench/sampling.py
	$(BIN)/python bench/step.py
	$(BIN)/python bench/reuse.py
	$(BIN)/python bench/pipeline.py configs/smoke.yaml
	$(BIN)/python bench/overhead.py configs/smoke.yaml

bench-full: $(STAMP) $(MNIST)
	$(BIN)/python bench/sampling.py --full
	$(BIN)/python bench/step.py --full
	$(BIN)/python bench/layout.py --rounds 2
	$(BIN)/python bench/reuse.py
	$(BIN)/python bench/pipeline.py configs/default.yaml
	$(BIN)/python bench/overhead.py configs/default.yaml
	$(BIN)/python bench/data_plane.py --images 5000,60000

clean:
	rm -rf ray_results mlartifacts mlruns.db
