"""A decoder layer's residual adds fused into the norms that follow them, on a GPU.

DecoderLayer.forward is `h = x + attn(norm1(x)); return h + mlp(norm2(h))`: at batch 1 each add and each norm is a
launch of its own, and a hybrid MoE block's output is one more (stage_in, reading the CPU experts' pinned rows). The
model operator runs such layers through `layer_step` instead, which carries the MLP's output as `pending` into the
next layer and adds it there inside the norm's launch:

    s = h + pending ; x = norm1(s)              one launch (tandem.gpu.fused.add_rms_norm; a hybrid block's
                                                Unstaged output is read from pinned memory by the same launch)
    a = attn(x)
    h = s + a ; x = norm2(h) ; router(x)        one launch with the hybrid block's router (staging.route_entry),
                                                else add_rms_norm and the block
    pending = mlp(x)

Same values as the reference (each sum rounded to the model's dtype in its order, the norm as the fused one).
TANDEM_FUSED_RESIDUAL=0: layers run their own forward (A/B).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from tandem.gpu import fused, staging
from tandem.models.attention import Batch
from tandem.models.transformer import DecoderLayer
from tandem.ops.moe import HybridMoE, Unstaged, same_device
from tandem.ops.norm import NormOp

ENABLED = fused.ENABLED and os.environ.get("TANDEM_FUSED_RESIDUAL", "1") != "0"

Pending = torch.Tensor | Unstaged | None  # what the last layer's MLP gave, not yet added to the residual h


def _norm_here(norm: nn.Module, h: torch.Tensor) -> bool:
    """A NormOp that runs and returns on h's device (the fused norm's conditions)."""
    return (isinstance(norm, NormOp) and norm.weight.device == h.device and h.shape[-1] <= fused.MAX_NORM_DIM
            and same_device(norm.op_config.out_device, h.device) and same_device(norm.op_config.generate_device,
                                                                                 h.device))


def fusable(layer: nn.Module, h: torch.Tensor) -> bool:
    """Whether `layer_step` may run this layer: the shared DecoderLayer with both norms fused on h's GPU."""
    return (ENABLED and h.is_cuda and h.dim() == 2 and type(layer).forward is DecoderLayer.forward
            and _norm_here(layer.input_layernorm, h) and _norm_here(layer.post_attention_layernorm, h))


def add_norm(h: torch.Tensor, pending: Pending, norm: NormOp) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(s), s) with s = h + pending."""
    if pending is None:
        return norm(h), h
    if isinstance(pending, Unstaged):
        return fused.add_rms_norm(h, pending.out, norm.weight, norm.eps, *pending.adds, p_host=True)
    if pending.dtype != h.dtype or pending.shape != h.shape:  # torch's add would promote or broadcast
        h = h + pending.to(h.device)
        return norm(h), h
    return fused.add_rms_norm(h, pending.to(h.device), norm.weight, norm.eps)


def settle(h: torch.Tensor, pending: Pending) -> torch.Tensor:
    """h + pending as a tensor (before a layer that runs its own forward, or a move to another device)."""
    if pending is None:
        return h
    if isinstance(pending, Unstaged):
        pending = staging.stage_in(pending.out, h.dtype, h.device, *pending.adds)
    return h + pending.to(h.device)


def layer_step(layer: DecoderLayer, h: torch.Tensor, pending: Pending, positions: torch.Tensor,
               batch: Batch) -> tuple[torch.Tensor, Pending]:
    """One decoder layer on the residual h with the last layer's output still pending -> (h, this one's)."""
    x, h = add_norm(h, pending, layer.input_layernorm)
    a = layer.self_attn(x, positions, batch)
    mlp = getattr(layer, layer.mlp_name)
    norm = layer.post_attention_layernorm
    same = (a.device, a.dtype, a.shape) == (h.device, h.dtype, h.shape)
    if isinstance(mlp, HybridMoE) and same and mlp.takes_residual(h):
        return mlp.forward_residual(h, a, norm.weight, norm.eps)
    x, h = add_norm(h, a, norm)
    return h, mlp(x)


def final_norm(norm: nn.Module, h: torch.Tensor, pending: Pending, device: torch.device | str) -> torch.Tensor:
    """The stack's last norm of h + pending, on `device` (the norm's own)."""
    if pending is not None and _norm_here(norm, h):
        return add_norm(h, pending, norm)[0]
    return norm(settle(h, pending).to(device))
