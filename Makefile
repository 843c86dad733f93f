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

# The command users run: sweep -> palettize (4.3 bits on average) -> self-distil -> convert -> verify, with the
# rest of the pipeline (tokenizer, text encoder, VAE decoder, pipeline.json) beside the denoiser; then pictures
# drawn from text through the packages, against the torch pipeline from the same noise.
DEMO_RES := $(OUT)/demo/w0.5/Resources
demo: setup
	$(BIN)/edgecompile info
	$(BIN)/edgecompile export --width 0.5 --bits mixed --pipeline -o $(OUT)/demo --force
	$(BIN)/edgecompile inspect $(DEMO_RES)/MultiModalDiffusionTransformer.mlpackage
	$(BIN)/edgecompile verify $(DEMO_RES)/MultiModalDiffusionTransformer.mlpackage --precision fp16
	$(BIN)/edgecompile sample $(DEMO_RES) -o $(OUT)/demo/digits.png --force --compare \
		--prompt "zero" --prompt "a handwritten 1" --prompt "the digit two" --prompt "3" --prompt "a four" \
		--prompt "number five" --prompt "a handwritten six" --prompt "7" --prompt "the number eight" --prompt "a nine"

test: setup
	$(BIN)/python -m pytest -q tests

# Writes under $(OUT)/bench only; the README quotes the committed run in benchmarks/results.
bench: setup
	$(BIN)/python -m pip install -q -e ".[dev,bench]"
	$(BIN)/python benchmarks/kmeans_speed.py --output $(OUT)/bench
	$(BIN)/python benchmarks/graph_census.py --output $(OUT)/bench
	$(BIN)/python benchmarks/demo_speed.py --output $(OUT)/bench
	$(BIN)/python benchmarks/quantization_quality.py --output $(OUT)/bench
	$(BIN)/python benchmarks/sweep_scale.py --output $(OUT)/bench
	$(BIN)/python benchmarks/export_scale.py --output $(OUT)/bench
	$(BIN)/edgecompile export --width all --bits 16 -o $(OUT)/bench/fp16 --force
	$(BIN)/edgecompile export --width all --bits mixed -o $(OUT)/bench/mixed --force
	$(BIN)/edgecompile bench $(OUT)/bench/fp16/*/*.mlpackage $(OUT)/bench/mixed/*/*.mlpackage \
		--reports $(OUT)/bench/fp16/w0.5/report.json --reports $(OUT)/bench/mixed/w0.5/report.json \
		--config recipes/snapgenpp.yaml --host-latent 32x32 --repeats 3 -o $(OUT)/bench/report

lint: setup
	$(BIN)/ruff check edgecompile tests benchmarks scripts

clean:
	rm -rf $(OUT) .pytest_cache
