"""The long-prefill path on the GPU: the Triton dequantizer against the torch reference per format, and the dense
expert GEMMs (torch._grouped_mm and the per-expert loop) against a float64 reference and the grouped quantized
GEMM they replace, including GGUF K-quant experts dequantized from the file's own blocks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gpu_ref import rel_err
from moe_ref import moe_float64

from tandem.gpu import blocks as B
from tandem.gpu.dequant import dequantize_into
from tandem.gpu.prefill_gemm import Workspace, dense_experts
from tandem.weights import gguf_quants as gq

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
    joined = torch.full((3, 200, 384), 7.0, device="cuda")  # into the up half of a joined [E, 2N, K] buffer
    dequantize_into(qt, joined[:, 100:])
    assert torch.equal(joined[:, 100:], out) and (joined[:, :100] == 7).all()


def _kquant(ggml_type: int, shape: tuple[int, ...], seed: int) -> B.QuantTensor:
    """Random GGUF K-quant blocks [*, N, K] with sane fp16 d (and dmin): a tensor as a GGUF file stores it."""
    qt = gq.TYPES[ggml_type]
    n = torch.Size(shape).numel() // qt.block
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (n, qt.bytes), dtype=torch.uint8, generator=g)
    for at in [208] if ggml_type == 14 else [0, 2]:
        raw[:, at : at + 2] = (torch.rand(n, generator=g) * 0.002 + 1e-4).half().view(torch.uint8).view(n, 2)
    return B.QuantTensor(B.GGUF_KQUANT[ggml_type], raw.view(*shape[:-1], -1).cuda(), shape)


@pytest.mark.parametrize("ggml_type", [12, 13, 14])
def test_triton_kquant_dequantizer_equals_ggml(ggml_type):
    """3 experts of 100 rows x 768 (3 super-blocks) of Q4_K / Q5_K / Q6_K against gguf_quants' dequantizer: fp32
    within one rounding of the product d sc q (an fma may skip it) and one of the result (Q6_K, no sum: exact),
    bf16 that value rounded once (within one bf16 step where the fp32 values differ)."""
    qt = _kquant(ggml_type, (3, 100, 768), seed=ggml_type)
    ref = gq.dequantize(qt.data.reshape(-1), ggml_type, qt.shape, device="cuda")
    if ggml_type == 14:
        prod = ref
    else:  # the same blocks with dmin 0: the products d sc q alone
        raw = qt.data.clone().view(-1, gq.TYPES[ggml_type].bytes)
        raw[:, 2:4] = 0
        prod = gq.dequantize(raw.reshape(-1), ggml_type, qt.shape, device="cuda")
    out = dequantize_into(qt, torch.empty(qt.shape, device="cuda"))
    assert ((out - ref).abs() <= (prod.abs() + ref.abs()) * 2**-23).all()
    if ggml_type == 14:
        assert torch.equal(out, ref)
    joined = torch.full((3, 200, 768), 7.0, device="cuda")  # into the gate half of a joined buffer
    dequantize_into(qt, joined[:, :100])
    assert torch.equal(joined[:, :100], out) and (joined[:, 100:] == 7).all()
    half = dequantize_into(qt[1:], torch.empty(2, 100, 768, dtype=torch.bfloat16, device="cuda"))
    same = out[1:] == ref[1:]
    assert torch.equal(half[same], ref[1:][same].to(torch.bfloat16))
    assert ((half.float() - ref[1:]).abs() <= ref[1:].abs() * 2**-8 + prod[1:].abs() * 2**-22).all()


@pytest.mark.parametrize("down_type", [14, 13, 12])
@pytest.mark.parametrize("dtype,grouped", [(torch.float32, False), (torch.bfloat16, True)])
def test_dense_prefill_from_gguf_blocks(down_type, dtype, grouped):
    """A Q4_K_M-like layer as the layer-wise prefill streams it (gate/up Q4_K, down Q6_K / Q5_K / Q4_K, the file's
    blocks): the dense path equals the float64 reference of ggml's values; the streamed experts' grouped GEMM
    (K-quants converted at its first call: Q4_K -> int4_g32, 5/6-bit -> q8_0) agrees within that conversion."""
    from tandem.gpu.transfer import StreamedExperts

    e, i, d, t, k = 8, 256, 512, 700, 4
    w13 = _kquant(12, (e, 2 * i, d), seed=5)
    w2 = _kquant(down_type, (e, d, i), seed=6)
    deq13 = gq.dequantize(w13.data.reshape(-1), 12, w13.shape, device="cuda")
    deq2 = gq.dequantize(w2.data.reshape(-1), down_type, w2.shape, device="cuda")
    g = torch.Generator().manual_seed(7)
    x = torch.randn(t, d, generator=g).cuda()
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).cuda()
    ids[::9, 1] = -1
    w = torch.rand(t, k, generator=g).cuda()
    ref = moe_float64(x, ids, w, deq13[:, :i], deq13[:, i:], deq2)
    ws = Workspace(limit_bytes=3 * 3 * i * d * torch.finfo(dtype).bits // 8)  # chunks of 3 experts
    y = dense_experts(x.to(dtype), ids, w, w13, w2, F.silu, ws, grouped=grouped)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # as test_dense_prefill_experts_on_the_gpu
    assert rel_err(y, ref) < tol
    streamed = StreamedExperts(w13, w2, F.silu, "cuda")
    y_grouped = streamed.forward(x.to(dtype), ids, w)
    assert streamed.w13.fmt == "int4_g32" and streamed.w2.fmt == ("int4_g32" if down_type == 12 else "q8_0")
    # the conversion's error: fp16 sub-block scales (2^-11 relative) and, for 5/6 bits, int8 steps over groups of 32
    # that span two Q6_K sub-blocks of unrelated scales (measured 0.45% in fp32 on the CPU), plus bf16's rounding
    assert rel_err(y_grouped, ref) < 2e-2




@pytest.mark.parametrize("fmt", ["int4_g32", "q8_0", "bf16"])
@pytest.mark.parametrize("dtype,grouped", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_dense_prefill_experts_on_the_gpu(fmt, dtype, grouped):
    """1500 tokens, 16 experts, top 4 (padding ids -1, one expert unused), chunks of 5 experts: equal to the
    float64 reference of the dequantized weights and to the grouped quantized GEMM (fused_experts); gate and up
    given apart (the split upload) give the same values."""
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
    ref = moe_float64(x, ids, w, deq13[:, :i], deq13[:, i:], deq2)
    ws = Workspace(limit_bytes=5 * 3 * i * d * torch.finfo(dtype).bits // 8)
    y = dense_experts(x.to(dtype), ids, w, w13, w2, F.silu, ws, grouped=grouped)
    # fp32: order of accumulation only; bf16: x, weights, hidden and output rounded to 8 bits
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(y, ref) < tol
    pair = tuple(B.QuantTensor(fmt, h.contiguous(), (e, i, d)) for h in (w13.data[:, :i], w13.data[:, i:]))
    assert torch.equal(dense_experts(x.to(dtype), ids, w, pair, w2, F.silu, ws, grouped=grouped), y)  # as uploaded
    assert rel_err(y, fused_experts(x.to(dtype), ids, w, w13, w2, F.silu)) < tol


@pytest.mark.parametrize("grouped", [False, True])
def test_dense_prefill_one_chunk_no_padding(grouped):
    """The common long-prefill case, one workspace chunk and every slot routed (the expert GEMM's output used as it
    is, no padding row): equal to the float64 reference within bf16's rounding (1e-2, as above)."""
    e, i, d, t, k = 16, 256, 512, 2000, 4
    g = torch.Generator().manual_seed(8)
    w13 = B.from_float((torch.randn(e, 2 * i, d, generator=g) * 0.05).cuda(), "int4_g32")
    w2 = B.from_float((torch.randn(e, d, i, generator=g) * 0.05).cuda(), "int4_g32")
    deq13 = w13.dequantize()
    x = torch.randn(t, d, generator=g).cuda()
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).cuda()
    w = torch.rand(t, k, generator=g).cuda()
    ref = moe_float64(x, ids, w, deq13[:, :i], deq13[:, i:], w2.dequantize())
    y = dense_experts(x.bfloat16(), ids, w, w13, w2, F.silu, Workspace(), grouped=grouped)
    assert rel_err(y, ref) < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_silu_mul_and_combine_equal_torch(dtype, monkeypatch):
    """The Triton act-mul-weight and gather-sum kernels against the torch path of dense_experts (padding slots,
    chunks of 5 experts): fp32 within accumulation order (1e-5); bf16 within a rounding of the hidden (the fused
    kernel rounds act(g) u w once, torch three times) and of the output (1e-2, as above)."""
    from tandem.gpu import prefill_gemm

    e, i, d, t, k = 16, 256, 512, 1500, 4
    g = torch.Generator().manual_seed(9)
    w13 = B.from_float((torch.randn(e, 2 * i, d, generator=g) * 0.05).cuda(), "int4_g32")
    w2 = B.from_float((torch.randn(e, d, i, generator=g) * 0.05).cuda(), "int4_g32")
    x = torch.randn(t, d, generator=g).cuda().to(dtype)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).cuda()
    ids[::5, 2] = -1
    w = torch.rand(t, k, generator=g).cuda()
    ws = Workspace(limit_bytes=5 * 3 * i * d * torch.finfo(dtype).bits // 8)
    fused = dense_experts(x, ids, w, w13, w2, F.silu, ws)
    monkeypatch.setattr(prefill_gemm, "FUSED", False)
    plain = dense_experts(x, ids, w, w13, w2, F.silu, ws)
    assert rel_err(fused, plain) < (1e-5 if dtype == torch.float32 else 1e-2)
