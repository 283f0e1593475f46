"""Qwen2-MoE: GQA with q/k/v bias; MoE layers with a softmax top-k router and one sigmoid-gated shared expert."""

from __future__ import annotations

from dataclasses import dataclass, field

from tandem.models.base import ConfigError, check_positive, from_dict, rope_parameters
from tandem.models.layers import Experts, GatedMLP
from tandem.models.llama import gqa_attention
from tandem.models.transformer import CausalLM, DecoderLayer, DecoderModel, SparseMoE, TopKRouter


@dataclass(slots=True)
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_experts: int
    num_experts_per_tok: int
    shared_expert_intermediate_size: int = 0
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list = field(default_factory=list)
    qkv_bias: bool = True
    attention_bias: bool = False
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    use_sliding_window: bool = False
    rope: dict = field(default_factory=dict)

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        check_positive(self, "vocab_size", "hidden_size", "moe_intermediate_size", "num_hidden_layers",
                       "num_attention_heads", "num_experts", "num_experts_per_tok", "decoder_sparse_step")
        if self.use_sliding_window:
            raise ConfigError("use_sliding_window=true is not supported yet; set it to false in config.json")

    @classmethod
    def from_dict(cls, d: dict) -> ModelArgs:
        return from_dict(cls, {**d, "rope": rope_parameters(d)}, renames={"num_local_experts": "num_experts"})

    def is_moe(self, i: int) -> bool:
        return i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0


def moe_block(a, shared: bool) -> SparseMoE:
    """A Qwen MoE block; Qwen2 adds the shared expert and its sigmoid gate."""
    gate = TopKRouter(a.hidden_size, a.num_experts, a.num_experts_per_tok, a.norm_topk_prob)
    experts = Experts(GatedMLP(a.hidden_size, a.moe_intermediate_size, a.hidden_act) for _ in range(a.num_experts))
    if not shared:
        return SparseMoE(gate, experts)
    shared_mlp = GatedMLP(a.hidden_size, a.shared_expert_intermediate_size, a.hidden_act)
    return SparseMoE(gate, experts, shared_mlp, shared_name="shared_expert", shared_gate=True, dim=a.hidden_size)


def build(a: ModelArgs) -> CausalLM:
    def layer(i: int) -> DecoderLayer:
        attn = gqa_attention(a, i, qkv_bias=a.qkv_bias)
        mlp = moe_block(a, shared=a.shared_expert_intermediate_size > 0) if a.is_moe(i) else (
            GatedMLP(a.hidden_size, a.intermediate_size, a.hidden_act)
        )
        return DecoderLayer(attn, mlp, a.hidden_size, a.rms_norm_eps)

    layers = [layer(i) for i in range(a.num_hidden_layers)]
    return CausalLM(a, DecoderModel(a.vocab_size, a.hidden_size, a.rms_norm_eps, layers), a.tie_word_embeddings)
