"""Several linears of one input as one: their weights concatenated along N once, each linear keeping a view of its
rows (nothing held twice), so a decode step runs one projection instead of two or three (GQA's q ‖ k ‖ v,
tandem.ops.attention; MLA's q_a ‖ kv_a, models/deepseek.py).

Parts join when they are all plain float linears of x's dtype, or all tandem.ops.linear.Linear ops of one generate
kernel and weight format (block formats included: the joined weight is one QuantTensor), with one K, all with or
all without a bias, all on x's device. One row of x (a batch-1 decode) with a bf16 / fp16 plain weight on a GPU
runs the weight-streaming GEMV (tandem.gpu.gemv) where the joined weight has N <= K: there cuBLAS splits K and
adds a reduce launch, and the GEMV's one launch wins (DeepSeek-V3's q_a ‖ kv_a, 2112 x 7168, in a decode step:
10.3 us against 10.5 + 1.7); with N > K cuBLAS' single launch streams as fast or faster (Qwen3's q ‖ k ‖ v,
5120 x 2048: 8.1 us against 7.7; bench/results/e2e-h200.md, eighth session). A Linear's own kernel already takes
the GEMV for its formats (quant_matmul.quant_linear). TANDEM_JOINED_GEMV=0: cuBLAS for all; =all: the GEMV for
every shape (read once, at import).

No Triton import at the top (CPU CI has none): the GEMV module is imported on the first call that takes it. A
module of tandem.gpu rather than tandem.ops: models/deepseek.py imports it, and tandem.ops' package imports the
model files (its registry), so from there it would make an import cycle.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tandem.gpu.blocks import QuantTensor

_MODE = os.environ.get("TANDEM_JOINED_GEMV", "1")
GEMV = _MODE != "0"
GEMV_MAX_N_PER_K = float("inf") if _MODE == "all" else 1.0  # the GEMV for joined weights of N <= this times K
_GEMV_FORMATS = {torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(slots=True)
class Joined:
    """Several projections of one input as one: y = kernel(x, weight, bias), the parts' outputs side by side."""

    weight: torch.Tensor | QuantTensor  # [sum N, K]
    bias: torch.Tensor | None
    kernel: Callable | None  # the parts' own kernel (tandem.ops.linear.Linear), or None: F.linear
    sizes: tuple[int, ...]  # N of each part
    gemv_weight: QuantTensor | None = None  # the float weight as the GEMV takes it (bf16 / fp16, N <= K, GPU)

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel(x, self.weight, self.bias)
        if self.gemv_weight is not None and x.dim() == 2 and x.shape[0] == 1 and x.is_cuda:
            from tandem.gpu import gemv  # Triton: imported where a GPU runs it

            y = gemv.gemv(x, self.gemv_weight)  # [1, sum N]
            if self.bias is not None:
                y += self.bias
            return y
        return F.linear(x, self.weight, self.bias)


def _on(device: str | torch.device, here: torch.device) -> bool:
    """Whether a placement's device names `here` ("cuda" names the current CUDA device)."""
    d = torch.device(device)
    return d.type == here.type and (d.index is None or d.index == here.index)


def _weight_key(p: nn.Module, x: torch.Tensor) -> tuple | None:
    """What two projections must share to join, and None where p cannot join: a plain float linear of x's dtype,
    or a tandem.ops.linear.Linear (its generate kernel on its block or float weight), all on x's device."""
    cfg = getattr(p, "op_config", None)
    if cfg is not None and not _on(cfg.out_device, x.device):
        return None
    bias = p.bias is not None
    if isinstance(getattr(p, "kernels", None), dict) and hasattr(p, "qweight"):  # tandem.ops.linear.Linear
        w = p.qweight if p.qweight is not None else p.weight
        fmt = w.fmt if isinstance(w, QuantTensor) else w.dtype
        if len(w.shape) != 2 or w.device != x.device or (isinstance(w, torch.Tensor) and w.dtype != x.dtype):
            return None
        return ("op", p.kernels["generate"], fmt, w.shape[1], bias)
    # an nn.Linear with its own forward or the placement mixin's (tandem.ops.base.DeviceOp: it only moves tensors,
    # and this layer cannot import it)
    plain = type(p).forward is nn.Linear.forward or (
        cfg is not None and type(p).forward.__qualname__ == "DeviceOp.forward")
    if not (isinstance(p, nn.Linear) and plain and p.weight.device == x.device and p.weight.dtype == x.dtype):
        return None
    return ("plain", None, x.dtype, p.weight.shape[1], bias)


def join_linears(projs: Sequence[nn.Module], x: torch.Tensor) -> Joined | None:
    """The projections as one Joined, their weights (and biases) concatenated along N; each projection keeps a view
    of its rows, so nothing is held twice. None where they differ in kind, kernel, format, K, bias or device.

    Call it outside CUDA-graph capture (it allocates and copies the weights)."""
    keys = [_weight_key(p, x) for p in projs]
    if keys[0] is None or any(k != keys[0] for k in keys):
        return None
    op = keys[0][0] == "op"
    quant = op and projs[0].qweight is not None
    parts = [p.qweight.data if quant else p.weight.detach() for p in projs]
    sizes = tuple(t.shape[0] for t in parts)
    with torch.no_grad(), torch.inference_mode(False):
        data = torch.cat(parts)
        bias = None if projs[0].bias is None else torch.cat([p.bias.detach() for p in projs])
        for p, rows in zip(projs, data.split(sizes)):
            if quant:
                p.qweight = QuantTensor(p.qweight.fmt, rows, p.qweight.shape)
                p.weight = rows  # the blocks' buffer, as tandem.ops.linear.Linear registers it
            else:
                p.weight.data = rows
        for p, rows in zip(projs, bias.split(sizes) if bias is not None else ()):
            p.bias.data = rows
    if quant:
        return Joined(QuantTensor(projs[0].qweight.fmt, data, (sum(sizes), keys[0][3])), bias, keys[0][1], sizes)
    streams = GEMV and not op and data.is_cuda and data.shape[0] <= GEMV_MAX_N_PER_K * data.shape[1]
    fmt = _GEMV_FORMATS.get(data.dtype) if streams else None
    return Joined(data, bias, keys[0][1] if op else None, sizes,
                  QuantTensor(fmt, data, tuple(data.shape)) if fmt else None)
