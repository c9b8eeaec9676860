# EdgeFleet: `make demo` runs the main job, `make test` runs the checks and the tests.
# Both create .venv and install what they need into it.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PACKAGES := firmware_bundles converters server device_agent hil edgefleet
# Exactly the CPU wheel on the CI machines' disk; any other version downloads gigabytes.
TORCH := torch==2.13.0

.PHONY: demo test lint typecheck pytest bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[convert,torch,device,server,dev,ble]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python demo/run_demo.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy $(PACKAGES)

pytest: $(STAMP)
	$(BIN)/python -m pytest

test: lint typecheck pytest

bench: $(STAMP)
	$(BIN)/python bench/bench_verify.py
	$(BIN)/python bench/bench_convert.py
	$(BIN)/python bench/bench_agent.py
	$(BIN)/python bench/bench_link.py

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache
