PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -c constraints.txt

.PHONY: setup demo test test-gpu bench lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

setup: $(BIN)/python
	$(PIP) -q torch==2.13.0
	$(PIP) -q -e '.[test]'

demo: setup
	$(BIN)/python -m tandem synth tiny-qwen3-moe --out .demo/tiny-qwen3-moe
	$(BIN)/tandem run .demo/tiny-qwen3-moe --prompt "The quick brown fox" --max-new-tokens 24

test: setup
	$(BIN)/ruff check tandem tests bench
	$(BIN)/python -m pytest -q -x tests -m "not gpu"

test-gpu: setup
	$(BIN)/python -m pytest -q tests -m gpu

bench: setup
	$(BIN)/python bench/run_all.py

lint: setup
	$(BIN)/ruff check tandem tests bench

clean:
	rm -rf $(VENV) .demo build *.egg-info
