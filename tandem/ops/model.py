"""The model-level operator: runs the decoder stack with the hidden state moved between devices
(`transfer_map` {layer: device}: before that layer), and tells every operator the batch's phase."""

from __future__ import annotations

import torch
from torch import nn

from tandem.models.attention import Batch
from tandem.models.transformer import DecoderModel
from tandem.ops.base import LoadContext, OpConfig, load_own_tensors, swap_class


def first_param_device(module: nn.Module, fallback: str) -> torch.device | str:
    for t in module.parameters():
        return t.device
    return fallback


class ModelOp(nn.Module):
    op_config: OpConfig
    run_state: object

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, batch: Batch) -> torch.Tensor:
        self.run_state.phase = "prefill" if max(batch.qlens) > 1 else "generate"
        transfers: dict[int, str] = self.op_config.kwargs["transfer_map"]  # effective, includes layer 0
        h = self.embed_tokens(ids)  # [N, D]
        for i, layer in enumerate(self.layers):
            if i in transfers:
                h, positions = h.to(transfers[i]), positions.to(transfers[i])
            h = layer(h, positions, batch)
        return self.norm(h.to(first_param_device(self.norm, h.device)))


def build(module: DecoderModel, cfg: OpConfig, ctx: LoadContext) -> nn.Module:
    load_own_tensors(module, cfg.name, cfg.generate_device, ctx)
    return swap_class(module, ModelOp, cfg, ctx)
