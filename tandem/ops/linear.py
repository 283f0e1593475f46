"""The linear operator: y = x Wᵀ + b on its device, in its backends' weight layout.

Backends (registry names): `linear.torch` (F.linear on the checkpoint's float weight), `linear.marlin`
(KTransformers' KLinearMarlin: weight-only int4 / int8 blocks, a Triton kernel, bf16 or fp32 activations, fp32
accumulation). When either phase runs linear.marlin the weight is held once, quantized (`weight_format`: int4_g128
by default, int4_g32, q4_0, int8; see tandem.gpu.blocks); a linear.torch phase then computes with the same
dequantized values, so prefill and decode agree. A GGUF tensor's blocks are converted on the GPU, never through a
float copy on the CPU. On a GPU, q8_0 is held re-laid as q8_0p (each row's int8 values, then its scales: the same
values) and a decode step's few rows run the weight-streaming GEMV (tandem.gpu.gemv).

`linear.fp8` (KTransformers' KLinearFP8) holds the weight as FP8 E4M3 with 128 x 128 block scales, as DeepSeek-V3's
and Qwen3's FP8 checkpoints store it: such a checkpoint's bytes load as they are (no dequantize, no requantize); a
float weight is quantized once at load as those checkpoints were. Half the bytes of bf16 for a decode step's GEMV;
a prefill dequantizes the weight for the call (one launch) and runs cuBLAS.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from tandem.gpu import blocks as B
from tandem.ops.base import LoadContext, OpConfig
from tandem.ops.registry import BACKENDS, resolve

log = logging.getLogger(__name__)

QUANTIZED = ("linear.marlin", "linear.fp8")
FP8_DENSE_ROWS = 16  # past this many rows of x an fp8 linear dequantizes its weight for the call and runs cuBLAS


def dequantized(w: B.QuantTensor, dtype: torch.dtype) -> torch.Tensor:
    """w's values in `dtype`: one Triton launch on a GPU (tandem.gpu.dequant), torch elsewhere."""
    if w.device.type == "cuda" and w.fmt not in B.FLOAT_FORMATS:
        from tandem.gpu.dequant import dequantize_into

        return dequantize_into(w, torch.empty(w.shape, dtype=dtype, device=w.device))
    return w.dequantize(dtype)


def torch_linear(x: torch.Tensor, weight, bias: torch.Tensor | None) -> torch.Tensor:
    """`linear.torch`: F.linear; a quantized weight is dequantized for the call (same values as the kernel)."""
    if isinstance(weight, B.QuantTensor):
        weight = dequantized(weight, x.dtype)
    return F.linear(x, weight, bias)


def fp8_linear(x: torch.Tensor, weight, bias: torch.Tensor | None) -> torch.Tensor:
    """`linear.fp8`: an FP8 E4M3 weight (128 x 128 block scales); a decode step's few rows stream it (the GEMV),
    more rows dequantize it for the call and run cuBLAS."""
    if isinstance(weight, B.QuantTensor) and weight.fmt == B.FP8 and x.numel() > FP8_DENSE_ROWS * x.shape[-1]:
        return torch_linear(x, weight, bias)
    return marlin_linear(x, weight, bias)


def marlin_linear(x: torch.Tensor, weight, bias: torch.Tensor | None) -> torch.Tensor:
    """`linear.marlin`: the Triton weight-only quantized matmul."""
    from tandem.gpu.quant_matmul import quant_linear  # Triton: imported where a GPU runs it

    if not isinstance(weight, B.QuantTensor):
        weight = B.QuantTensor(B.canonical(str(weight.dtype).removeprefix("torch.")), weight, tuple(weight.shape))
    return quant_linear(x, weight, bias)


def linear_format(k: int, weight_format, group_size, name: str, fp8: bool = False) -> str:
    """The block format of a quantized linear with k input features (int4_g128 unless asked or impossible; fp8:
    linear.fp8's FP8 E4M3)."""
    if fp8:
        if weight_format is not None and str(weight_format).lower() not in ("fp8", B.FP8):
            raise ValueError(f"rule for {name}: linear.fp8 holds FP8 E4M3 weights; weight_format {weight_format!r} "
                             "is linear.marlin's (drop it, or use linear.marlin)")
        if k % B.FP8_BLOCK == 0:
            return B.FP8
        log.info("%s: %d input features are not whole 128-value FP8 blocks: kept as float", name, k)
        return "float"
    if weight_format is not None:
        fmt = B.canonical(str(weight_format), group_size)
        if fmt in B.FLOAT_FORMATS or k % B.BLOCK_FORMATS[fmt][0] == 0:
            return fmt
        log.info("%s: %d input features are not whole %s blocks: kept as float", name, k, fmt)
        return "float"
    for fmt in ("int4_g128", "q4_0"):
        if k % B.BLOCK_FORMATS[fmt][0] == 0:
            return fmt
    return "float"  # no block fits the row: the model's float weight, read by the same kernel


