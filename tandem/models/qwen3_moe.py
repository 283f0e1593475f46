"""Qwen3-MoE: GQA with per-head q/k RMSNorm and no bias; MoE layers without a shared expert."""

from __future__ import annotations

from dataclasses import dataclass

from tandem.models import qwen2_moe
from tandem.models.base import from_dict, rope_parameters
from tandem.models.layers import GatedMLP
from tandem.models.llama import gqa_attention
from tandem.models.transformer import CausalLM, DecoderLayer, DecoderModel


@dataclass(slots=True)
class ModelArgs(qwen2_moe.ModelArgs):
    @classmethod
    def from_dict(cls, d: dict) -> ModelArgs:
        # Qwen3 has no shared expert and its q/k/v carry a bias only if attention_bias says so
        d = {**d, "shared_expert_intermediate_size": 0, "qkv_bias": d.get("attention_bias", False)}
        return from_dict(cls, {**d, "rope": rope_parameters(d)}, renames={"num_local_experts": "num_experts"})


def build(a: ModelArgs) -> CausalLM:
    def layer(i: int) -> DecoderLayer:
        attn = gqa_attention(a, i, qkv_bias=a.qkv_bias, o_bias=a.attention_bias, qk_norm=True)
        mlp = qwen2_moe.moe_block(a, shared=False) if a.is_moe(i) else (
            GatedMLP(a.hidden_size, a.intermediate_size, a.hidden_act)
        )
        return DecoderLayer(attn, mlp, a.hidden_size, a.rms_norm_eps)

    layers = [layer(i) for i in range(a.num_hidden_layers)]
    return CausalLM(a, DecoderModel(a.vocab_size, a.hidden_size, a.rms_norm_eps, layers), a.tie_word_embeddings)
