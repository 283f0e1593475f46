"""The decoder skeleton every family shares; a family file supplies its attention, MLP and MoE blocks.

Legend: N = tokens in the batch (flattened), D = hidden size, V = vocabulary, E = experts, K = experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tandem.models.attention import Batch
from tandem.models.layers import Experts, GatedMLP, RMSNorm


class TopKRouter(nn.Module):
    """softmax(x Wᵀ) then top-k, optionally renormalised (Mixtral, Qwen2/3-MoE)."""

    def __init__(self, dim: int, n_experts: int, top_k: int, norm_topk_prob: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, dim))
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x [N, D] -> topk_ids [N, K], topk_weights [N, K] (float32)
        probs = F.linear(x, self.weight).float().softmax(dim=-1)
        weights, ids = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return ids, weights


class SparseMoE(nn.Module):
    """Routed experts plus optional shared expert(s); Qwen2-MoE gates its shared expert with a sigmoid."""

    def __init__(
        self,
        gate: nn.Module,
        experts: Experts,
        shared: GatedMLP | None = None,
        shared_name: str = "shared_experts",
        shared_gate: bool = False,
        dim: int = 0,
    ):
        super().__init__()
        self.gate, self.experts = gate, experts
        self.shared_name = shared_name if shared is not None else None
        if shared is not None:
            setattr(self, shared_name, shared)
        if shared_gate:
            self.shared_expert_gate = nn.Linear(dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = self.gate(x)
        out = self.experts(x, ids, weights)
        if self.shared_name is not None:
            shared = getattr(self, self.shared_name)(x)
            if hasattr(self, "shared_expert_gate"):
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out


class DecoderLayer(nn.Module):
    def __init__(self, self_attn: nn.Module, mlp: nn.Module, dim: int, eps: float, mlp_name: str = "mlp"):
        super().__init__()
        self.self_attn = self_attn
        self.mlp_name = mlp_name  # Mixtral's checkpoints call it block_sparse_moe
        setattr(self, mlp_name, mlp)
        self.input_layernorm = RMSNorm(dim, eps)
        self.post_attention_layernorm = RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, batch: Batch) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), positions, batch)
        return h + getattr(self, self.mlp_name)(self.post_attention_layernorm(h))


class DecoderModel(nn.Module):
    def __init__(self, vocab: int, dim: int, eps: float, layers: list[DecoderLayer]):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(dim, eps)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, batch: Batch) -> torch.Tensor:
        h = self.embed_tokens(ids)  # [N, D]
        for layer in self.layers:
            h = layer(h, positions, batch)
        return self.norm(h)


class CausalLM(nn.Module):
    """model + lm_head; `forward` returns hidden states, `compute_logits` the float32 logits."""

    # (regex, replacement): other spellings of our tensor names found in this family's checkpoints
    checkpoint_aliases: tuple[tuple[str, str], ...] = ()

    def __init__(self, args, model: DecoderModel, tie_word_embeddings: bool = False):
        super().__init__()
        self.args = args
        self.model = model
        self.lm_head = nn.Linear(model.embed_tokens.embedding_dim, model.embed_tokens.num_embeddings, bias=False)
        self.tie_word_embeddings = tie_word_embeddings

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.model(ids, positions, batch)

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:
        h = h.to(self.lm_head.weight.device)
        return self.lm_head(h).float()  # [N, V]
