"""Llama (and Mistral): dense decoder, grouped-query attention, SwiGLU MLP. Also the base of test assets."""

from __future__ import annotations

from dataclasses import dataclass, field

from tandem.models.attention import Attention
from tandem.models.base import check_positive, from_dict, rope_parameters
from tandem.models.layers import GatedMLP, RotaryEmbedding
from tandem.models.transformer import CausalLM, DecoderLayer, DecoderModel


@dataclass(slots=True)
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    rope: dict = field(default_factory=dict)

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        check_positive(self, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                       "num_attention_heads", "num_key_value_heads", "head_dim")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")

    @classmethod
    def from_dict(cls, d: dict) -> ModelArgs:
        return from_dict(cls, {**d, "rope": rope_parameters(d)})


def gqa_attention(a, i: int, qkv_bias: bool = False, o_bias: bool = False, qk_norm: bool = False) -> Attention:
    """The grouped-query attention of layer i for any Llama-like args (Mixtral and Qwen share it)."""
    rope = RotaryEmbedding(a.head_dim, a.rope, a.max_position_embeddings)
    return Attention(i, a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim, rope,
                     qkv_bias=qkv_bias, o_bias=o_bias, qk_norm_eps=a.rms_norm_eps if qk_norm else None)


def build(a: ModelArgs) -> CausalLM:
    def layer(i: int) -> DecoderLayer:
        attn = gqa_attention(a, i, qkv_bias=a.attention_bias, o_bias=a.attention_bias)
        mlp = GatedMLP(a.hidden_size, a.intermediate_size, a.hidden_act, bias=a.mlp_bias)
        return DecoderLayer(attn, mlp, a.hidden_size, a.rms_norm_eps)

    layers = [layer(i) for i in range(a.num_hidden_layers)]
    return CausalLM(a, DecoderModel(a.vocab_size, a.hidden_size, a.rms_norm_eps, layers), a.tie_word_embeddings)
