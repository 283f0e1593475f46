"""Attention operators: MLA (DeepSeek) and grouped-query attention, on the module's own torch forward.

The module keeps its projections (each placed by its own rule, e.g. as `linear` ops) and its KV-cache contract;
the operator runs it on its device. With a paged batch (the engine on a GPU) both attend for the whole batch
in tensor ops over the paged cache, and MLA decodes with weight absorption (models/attention.py,
models/deepseek.py); `absorb_for_prefill: true` makes MLA prefill absorbed too (less memory for long prompts,
more FLOPs per key). Grouped-query decode on a GPU (one new token per sequence) writes the cache and attends in
Triton (tandem.gpu.paged_attention): two or three launches instead of the torch path's dozen.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from tandem.gpu import fused, paged_attention
from tandem.models.attention import Attention, Batch
from tandem.models.deepseek import MLAttention
from tandem.models.layers import RMSNorm, RotaryEmbedding
from tandem.ops.base import DeviceOp, LoadContext, OpConfig, load_own_tensors, swap_class

# TANDEM_FUSED_KV=0: the paged decode writes k/v with its own launch (paged_attention.write_kv) after the q/k norms
# and RoPE; 1: the norm/RoPE launch writes them into the cache itself (one launch fewer per layer)
FUSED_KV = os.environ.get("TANDEM_FUSED_KV", "1") != "0"


class GQAKernels(nn.Module):
    """Mixed under grouped-query attention (as an `attention` operator or placed by `default`). On a GPU: q, k and v
    as one GEMM (the three weights become views of one [Hq + 2 Hkv, D] tensor on the first eager call), q/k norms
    and RoPE in one launch (tandem.gpu.fused.qk_norm_rope), the paged decode in Triton. Elsewhere, or when the
    projections are not plain linears on x's device, the module's own forward."""

    _qkv: tuple | None = None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, batch: Batch) -> torch.Tensor:
        qkv = self._fused_qkv(x) if x.is_cuda and fused.ENABLED and isinstance(self, Attention) else None
        if qkv is None:
            return super().forward(x, positions, batch)
        n, d = x.shape[0], self.head_dim
        hq, hk = self.n_heads * d, self.n_kv_heads * d
        y = F.linear(x, *qkv)
        q, k = y[:, :hq].view(n, self.n_heads, d), y[:, hq : hq + hk].view(n, self.n_kv_heads, d)
        v = y[:, hq + hk :].view(n, self.n_kv_heads, d)
        rope = self.rotary_emb
        norm = hasattr(self, "q_norm")
        args = (self.q_norm.weight if norm else None, self.k_norm.weight if norm else None,
                self.q_norm.eps if norm else 0.0, positions.to(x.device), rope.inv_freq.to(x.device), rope.scale,
                rope.interleaved)
        if self._decodes_in_kernel(batch, x) and FUSED_KV and (not norm or self.q_norm.weight.dtype == x.dtype):
            meta = batch.paged.to(x.device)
            k_cache, v_cache = batch.cache.buffers(self.layer_idx, k, v)
            q, _ = fused.qk_norm_rope(q, k, *args, cache=(v, k_cache, v_cache, meta.slot_mapping))
            out = paged_attention.decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens,
                                                   meta.block_size, self.scale)
        else:
            q, k = fused.qk_norm_rope(q, k, *args)
            out = self.attend_batch(q, k, v, batch)
        return self.o_proj(out.reshape(n, -1))

    @staticmethod
    def _decodes_in_kernel(batch: Batch, q: torch.Tensor) -> bool:
        """Whether this batch step attends with the Triton paged decode (attend_batch's test)."""
        meta = batch.paged
        return meta is not None and meta.decode and q.is_cuda and paged_attention.ENABLED

    def _fused_qkv(self, x: torch.Tensor) -> tuple | None:
        """(weight, bias) of q/k/v as one linear, made once (on an eager call) when all three are plain linears of
        x's dtype, the norms RMSNorms of one eps and the rope a RotaryEmbedding, all on x's device; else None."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        norms = [m for m in (getattr(self, "q_norm", None), getattr(self, "k_norm", None)) if m is not None]
        if any(t.device != x.device for t in (*(p.weight for p in projs), *(m.weight for m in norms))):
            return None
        if self._qkv is not None:
            return self._qkv or None
        plain = all(isinstance(p, nn.Linear) and type(p).forward in (nn.Linear.forward, DeviceOp.forward)
                    and p.weight.dtype == x.dtype for p in projs)
        norms_ok = all(isinstance(m, RMSNorm) and m.eps == norms[0].eps for m in norms)
        if not (plain and len({p.bias is None for p in projs}) == 1 and norms_ok
                and isinstance(self.rotary_emb, RotaryEmbedding)):
            self._qkv = ()
            return None
        if torch.cuda.is_current_stream_capturing():
            return None  # built on an eager call (the engine's warm-up), never inside a capture
        sizes = [p.weight.shape[0] for p in projs]
        with torch.no_grad(), torch.inference_mode(False):
            w = torch.cat([p.weight.detach() for p in projs])
            b = None if self.q_proj.bias is None else torch.cat([p.bias.detach() for p in projs])
            for p, pw in zip(projs, w.split(sizes)):  # the projections keep views: no second copy of the weights
                p.weight.data = pw
            for p, pb in zip(projs, b.split(sizes) if b is not None else ()):
                p.bias.data = pb
        self._qkv = (w, b)
        return self._qkv

    def attend_batch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Grouped-query attention's batch step: the Triton paged decode on a GPU, the module's own elsewhere."""
        if not self._decodes_in_kernel(batch, q):
            return super().attend_batch(q, k, v, batch)
        meta = batch.paged.to(q.device)
        k_cache, v_cache = batch.cache.buffers(self.layer_idx, k, v)
        paged_attention.write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        return paged_attention.decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens,
                                                meta.block_size, self.scale)


class AttentionOp(GQAKernels, DeviceOp):
    pass


def place_default(module: Attention, cfg: OpConfig, ctx: LoadContext) -> nn.Module:
    """A `default`-placed grouped-query attention: left to its children's placement, decoding with the kernel."""
    return swap_class(module, GQAKernels, cfg, ctx)


def build(module: nn.Module, cfg: OpConfig, ctx: LoadContext) -> nn.Module:
    load_own_tensors(module, cfg.name, cfg.generate_device, ctx)
    if isinstance(module, MLAttention):
        absorb = cfg.kwargs.get("absorb_for_prefill", False)
        if not isinstance(absorb, bool):
            raise ValueError(f"{cfg.name}: absorb_for_prefill must be true or false, got {absorb!r}")
        module.absorb_for_prefill = absorb
    return swap_class(module, AttentionOp, cfg, ctx)
