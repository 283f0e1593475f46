"""DeepSeek-V2 / V2-Lite / V3 / R1 and Kimi-K2: multi-head latent attention (MLA) and DeepSeekMoE.

MLA: queries come from x directly (q_proj) or through a low-rank bottleneck (q_a_proj -> norm -> q_b_proj);
keys and values come from one compressed latent [N, kv_lora_rank] plus a single shared RoPE key [N, rope_dim],
which is all the KV cache holds. Legend: N tokens, D hidden, H heads, r kv_lora_rank, E routed experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tandem.gpu import mla_decode, mla_entry
from tandem.gpu.joined import Joined, join_linears
from tandem.models.attention import (
    Batch,
    attend,
    gather_pages,
    pad_queries,
    paged_mask,
    sdpa_paged,
    unpad_queries,
    write_pages,
)
from tandem.models.base import ConfigError, check_positive, from_dict, rope_parameters
from tandem.models.layers import Experts, GatedMLP, RMSNorm, RotaryEmbedding, yarn_mscale
from tandem.models.transformer import CausalLM, DecoderLayer, DecoderModel, SparseMoE

TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


@dataclass(slots=True)
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    n_routed_experts: int
    num_experts_per_tok: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    model_type: str = "deepseek_v3"
    q_lora_rank: int | None = None
    n_shared_experts: int | None = None
    routed_scaling_factor: float = 1.0
    topk_method: str = "greedy"
    scoring_func: str = "softmax"
    n_group: int | None = None
    topk_group: int | None = None
    norm_topk_prob: bool = False
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    attention_bias: bool = False
    rope_interleave: bool = True
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    rope: dict = field(default_factory=dict)

    def __post_init__(self):
        check_positive(self, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                       "n_routed_experts", "num_experts_per_tok", "kv_lora_rank", "qk_rope_head_dim",
                       "v_head_dim", "moe_layer_freq")
        if self.topk_method not in TOPK_METHODS:
            raise ConfigError(f"topk_method={self.topk_method!r} is not one of {', '.join(TOPK_METHODS)}")
        if self.scoring_func not in ("softmax", "sigmoid"):
            raise ConfigError(f"scoring_func={self.scoring_func!r} must be softmax or sigmoid")
        if self.topk_method != "greedy":
            self.n_group, self.topk_group = self.n_group or 1, self.topk_group or 1
            if self.n_routed_experts % self.n_group:
                raise ConfigError(
                    f"n_routed_experts={self.n_routed_experts} is not a multiple of n_group={self.n_group}"
                )

    @classmethod
    def from_dict(cls, d: dict) -> ModelArgs:
        d = dict(d)
        if d.get("model_type") in ("deepseek_v3", "kimi_k2"):
            # transformers 5 always routes V3 with noaux_tc + sigmoid; published configs say so explicitly
            d.setdefault("topk_method", "noaux_tc")
            d.setdefault("scoring_func", "sigmoid")
        else:
            d["rope_interleave"] = True  # DeepSeek-V2's rotary is always on interleaved pairs
        renames = {"num_local_experts": "n_routed_experts", "num_experts": "n_routed_experts"}
        return from_dict(cls, {**d, "rope": rope_parameters(d)}, renames=renames)

    @property
    def v3_routing(self) -> bool:
        return self.model_type in ("deepseek_v3", "kimi_k2")

    def is_moe(self, i: int) -> bool:
        return i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0


class MoEGate(nn.Module):
    """DeepSeek's router: softmax or sigmoid scores, greedy / group-limited / noaux_tc top-k selection."""

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.a = a
        self.weight = nn.Parameter(torch.empty(a.n_routed_experts, a.hidden_size))
        if a.topk_method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.zeros(a.n_routed_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x [N, D] -> topk_ids [N, K], topk_weights [N, K] float32
        a = self.a
        logits = F.linear(x.float(), self.weight.float())  # [N, E]
        scores = logits.softmax(-1) if a.scoring_func == "softmax" else logits.sigmoid()
        choice = scores + self.e_score_correction_bias.float() if a.topk_method == "noaux_tc" else scores
        if a.topk_method != "greedy":
            grouped = choice.view(x.shape[0], a.n_group, -1)  # [N, G, E/G]
            if a.topk_method == "noaux_tc":
                group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
            else:
                group_scores = grouped.max(-1).values
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(a.topk_group, dim=-1).indices, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).view_as(choice)
        ids = choice.topk(a.num_experts_per_tok, dim=-1).indices
        weights = scores.gather(1, ids)
        normalize = a.norm_topk_prob and a.num_experts_per_tok > 1
        if normalize:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        if a.v3_routing or not normalize:
            # V3 always scales; V2 scales only when it does not normalise (DeepSeek's reference code)
            weights = weights * a.routed_scaling_factor
        return ids, weights


