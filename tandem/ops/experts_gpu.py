"""`experts.marlin`: routed experts on the GPU (KTransformers' KExpertsMarlin), in a block format or bf16.

Weights live on the device as two stacked tensors, gate and up joined ([E, 2I, D]) and down ([E, D, I]), in a
format of tandem.gpu.blocks; each projection of all experts is one grouped Triton launch (tandem.gpu.quant_matmul).
Formats (`weight_format`, rule kwarg): int4_g32 (default where every row is whole 128-value blocks), int4_g128,
q4_0 / int4_sym (symmetric int4, groups of 32: the default otherwise), int8 (= q8_0), bf16 (exact, the model's
weights). From a GGUF file the stored blocks move to the GPU and are converted there: Q8_0 and Q4_0 as they are,
Q4_K and Q4_1 relaid to int4_g32, other types dequantized and quantized on the GPU.
"""

from __future__ import annotations

import torch

from tandem.gpu import blocks as B


def default_format(shapes, name: str, say=None) -> str:
    """int4_g32 where every input dim is a multiple of 128, else q4_0 (int4, groups of 32)."""
    if all(k % 128 == 0 for _, k in shapes):
        return "int4_g32"
    if say is not None:
        say("%s: expert rows of %s values are not whole 128-value blocks: experts.marlin uses q4_0 (symmetric "
            "int4, groups of 32)", name, "/".join(str(k) for _, k in shapes))
    return "q4_0"


class GpuExperts:
    """Routed experts on one GPU: w13 [E, 2I, D] and w2 [E, D, I] as QuantTensors; forward = two grouped GEMMs."""

    capturable = True  # routing sorts on the GPU with fixed sizes (tandem.gpu.routing): no host sync, graph-safe

    def __init__(self, w13: B.QuantTensor, w2: B.QuantTensor, act, device: str, origin: str = ""):
        self.w13, self.w2, self.act, self.device, self.origin = w13, w2, act, torch.device(device), origin

    # ------------------------------------------------------------------ construction

    @classmethod
    def load(cls, w, device: str, weight_format=None, group_size=None, **kwargs) -> GpuExperts:
        """From an ExpertWeights (tandem.ops.experts): GGUF blocks converted on the GPU, or float weights
        quantized there one expert at a time (the float stack never sits on the GPU whole)."""
        if str(device).split(":")[0] != "cuda":
            raise ValueError(f"{w.name}: experts.marlin runs on a CUDA device, not {device}")
        (i, d), (_, _), (_, i2) = w.shapes
        fmt = B.canonical(weight_format, group_size) if weight_format else None
        if w.stored is not None and all(s is not None for s in w.stored):
            gate, up, down = (B.from_gguf(s.data, s.ggml_type, s.shape, fmt, device, w.dtype) for s in w.stored)
            if gate.fmt == up.fmt:
                w13 = B.QuantTensor(gate.fmt, torch.cat((gate.data, up.data), 1), (w.n_experts, 2 * i, d))
                return cls(w13, down, w.act, device, f"converted on the GPU from GGUF {w.stored[0].type_name}")
            fmt = fmt or "q8_0"  # gate and up in different GGUF types: one format for the joined tensor
        fmt = fmt or default_format(w.shapes, w.name, w.say)
        B.check_shape(fmt, d, f"{w.name} gate/up")
        B.check_shape(fmt, i2, f"{w.name} down")
        w13 = _empty(fmt, (w.n_experts, 2 * i, d), w.dtype, device)
        w2 = _empty(fmt, (w.n_experts, d, i), w.dtype, device)
        for e in range(w.n_experts):
            g, u, dn = (w.ctx.load(f"{w.name}.{e}.{p}.weight", s, device) for p, s in zip(w.proj_names, w.shapes))
            w13.data[e, :i] = B.quantize(g, fmt)
            w13.data[e, i:] = B.quantize(u, fmt)
            w2.data[e] = B.quantize(dn, fmt)
        return cls(w13, w2, w.act, device, "quantized on the GPU at load" if fmt not in B.FLOAT_FORMATS else "")

    @classmethod
    def from_weights(cls, gate, up, down, act, device: str, weight_format="bf16", **kwargs) -> GpuExperts:
        """From stacked float weights gate/up [E, I, D], down [E, D, I] (any device)."""
        fmt = B.canonical(weight_format)
        w13 = B.from_float(torch.cat((gate, up), 1).to(device), fmt)
        return cls(w13, B.from_float(down.to(device), fmt), act, device)

    def describe(self) -> str:
        mib = (self.w13.nbytes() + self.w2.nbytes()) / 2**20
        return f"Triton grouped GEMM, {self.w13.fmt} ({mib:.0f} MiB){', ' + self.origin if self.origin else ''}"

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate [E, I, D], up [E, I, D], down [E, D, I]) in fp32: the weights the kernel computes with."""
        w13 = self.w13.dequantize()
        i = w13.shape[1] // 2
        return w13[:, :i], w13[:, i:], self.w2.dequantize()

    # ------------------------------------------------------------------ compute

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """x [N, D], topk_ids [N, K] (ids < 0: padding), topk_weights [N, K] -> [N, D] on this GPU."""
        from tandem.gpu.quant_matmul import fused_experts  # Triton: imported where a GPU runs it

        dev = self.device
        x = x.to(dev)
        if x.shape[0] == 0:
            return torch.zeros_like(x)
        return fused_experts(x, topk_ids.to(dev), topk_weights.to(dev), self.w13, self.w2, self.act)


def _empty(fmt: str, shape: tuple[int, int, int], dtype: torch.dtype, device) -> B.QuantTensor:
    if fmt in B.FLOAT_FORMATS:
        return B.QuantTensor(fmt, torch.empty(shape, dtype=B.FLOAT_FORMATS[fmt], device=device), shape)
    return B.QuantTensor(fmt, torch.empty(*shape[:2], B.row_bytes(fmt, shape[2]), dtype=torch.uint8,
                                          device=device), shape)
