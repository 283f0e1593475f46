"""`tandem upcycle`: a dense Llama becomes a Mixtral whose logits equal the dense model's."""

from __future__ import annotations

import json
from unittest import mock

import pytest
import torch
import transformers
from tiny import BASE, FAMILIES, make_hf

import tandem
from tandem.cli import main

PLAIN = {"llama_plain": ("LlamaConfig", "LlamaForCausalLM", dict(BASE, tie_word_embeddings=False))}


def rel_err(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    with mock.patch.dict(FAMILIES, PLAIN):
        hf = make_hf("llama_plain")
    path = tmp_path_factory.mktemp("dense")
    hf.save_pretrained(path)
    return hf, path


def test_upcycled_logits_equal_dense(dense, tmp_path):
    hf, path = dense
    out = tmp_path / "moe"
    assert main(["upcycle", str(path), "--experts", "4", "--top-k", "2", "--out", str(out), "--dtype", "float32"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "mixtral" and cfg["num_local_experts"] == 4 and cfg["num_experts_per_tok"] == 2
    ids = list(range(2, 50))
    dense_llm = tandem.load(path, dtype="float32", progress=False)
    moe_llm = tandem.load(out, dtype="float32", progress=False)
    assert "experts.cpu" in repr(moe_llm.model.model.layers[0].block_sparse_moe.experts)  # the C++ kernel
    ref = dense_llm.logits(ids)
    assert rel_err(moe_llm.logits(ids), ref) <= 1e-5
    # and transformers reads the same directory as a Mixtral with the same function
    moe_hf = transformers.MixtralForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert rel_err(moe_hf(torch.tensor([ids])).logits[0], ref) <= 1e-5
    # routing is real: tokens spread over several experts in layer 0
    x = torch.randn(64, hf.config.hidden_size)
    ids_, _ = moe_llm.model.model.layers[0].block_sparse_moe.gate(x)
    assert ids_.unique().numel() > 2


def test_upcycle_rejects_bad_input(dense, tmp_path, capsys):
    _, path = dense
    assert main(["upcycle", str(path), "--experts", "2", "--top-k", "3", "--out", str(tmp_path / "x")]) == 2
    assert "--top-k 3" in capsys.readouterr().err
