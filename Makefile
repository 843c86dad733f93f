# Two commands on a fresh machine: `make demo` and `make test` (each sets up .venv first).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
OUT     ?= out

.PHONY: setup demo test bench lint clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The local CPU wheel first: a looser torch requirement would otherwise pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/edgecompile info
	$(BIN)/edgecompile export --width 0.5 -o $(OUT)/demo --force
	$(BIN)/edgecompile inspect $(OUT)/demo/w0.5/toy_w0.5_fp16.mlpackage
	$(BIN)/edgecompile verify $(OUT)/demo/w0.5/toy_w0.5_fp16.mlpackage --precision fp16

test: setup
	$(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/python benchmarks/graph_census.py --output $(OUT)/bench
	$(BIN)/python benchmarks/export_scale.py --output $(OUT)/bench

lint: setup
	$(BIN)/ruff check edgecompile tests benchmarks scripts

clean:
	rm -rf $(OUT) .pytest_cache