def held_weight_bytes(linear: nn.Linear, generate_op: str | None, prefill_op: str | None, kwargs: dict,
                      name: str) -> int | None:
    """The bytes `Linear` holds for `linear`'s weight when a phase runs linear.marlin / linear.fp8 (its format as
    picked at load); None when it keeps the model dtype (no quantized op, or rows not whole blocks). A weight_format
    the op cannot hold is a ValueError naming the module."""
    if not {generate_op, prefill_op} & set(QUANTIZED):
        return None
    fmt = linear_format(linear.in_features, kwargs.get("weight_format"), kwargs.get("group_size"), name,
                        fp8="linear.fp8" in (generate_op, prefill_op))
    if fmt == "float":
        return None
    if fmt in B.FLOAT_FORMATS:
        return linear.out_features * linear.in_features * B.FLOAT_FORMATS[fmt].itemsize
    return linear.out_features * B.row_bytes(fmt, linear.in_features)


def load_quantized(ctx: LoadContext, name: str, shape: tuple[int, int], device: str, fmt: str) -> B.QuantTensor:
    """Weight `name` in `fmt` on `device`: GGUF blocks converted there, an FP8 checkpoint's values and scales as
    they are, or the float weight quantized there."""
    fp8 = getattr(ctx.source, "fp8", None)
    if fmt == B.FP8 and fp8 is not None and (stored := fp8(name)) is not None:
        q, scale = stored
        w = B.fp8_rows(q.to(device), scale.to(device), what=f"{getattr(ctx.source, 'path', 'checkpoint')}: {name}")
        for t in (name, name + "_scale_inv"):  # fp8_rows made fresh rows: the mapped pages can go
            ctx.source.release(t)
        if w.shape != tuple(shape):
            raise ValueError(f"{ctx.source.path}: tensor {name} has shape {list(w.shape)}, the config implies "
                             f"{list(shape)}")
        return w
    raw = getattr(ctx.source, "raw", None)
    if raw is not None and name in ctx.source and fmt not in ("float", B.FP8):  # GGUF has no FP8 blocks
        try:
            ggml_type, data, stored = raw(name)
        except ValueError:  # stored transformed (permuted q/k): no raw form, go through floats
            pass
        else:
            if tuple(stored) == tuple(shape):
                return B.from_gguf(data, ggml_type, shape, fmt, device, ctx.dtype)
    w = ctx.load(name, shape, device)
    if fmt == "float":
        return B.QuantTensor(B.canonical(str(w.dtype).removeprefix("torch.")), w, tuple(shape))
    return B.from_float(w, fmt)


class Linear(nn.Module):
    """Weights live on generate_device; a prefill on another device streams them there for the call."""

    def __init__(self, linear: nn.Linear, cfg: OpConfig, ctx: LoadContext):
        super().__init__()
        self.op_config, self.run_state = cfg, ctx.state
        self.in_features, self.out_features = linear.in_features, linear.out_features
        dev, shape = cfg.generate_device, tuple(linear.weight.shape)
        self.qweight: B.QuantTensor | None = None
        if cfg.generate_op in QUANTIZED or cfg.prefill_op in QUANTIZED:
            fmt = linear_format(self.in_features, cfg.kwargs.get("weight_format"), cfg.kwargs.get("group_size"),
                                cfg.name, fp8="linear.fp8" in (cfg.generate_op, cfg.prefill_op))
            self.qweight = load_quantized(ctx, f"{cfg.name}.weight", shape, dev, fmt)
            if self.qweight.fmt == "q8_0" and self.qweight.device.type == "cuda":
                self.qweight = B.q8_0_planar(self.qweight)  # the decode GEMV's layout: same bytes, same values
            # `weight` is the blocks (uint8): its device is right for callers that ask, its values are not floats
            self.register_buffer("weight", self.qweight.data, persistent=False)
        else:
            self.weight = nn.Parameter(ctx.load(f"{cfg.name}.weight", shape, dev), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(
            ctx.load(f"{cfg.name}.bias", tuple(linear.bias.shape), dev), requires_grad=False)
        self.kernels = {phase: resolve(BACKENDS[name].impl) for phase, name in
                        (("generate", cfg.generate_op), ("prefill", cfg.prefill_op))}

    def dequantized_weight(self) -> torch.Tensor:
        """The weight [out, in] as the kernels compute with it, float32 (MLA absorption reads kv_b_proj so)."""
        return self.weight.float() if self.qweight is None else self.qweight.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, phase = self.op_config, self.run_state.phase
        dev = c.prefill_device if phase == "prefill" else c.generate_device
        w = self.weight if self.qweight is None else self.qweight
        w, b = w.to(dev), None if self.bias is None else self.bias.to(dev)
        return self.kernels[phase](x.to(dev), w, b).to(c.out_device)

    def extra_repr(self) -> str:
        c = self.op_config
        fmt = f", {self.qweight.fmt}" if self.qweight is not None else ""
        return f"{self.in_features} -> {self.out_features}, {c.generate_op}@{c.generate_device}{fmt}"


def build(module: nn.Linear, cfg: OpConfig, ctx: LoadContext) -> nn.Module:
    return Linear(module, cfg, ctx)
