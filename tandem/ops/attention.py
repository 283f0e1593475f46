"""Attention operators: MLA (DeepSeek) and grouped-query attention, on the module's own torch forward.

The module keeps its projections (each placed by its own rule, e.g. as `linear` ops) and its KV-cache contract;
the operator runs it on its device. With a paged batch (the engine on a GPU) both attend for the whole batch
in tensor ops over the paged cache, and MLA decodes with weight absorption (models/attention.py,
models/deepseek.py); `absorb_for_prefill: true` makes MLA prefill absorbed too (less memory for long prompts,
more FLOPs per key). Grouped-query decode on a GPU (one new token per sequence) writes the cache and attends in
Triton (tandem.gpu.paged_attention): two or three launches instead of the torch path's dozen.
"""

from __future__ import annotations

import torch
from torch import nn

from tandem.gpu import paged_attention
from tandem.models.attention import Attention, Batch
from tandem.models.deepseek import MLAttention
from tandem.ops.base import DeviceOp, LoadContext, OpConfig, load_own_tensors, swap_class


class PagedDecode(nn.Module):
    """Mixed under grouped-query attention (as an `attention` operator or placed by `default`)."""

    def attend_batch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Grouped-query attention's batch step: the Triton paged decode on a GPU, the module's own elsewhere."""
        meta = batch.paged
        if meta is None or not meta.decode or not q.is_cuda or not paged_attention.ENABLED:
            return super().attend_batch(q, k, v, batch)
        meta = meta.to(q.device)
        k_cache, v_cache = batch.cache.buffers(self.layer_idx, k, v)
        paged_attention.write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        return paged_attention.decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens,
                                                meta.block_size, self.scale)


class AttentionOp(PagedDecode, DeviceOp):
    pass


def place_default(module: Attention, cfg: OpConfig, ctx: LoadContext) -> nn.Module:
    """A `default`-placed grouped-query attention: left to its children's placement, decoding with the kernel."""
    return swap_class(module, PagedDecode, cfg, ctx)


def build(module: nn.Module, cfg: OpConfig, ctx: LoadContext) -> nn.Module:
    load_own_tensors(module, cfg.name, cfg.generate_device, ctx)
    if isinstance(module, MLAttention):
        absorb = cfg.kwargs.get("absorb_for_prefill", False)
        if not isinstance(absorb, bool):
            raise ValueError(f"{cfg.name}: absorb_for_prefill must be true or false, got {absorb!r}")
        module.absorb_for_prefill = absorb
    return swap_class(module, AttentionOp, cfg, ctx)