class MLAttention(nn.Module):
    """Multi-head latent attention; the cache keeps (normed latent [L, r], roped key [L, rope_dim])."""

    def __init__(self, a: ModelArgs, layer_idx: int):
        super().__init__()
        self.layer_idx, self.a = layer_idx, a
        h, qk_dim = a.num_attention_heads, a.qk_nope_head_dim + a.qk_rope_head_dim
        if a.q_lora_rank is None:
            self.q_proj = nn.Linear(a.hidden_size, h * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(a.hidden_size, a.q_lora_rank, bias=a.attention_bias)
            self.q_a_layernorm = RMSNorm(a.q_lora_rank, a.rms_norm_eps)
            self.q_b_proj = nn.Linear(a.q_lora_rank, h * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(a.hidden_size, a.kv_lora_rank + a.qk_rope_head_dim, bias=a.attention_bias)
        self.kv_a_layernorm = RMSNorm(a.kv_lora_rank, a.rms_norm_eps)
        self.kv_b_proj = nn.Linear(a.kv_lora_rank, h * (a.qk_nope_head_dim + a.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * a.v_head_dim, a.hidden_size, bias=a.attention_bias)
        self.rotary_emb = RotaryEmbedding(a.qk_rope_head_dim, a.rope, a.max_position_embeddings, a.rope_interleave)
        self.scale = qk_dim**-0.5
        if a.rope["rope_type"] == "yarn" and a.rope.get("mscale_all_dim"):
            self.scale *= yarn_mscale(a.rope["factor"], a.rope["mscale_all_dim"]) ** 2

    def forward(self, x: torch.Tensor, positions: torch.Tensor, batch: Batch) -> torch.Tensor:
        joined = self._joined_entry(x, batch)
        if joined is not None:
            return self._decode_joined(joined, x, positions, batch)
        a, n, h = self.a, x.shape[0], self.a.num_attention_heads
        q = self.q_proj(x) if a.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(n, h, -1).split([a.qk_nope_head_dim, a.qk_rope_head_dim], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([a.kv_lora_rank, a.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)  # [N, r]
        q_pe = self.rotary_emb(q_pe, positions)  # [N, H, rope]
        k_pe = self.rotary_emb(k_pe[:, None, :], positions)[:, 0]  # [N, rope]
        if batch.paged is not None:
            return self.o_proj(self.attend_paged(q_nope, q_pe, latent, k_pe, batch).reshape(n, -1))
        q = torch.cat((q_nope, q_pe), dim=-1)
        outs = []
        for i, (qi, lat_i, kpe_i) in enumerate(zip(*(t.split(batch.qlens) for t in (q, latent, k_pe)))):
            lat_all, kpe_all = batch.store(self.layer_idx, i, lat_i, kpe_i)  # [L, r], [L, rope]
            kv = self.kv_b_proj(lat_all).view(lat_all.shape[0], h, -1)
            k_nope, v = kv.split([a.qk_nope_head_dim, a.v_head_dim], dim=-1)
            k = torch.cat((k_nope, kpe_all[:, None, :].expand(-1, h, -1)), dim=-1)  # [L, H, nope+rope]
            outs.append(attend(qi, k, v, batch.starts[i], self.scale))
        return self.o_proj(torch.cat(outs).reshape(n, -1))

    # ------------------------------------------------------------ paged: the cache holds latent ‖ k_pe [S, r+rope]

    absorb_for_prefill = False  # the mla operator's kwarg; long prompts are faster expanded (fewer FLOPs per key)

    def attend_paged(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor,
                     batch: Batch) -> torch.Tensor:
        """The whole batch over the paged latent cache -> [N, H, v]; decode always absorbed."""
        meta = batch.paged.to(q_nope.device)
        new = torch.cat((latent, k_pe), dim=-1)  # [N, r+rope]
        (buf,) = batch.cache.buffers(self.layer_idx, new)
        write_pages((buf,), (new,), meta)
        if meta.decode or self.absorb_for_prefill:
            return self.attend_absorbed(q_nope, q_pe, buf, meta)
        a, h = self.a, self.a.num_attention_heads
        kv_in = pad_queries(new, meta) if meta.fresh else gather_pages(buf, meta).to(new.dtype)  # [B, L, r+rope]
        lat, pe = kv_in.split([a.kv_lora_rank, a.qk_rope_head_dim], dim=-1)
        kv = self.kv_b_proj(lat).view(*lat.shape[:2], h, -1)  # [B, L, H, nope+v]
        k_nope, v = kv.split([a.qk_nope_head_dim, a.v_head_dim], dim=-1)
        k = torch.cat((k_nope, pe[:, :, None, :].expand(-1, -1, h, -1)), dim=-1)  # [B, L, H, nope+rope]
        q = pad_queries(torch.cat((q_nope, q_pe), dim=-1), meta)
        return unpad_queries(sdpa_paged(q, k, v, meta, self.scale, causal_fresh=meta.fresh), meta)

    # ---------------------------------- paged decode on a GPU: one projection of x, one launch (tandem.gpu.mla_entry)

    _joined: Joined | None = None  # q_a ‖ kv_a (q ‖ kv_a without q_lora) as one projection, once made
    _joinable = True  # False once they were found unable to join

    def _joined_entry(self, x: torch.Tensor, batch: Batch) -> Joined | None:
        """The joined projection when this step is a paged decode on a GPU and its parts fit the entry kernel (made
        on the first eager such call, never inside a CUDA-graph capture); None: the module's own path."""
        meta = batch.paged
        if not (mla_entry.ENABLED and x.is_cuda and meta is not None and meta.decode):
            return None
        if self._joined is None and self._joinable and not torch.cuda.is_current_stream_capturing():
            projs = (self.q_proj if self.a.q_lora_rank is None else self.q_a_proj, self.kv_a_proj_with_mqa)
            self._joined = join_linears(projs, x) if self._entry_fits(x) else None
            self._joinable = self._joined is not None
        joined = self._joined
        return joined if joined is not None and joined.device == x.device else None

    def _entry_fits(self, x: torch.Tensor) -> bool:
        """Whether the norms are RMSNorms and the rope a RotaryEmbedding, all on x's device (the kernel's inputs)."""
        norms = [self.kv_a_layernorm] + ([self.q_a_layernorm] if self.a.q_lora_rank is not None else [])
        rope = self.rotary_emb
        return (all(isinstance(m, RMSNorm) and m.weight.device == x.device for m in norms)
                and isinstance(rope, RotaryEmbedding) and rope.inv_freq.device == x.device)

    def _decode_joined(self, joined: Joined, x: torch.Tensor, positions: torch.Tensor,
                       batch: Batch) -> torch.Tensor:
        """forward's paged decode from the joined projection: the norms, k_pe's RoPE and the cache write in one
        launch, then q_b_proj, q_pe's RoPE and the absorbed attention; forward's results but for rounding order."""
        a, n, h = self.a, x.shape[0], self.a.num_attention_heads
        meta = batch.paged.to(x.device)
        q_in, kv = joined(x).split(joined.sizes, dim=-1)  # [N, q_lora or H (nope+rope)], [N, r+rope]
        kv_norm, rope = self.kv_a_layernorm, self.rotary_emb
        like = torch.empty((0, kv.shape[1]), dtype=mla_entry.cache_dtype(kv, kv_norm.weight), device=x.device)
        (buf,) = batch.cache.buffers(self.layer_idx, like)  # [S, r+rope], as the module's own path makes it
        q_norm = self.q_a_layernorm if a.q_lora_rank is not None else None
        q_a = mla_entry.norm_rope_to_cache(
            q_in if q_norm is not None else None, kv, None if q_norm is None else q_norm.weight, kv_norm.weight,
            0.0 if q_norm is None else q_norm.eps, kv_norm.eps, positions, rope.inv_freq, rope.scale,
            rope.interleaved, buf, meta.slot_mapping)
        q = q_in if q_norm is None else self.q_b_proj(q_a)
        q_nope, q_pe = q.view(n, h, -1).split([a.qk_nope_head_dim, a.qk_rope_head_dim], dim=-1)
        q_pe = self.rotary_emb(q_pe, positions)  # [N, H, rope]
        return self.o_proj(self.attend_absorbed(q_nope, q_pe, buf, meta).reshape(n, -1))

    def absorbed_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj split per head into its key part [H, nope, r] and value part [H, v, r], in `dtype`; made once
        per device and dtype (a quantized kv_b_proj is dequantized once, not in every decode step)."""
        proj, a = self.kv_b_proj, self.a
        made = getattr(self, "_absorbed", None)
        if made is None or made[0].device != proj.weight.device or made[0].dtype != dtype:
            w = proj.dequantized_weight() if hasattr(proj, "dequantized_weight") else proj.weight
            w = w.detach().to(dtype).view(a.num_attention_heads, a.qk_nope_head_dim + a.v_head_dim, a.kv_lora_rank)
            self._absorbed = (w[:, : a.qk_nope_head_dim].contiguous(), w[:, a.qk_nope_head_dim :].contiguous())
        return self._absorbed

    def attend_absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, buf: torch.Tensor, meta) -> torch.Tensor:
        """Attention in the latent space: q_nope·(W_uk c) = (W_ukᵀ q_nope)·c, so keys and values are the cached
        latents c themselves (one head shared by all H) and W_uv applies once to the output.

        Plain einsums, not SDPA: with one kv head and a mask SDPA falls back to expanding c to all H heads.
        """
        w_uk, w_uv = self.absorbed_weights(q_nope.dtype)
        if meta.decode and q_nope.is_cuda and mla_decode.ENABLED:  # the Triton kernel: ~4 launches instead of ~25
            return mla_decode.absorbed_decode(q_nope, q_pe, buf, w_uk, w_uv, meta.block_tables, meta.context_lens,
                                              meta.block_size, self.scale)
        r = self.a.kv_lora_rank
        q_lat = torch.einsum("nhd,hdr->nhr", q_nope, w_uk)  # [N, H, r]
        q = pad_queries(torch.cat((q_lat, q_pe), dim=-1), meta)  # [B, Q, H, r+rope]
        c = gather_pages(buf, meta).to(q.dtype)  # [B, L, r+rope]
        scores = torch.einsum("bqhc,blc->bhql", q, c).float() * self.scale  # [B, H, Q, L]
        scores = scores.masked_fill(~paged_mask(meta, c.shape[1]), float("-inf"))
        p = scores.softmax(dim=-1).to(q.dtype)
        out = torch.einsum("bhql,blr->bqhr", p, c[..., :r])  # [B, Q, H, r]
        return torch.einsum("nhr,hvr->nhv", unpad_queries(out, meta), w_uv.to(q.dtype))  # [N, H, v]


def build(a: ModelArgs) -> CausalLM:
    def mlp(i: int) -> nn.Module:
        if not a.is_moe(i):
            return GatedMLP(a.hidden_size, a.intermediate_size, a.hidden_act)
        experts = Experts(GatedMLP(a.hidden_size, a.moe_intermediate_size, a.hidden_act)
                          for _ in range(a.n_routed_experts))
        shared = GatedMLP(a.hidden_size, a.moe_intermediate_size * a.n_shared_experts, a.hidden_act) if (
            a.n_shared_experts
        ) else None
        return SparseMoE(MoEGate(a), experts, shared, shared_name="shared_experts")

    layers = [DecoderLayer(MLAttention(a, i), mlp(i), a.hidden_size, a.rms_norm_eps)
              for i in range(a.num_hidden_layers)]
    return CausalLM(a, DecoderModel(a.vocab_size, a.hidden_size, a.rms_norm_eps, layers), a.tie_word_embeddings)
