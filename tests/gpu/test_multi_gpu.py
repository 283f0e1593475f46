"""Two GPUs from transfer_map (KDeepseekV2Model semantics: the hidden state moves to the named device before that
layer; each layer's operators and KV cache live with the layer): every tiny family's 2gpu preset, and the seed's
2-GPU rule file verbatim on a 40-layer DeepSeek-V2, against the CPU reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gpu_ref import RTOL, dequantized_reference, rel_err
from tiny import FAMILIES, make_hf, save_hf

import tandem

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")]
IDS = [3, 17, 42, 7, 99, 1, 64, 12, 5, 150, 33]
SEED_2GPU = Path(__file__).parents[1] / "rules" / "data" / "DeepSeek-V2-Chat-multi-gpu.yaml"


def _devices_used(llm) -> set[str]:
    return {str(t.device) for t in llm.model.parameters()} | {str(t.device) for t in llm.model.buffers()}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_2gpu_preset_equals_cpu(family, tmp_path):
    path = save_hf(make_hf(family), tmp_path / "m")
    ref = tandem.load(path, rules="none", dtype="float32", progress=False)
    llm = tandem.load(path, rules="2gpu", dtype="float32", progress=False)
    assert {"cuda:0", "cuda:1"} <= _devices_used(llm)
    assert llm.model.model.op_config.kwargs["transfer_map"]
    assert rel_err(llm.logits(IDS), ref.logits(IDS)) < RTOL
    assert llm.generate(IDS, max_new_tokens=6).token_ids == ref.generate(IDS, max_new_tokens=6).token_ids


def test_seed_two_gpu_rule_file_on_deepseek_v2(tmp_path, monkeypatch):
    """seeds/000's DeepSeek-V2-Chat 2-GPU file: layers 0-29 on cuda:0, 30.. on cuda:1 (transfer_map 30), Marlin
    linears, CPU experts for decode and torch experts on each GPU for prefill."""
    cfg, cls, kw = FAMILIES["deepseek_v2"]
    monkeypatch.setitem(FAMILIES, "deepseek_v2_40", (cfg, cls, dict(kw, num_hidden_layers=40)))
    path = save_hf(make_hf("deepseek_v2_40"), tmp_path / "m")
    llm = tandem.load(path, rules=str(SEED_2GPU), dtype="float32", progress=False)
    assert llm.model.model.op_config.kwargs["transfer_map"][30] == "cuda:1"
    assert str(llm.model.model.layers[29].self_attn.o_proj.weight.device) == "cuda:0"
    assert str(llm.model.model.layers[30].self_attn.o_proj.weight.device) == "cuda:1"
    ref = dequantized_reference(path, llm)
    assert rel_err(llm.logits(IDS), ref.logits(IDS)) < RTOL
    assert llm.generate(IDS, max_new_tokens=6).token_ids == ref.generate(IDS, max_new_tokens=6).token_ids
