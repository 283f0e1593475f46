"""Mixtral: Llama attention; every layer a `block_sparse_moe` of experts w1/w3/w2 with a softmax top-k router."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from tandem.models.base import check_positive, from_dict, rope_parameters
from tandem.models.layers import Experts, activation
from tandem.models.llama import gqa_attention
from tandem.models.transformer import CausalLM, DecoderLayer, DecoderModel, SparseMoE, TopKRouter


@dataclass(slots=True)
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_local_experts: int
    num_experts_per_tok: int = 2
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 32768
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    rope: dict = field(default_factory=dict)

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        check_positive(self, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                       "num_attention_heads", "num_key_value_heads", "num_local_experts", "num_experts_per_tok")

    @classmethod
    def from_dict(cls, d: dict) -> ModelArgs:
        return from_dict(cls, {**d, "rope": rope_parameters(d)}, renames={"num_experts": "num_local_experts"})


class MixtralExpert(nn.Module):
    """One routed expert in Mixtral's checkpoint names: w2(act(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(x)) * self.w3(x))


class MixtralExperts(Experts):
    proj_names = ("w1", "w3", "w2")


def build(a: ModelArgs) -> CausalLM:
    def layer(i: int) -> DecoderLayer:
        gate = TopKRouter(a.hidden_size, a.num_local_experts, a.num_experts_per_tok, norm_topk_prob=True)
        experts = MixtralExperts(
            MixtralExpert(a.hidden_size, a.intermediate_size, a.hidden_act) for _ in range(a.num_local_experts)
        )
        moe = SparseMoE(gate, experts)
        return DecoderLayer(gqa_attention(a, i), moe, a.hidden_size, a.rms_norm_eps, mlp_name="block_sparse_moe")

    layers = [layer(i) for i in range(a.num_hidden_layers)]
    model = CausalLM(a, DecoderModel(a.vocab_size, a.hidden_size, a.rms_norm_eps, layers), a.tie_word_embeddings)
    model.checkpoint_aliases = CHECKPOINT_ALIASES
    return model


# transformers 5 keeps Mixtral's MoE under `mlp` (fused experts) when it saves a state dict as is
CHECKPOINT_ALIASES = ((r"\.block_sparse_moe\.", ".mlp."),)
