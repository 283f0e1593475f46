"""Attention operators: MLA (DeepSeek) and grouped-query attention, on the module's own torch forward.

The module keeps its projections (each placed by its own rule, e.g. as `linear` ops) and its KV-cache contract;
the operator runs it on its device. With a paged batch (the engine on a GPU) both attend for the whole batch
in tensor ops over the paged cache, and MLA decodes with weight absorption (models/attention.py,
models/deepseek.py); `absorb_for_prefill: true` makes MLA prefill absorbed too (less memory for long prompts,
more FLOPs per key). Grouped-query decode on a GPU (one new token per sequence) writes the cache and attends in
Triton (tandem.gpu.paged_attention): two or three launches instead of the torch path's dozen; q, k and v run as one
projection (tandem.gpu.joined).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from tandem.gpu import fused, paged_attention
from tandem.gpu.joined import Joined, join_linears
from tandem.models.attention import Attention, Batch
from tandem.models.deepseek import MLAttention
from tandem.models.layers import RMSNorm, RotaryEmbedding
from tandem.ops.base import DeviceOp, LoadContext, OpConfig, load_own_tensors, swap_class

# TANDEM_FUSED_KV=0: the paged decode writes k/v with its own launch (paged_attention.write_kv) after the q/k norms
# and RoPE; 1: the norm/RoPE launch writes them into the cache itself (one launch fewer per layer)
FUSED_KV = os.environ.get("TANDEM_FUSED_KV", "1") != "0"


class GQAKernels(nn.Module):
    """Mixed under grouped-query attention (as an `attention` operator or placed by `default`). On a GPU: q, k and v
    as one projection (tandem.gpu.joined: plain float linears or linear ops of one kernel and format, their weights
    views of one [Hq + 2 Hkv, D] weight from the first eager call on; the decode GEMV where it beats cuBLAS), q/k
    norms and RoPE in one launch (tandem.gpu.fused.qk_norm_rope), the paged decode in Triton. Elsewhere, or when
    the projections do not join, the module's own forward."""

    _qkv: Joined | None = None  # q ‖ k ‖ v as one projection, once made
    _joinable = True  # False once they were found unable to join
    _qkv_prefill = True  # False: the parts' prefill kernel or device is not their generate one (decode steps only)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, batch: Batch) -> torch.Tensor:
        qkv = self._joined_qkv(x) if x.is_cuda and fused.ENABLED and isinstance(self, Attention) else None
        if qkv is None:
            return super().forward(x, positions, batch)
        n, d = x.shape[0], self.head_dim
        hq, hk = self.n_heads * d, self.n_kv_heads * d
        y = qkv(x)  # [N, Hq + 2 Hkv]
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

    def _joined_qkv(self, x: torch.Tensor) -> Joined | None:
        """q ‖ k ‖ v as one projection, made on the first eager call with the weights on x's device (never inside a
        CUDA-graph capture), when the three join and the norms are RMSNorms of one eps and the rope a
        RotaryEmbedding, all on x's device; None: the module's own path."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        if self._qkv is None and self._joinable and self.q_proj.weight.device == x.device and not (
                torch.cuda.is_current_stream_capturing()):
            self._qkv = join_linears(projs, x) if self._qkv_fits(x) else None
            self._joinable = self._qkv is not None
            self._qkv_prefill = self._qkv is None or self._qkv.kernel is None or all(
                p.kernels["prefill"] is p.kernels["generate"]
                and p.op_config.prefill_device == p.op_config.generate_device for p in projs)
        qkv = self._qkv
        if qkv is None or qkv.device != x.device:
            return None
        state = getattr(self, "run_state", None)
        return qkv if self._qkv_prefill or state is None or state.phase == "generate" else None

    def _qkv_fits(self, x: torch.Tensor) -> bool:
        """Whether the norms (if any) are RMSNorms of one eps and the rope a RotaryEmbedding, all on x's device."""
        norms = [m for m in (getattr(self, "q_norm", None), getattr(self, "k_norm", None)) if m is not None]
        rope = self.rotary_emb
        return (all(isinstance(m, RMSNorm) and m.eps == norms[0].eps and m.weight.device == x.device for m in norms)
                and isinstance(rope, RotaryEmbedding) and rope.inv_freq.device == x.device)

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
