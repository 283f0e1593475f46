"""The RoPE operator (default, linear, llama3 and YaRN scaling). On the CPU: cos/sin tables grown as positions
need, instead of recomputing the angles in every layer and step. On a GPU: the angles of the batch's positions,
computed on the device, in one fused Triton launch with the rotation (tandem.gpu.fused.rope): sizing a table from
the positions would need their maximum on the host (a sync that a CUDA graph cannot hold), and a table for every
position a model allows costs VRAM in every layer (42 MB per layer for DeepSeek-V3's 163840 positions)."""

from __future__ import annotations

import torch
from torch import nn

from tandem.gpu import fused
from tandem.models.layers import RotaryEmbedding, rotate
from tandem.ops.base import LoadContext, OpConfig, load_own_tensors, swap_class


class RoPEOp(nn.Module):
    """Mixed under RotaryEmbedding; same results (the tables hold the very products it would compute)."""

    op_config: OpConfig
    _cos: torch.Tensor | None = None
    _sin: torch.Tensor | None = None

    def _tables(self, need: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos is None or self._cos.shape[0] < need:
            n = max(4096, 1 << (need - 1).bit_length())
            freqs = torch.arange(n, device=device).float()[:, None] * self.inv_freq.to(device)  # [P, d/2]
            self._cos, self._sin = freqs.cos() * self.scale, freqs.sin() * self.scale
        return self._cos, self._sin

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # x [N, heads, d], positions [N]
        dev = self.op_config.generate_device
        x, positions = x.to(dev), positions.to(dev)
        if x.is_cuda and fused.ENABLED:
            out = fused.rope(x, positions, self.inv_freq.to(x.device), self.scale, self.interleaved)
            return out.to(self.op_config.out_device)
        if x.is_cuda:  # no Triton (or TANDEM_FUSED=0): the products a table row would hold, for these positions
            freqs = positions.float()[:, None] * self.inv_freq.to(x.device)  # [N, d/2]
            cos, sin = freqs.cos() * self.scale, freqs.sin() * self.scale
        else:
            cos_t, sin_t = self._tables(int(positions.max()) + 1 if positions.numel() else 1, x.device)
            cos, sin = cos_t[positions], sin_t[positions]
        return rotate(x, cos[:, None, :], sin[:, None, :], self.interleaved).to(self.op_config.out_device)


def build(module: RotaryEmbedding, cfg: OpConfig, ctx: LoadContext) -> nn.Module:
    load_own_tensors(module, cfg.name, cfg.generate_device, ctx)
    return swap_class(module, RoPEOp, cfg, ctx)
