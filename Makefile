# EdgeFleet: `make demo` runs the main job, `make test` runs the checks and the tests.
# Both create .venv and install what they need into it.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PACKAGES := firmware_bundles converters server device_agent hil edgefleet
# Exactly the CPU wheel on the CI machines' disk; any other version downloads gigabytes.
TORCH := torch==2.13.0
# Test processes (pytest-xdist); 2 matches the CI machines' cores.
PYTEST_WORKERS ?= 2

# The ONNX -> TFLite tool environment (onnx2tf pins numpy 1.26, onnx 1.19, onnxruntime 1.23,
# TensorFlow 2.19 exactly, which cannot share .venv); converters/tflite.py calls it as a
# subprocess. About 1.5-2.5 min to install, 2.6 GB.
TFLITE_VENV := .venv-tflite
TFLITE_STAMP := $(TFLITE_VENV)/.installed
ONNX2TF := onnx2tf==1.29.24

# The browser tests drive Debian's Chromium (never a browser Playwright downloads).
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo walkthrough test lint typecheck pytest bench clean tflite-env vendor chromium screenshots

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[convert,torch,device,server,mlflow,dev,ble]"
	$(BIN)/python -m pip check
	touch $(STAMP)

$(TFLITE_STAMP):
	test -x $(TFLITE_VENV)/bin/python || $(PYTHON) -m venv $(TFLITE_VENV)
	$(TFLITE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(TFLITE_VENV)/bin/python -m pip install --quiet "$(ONNX2TF)"
	$(TFLITE_VENV)/bin/python -m pip check
	touch $(TFLITE_STAMP)

tflite-env: $(TFLITE_STAMP)

# The live fleet (demo/live_fleet.py): a server with its dashboard, 1,000 simulated devices running
# the real agent, staged rollouts judged by the server's evaluator; runs until Ctrl-C.
# `make demo ARGS=--once` tells the story once and exits 0 only if the evaluator decided it.
ARGS ?=
demo: $(STAMP)
	$(BIN)/python demo/live_fleet.py $(ARGS)

# The narrated walk through one bundle's life: keys, signing, attacks, the converter, one phone.
walkthrough: $(STAMP) $(TFLITE_STAMP)
	$(BIN)/python demo/run_demo.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy $(PACKAGES)

pytest: $(STAMP) $(TFLITE_STAMP) chromium
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadgroup --no-loadscope-reorder

test: lint typecheck pytest

bench: $(STAMP) $(TFLITE_STAMP)
	$(BIN)/python bench/bench_verify.py
	$(BIN)/python bench/bench_convert.py
	$(BIN)/python bench/bench_agent.py
	$(BIN)/python bench/bench_link.py

# The dashboard's JavaScript and CSS, refetched from the npm registry and checked against the
# SHA-256s in server/ui/static/vendor/VENDOR.json (nothing is fetched at run time).
vendor: $(STAMP)
	$(BIN)/python tools/vendor.py

chromium:
	test -x $(CHROMIUM) || ($(SUDO) apt-get update && $(SUDO) apt-get install -y chromium)

# docs/screenshots/*.png of each dashboard page, from the browser tests' seeded fleet.
screenshots: $(STAMP) chromium
	$(BIN)/python tools/screenshots.py

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache
