"""The long-prefill path on the GPU: the Triton dequantizer against the torch reference per format, and the dense
expert GEMMs (torch._grouped_mm and the per-expert loop) against a float64 reference and the grouped quantized
GEMM they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gpu_ref import rel_err

from tandem.gpu import blocks as B
from tandem.gpu.dequant import dequantize_into
from tandem.gpu.prefill_gemm import Workspace, dense_experts

pytestmark = pytest.mark.gpu
FORMATS = ["q8_0", "q4_0", "int4_g32", "int4_g128"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_triton_dequantizer_equals_the_reference(fmt):
    """3 experts of 100 rows (not a multiple of the tile) x 384: fp32 within one rounding of q d + m (Triton may
    fuse it into an fma: <= 2^-23 of the largest |q d|), bf16 within one bf16 step of that."""
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(3, 100, 384, generator=g) * 0.05).cuda()
    qt = B.from_float(w, fmt)
    ref = B.dequantize(qt.data, fmt, qt.shape)
    out = dequantize_into(qt, torch.empty(qt.shape, device="cuda"))
    scale = ref.abs().max().item()
    assert (out - ref).abs().max().item() <= 2 * scale * 2**-23
    half = dequantize_into(qt[1:], torch.empty(2, 100, 384, dtype=torch.bfloat16, device="cuda"))
    assert ((half.float() - ref[1:]).abs() <= ref[1:].abs() * 2**-8 + scale * 2**-22).all()


def _reference(x, ids, w, gate, up, down):
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for e in range(gate.shape[0]):
        t, k = (ids == e).nonzero(as_tuple=True)
        if t.numel():
            xe = x[t].double()
            h = F.silu(xe @ gate[e].double().T) * (xe @ up[e].double().T)
            out.index_add_(0, t, (h @ down[e].double().T) * w[t, k].double()[:, None])
    return out


@pytest.mark.parametrize("fmt", ["int4_g32", "q8_0", "bf16"])
@pytest.mark.parametrize("dtype,grouped", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_dense_prefill_experts_on_the_gpu(fmt, dtype, grouped):
    """1500 tokens, 16 experts, top 4 (padding ids -1, one expert unused), chunks of 5 experts: equal to the
    float64 reference of the dequantized weights and to the grouped quantized GEMM (fused_experts)."""
    from tandem.gpu.quant_matmul import fused_experts

    e, i, d, t, k = 16, 256, 512, 1500, 4
    g = torch.Generator().manual_seed(2)
    w13 = B.from_float((torch.randn(e, 2 * i, d, generator=g) * 0.05).cuda(), fmt)
    w2 = B.from_float((torch.randn(e, d, i, generator=g) * 0.05).cuda(), fmt)
    deq13, deq2 = w13.dequantize(), w2.dequantize()
    x = torch.randn(t, d, generator=g).cuda()
    ids = torch.stack([torch.randperm(e - 1, generator=g)[:k] for _ in range(t)]).cuda()
    ids[::7, 0] = -1
    w = torch.rand(t, k, generator=g).cuda()
    ref = _reference(x, ids, w, deq13[:, :i], deq13[:, i:], deq2)
    ws = Workspace(limit_bytes=5 * 3 * i * d * torch.finfo(dtype).bits // 8)
    y = dense_experts(x.to(dtype), ids, w, w13, w2, F.silu, ws, grouped=grouped)
    # fp32: order of accumulation only; bf16: x, weights, hidden and output rounded to 8 bits
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(y, ref) < tol
    assert rel_err(y, fused_experts(x.to(dtype), ids, w, w13, w2, F.silu)) < tol
