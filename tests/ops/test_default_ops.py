"""`class: default` on an RMSNorm or a RotaryEmbedding places the norm / rope operator (fused Triton kernels on a
GPU, tested in tests/gpu/test_fused.py); on the CPU those operators compute exactly what the model layers do."""

from __future__ import annotations

import pytest
import torch
from tiny import make_hf, save_hf

import tandem
from tandem.models.layers import RMSNorm, RotaryEmbedding
from tandem.ops.base import LoadContext, OpConfig, build_device_op
from tandem.ops.norm import NormOp
from tandem.ops.rope import RoPEOp

ALL_DEFAULT = '''
- match: {name: ".*"}
  replace: {class: default, kwargs: {generate_device: "cpu", prefill_device: "cpu"}}
'''
IDS = [3, 17, 42, 7, 99, 1, 64, 12, 5, 150, 33, 2, 77]


# llama3 rope scaling; Qwen3's q/k norms over [N, H, d]; DeepSeek's MLA (q_a / kv_a norms, interleaved YaRN rope)
@pytest.mark.parametrize("family", ["llama", "qwen3_moe", "deepseek_v2", "deepseek_v3"])
def test_default_norms_and_ropes_are_their_operators_and_logits_are_unchanged(family, tmp_path):
    path = save_hf(make_hf(family), tmp_path / "m")
    rules = tmp_path / "rules.yaml"
    rules.write_text(ALL_DEFAULT)
    llm = tandem.load(path, rules=str(rules), dtype="float32", progress=False)
    ref = tandem.load(path, rules="none", dtype="float32", progress=False)
    norms = [m for m in llm.model.modules() if isinstance(m, RMSNorm)]
    ropes = [m for m in llm.model.modules() if isinstance(m, RotaryEmbedding)]
    assert norms and ropes
    assert all(isinstance(m, NormOp) for m in norms), [type(m).__name__ for m in norms]
    assert all(isinstance(m, RoPEOp) for m in ropes), [type(m).__name__ for m in ropes]
    assert not any(isinstance(m, (NormOp, RoPEOp)) for m in ref.model.modules())  # the reference stays plain
    assert torch.equal(llm.logits(IDS), ref.logits(IDS))  # bit-equal: the same torch arithmetic on the CPU


def test_rope_op_far_positions_equal_the_model_layer():
    """Positions past the first 4096-row table (the table grows) rotate exactly as the layer does."""
    p = {"rope_type": "default", "rope_theta": 1000000.0}
    ref = RotaryEmbedding(16, p, 40960)
    op = build_device_op(RotaryEmbedding(16, p, 40960), OpConfig("model.layers.0.self_attn.rotary_emb", "default"),
                         LoadContext(None, torch.float32))
    assert isinstance(op, RoPEOp)
    torch.manual_seed(1)
    x = torch.randn(4, 3, 16)
    pos = torch.tensor([5, 4095, 4096, 40000])
    assert torch.equal(op(x, pos), ref(x, pos))
