"""CPU-side logic of GPU execution: block formats (quantize / dequantize / GGUF conversions in torch, as the GPU
runs them at load), sorted routing for the grouped GEMM, the layer-wise prefill's buffer layout and threshold.
No GPU needed: every function here is device-agnostic torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tandem.kernels.cpu as K
from tandem.gpu import blocks as B
from tandem.gpu.routing import moe_align
from tandem.gpu.transfer import LayerBlocks, cpu_blocks, layerwise_threshold, to_gpu_experts
from tandem.ops.experts import CpuExperts
from tandem.weights import gguf_quants as gq


def _weights(rows=48, cols=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[3, :32] = 0.0  # an all-zero group: scale 0 must not divide by zero
    w[5, 40] = 2.0  # an outlier
    return w


@pytest.mark.parametrize("fmt", ["q8_0", "int4_g32", "int4_g128"])
def test_torch_quantizer_writes_the_cpu_kernels_bytes(fmt):
    """The GPU quantizes safetensors weights at load with this code; the bytes equal the C++ quantizer's, so
    CPU and GPU hold one layout and stream between each other without conversion."""
    w = _weights()
    ours = B.quantize(w, fmt)
    assert torch.equal(ours, K.quantize(w, fmt))
    assert torch.equal(B.dequantize(ours, fmt, tuple(w.shape)), K.dequantize(ours, fmt, *w.shape))


def test_q4_0_is_ggml_q4_0():
    gguf = pytest.importorskip("gguf")
    w = _weights(seed=1)
    ref = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q4_0)
    assert np.array_equal(B.quantize(w, "q4_0").numpy(), ref.reshape(w.shape[0], -1))
    deq = gguf.quants.dequantize(ref, gguf.GGMLQuantizationType.Q4_0)
    assert torch.equal(B.dequantize(B.quantize(w, "q4_0"), "q4_0", tuple(w.shape)), torch.from_numpy(deq))


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "int4_g32", "int4_g128"])
def test_quantization_error_is_within_half_a_step(fmt):
    w = _weights(seed=2)
    blk = B.BLOCK_FORMATS[fmt][0]
    group = 32 if fmt in ("q8_0", "q4_0", "int4_g32") else 128
    err = (B.dequantize(B.quantize(w, fmt), fmt, tuple(w.shape)) - w).abs().view(w.shape[0], -1, group)
    span = w.view(w.shape[0], -1, group)
    levels = {"q8_0": 254, "q4_0": 16, "int4_g32": 15, "int4_g128": 15}[fmt]
    rng = 2 * span.abs().amax(-1) if fmt in ("q8_0", "q4_0") else span.amax(-1) - span.amin(-1)
    step = rng / levels
    # half a step (q4_0: a whole one, ggml clamps the end opposite its largest value to 7 of its 8 steps),
    # plus the fp16 rounding of scale and min (2^-11 relative, times up to 15 steps)
    half = 1.0 if fmt == "q4_0" else 0.5
    bound = step * (half + 16 * 2**-11) + span.abs().amax(-1) * 2**-10
    assert (err.amax(-1) <= bound + 1e-7).all(), (fmt, blk)


def _random_blocks(ggml_type: int, n_blocks: int, seed: int = 0) -> torch.Tensor:
    """Random bytes as blocks of a GGUF type, with sane fp16 scales (random bits would give inf/nan)."""
    qt = gq.TYPES[ggml_type]
    g = torch.Generator().manual_seed(seed)
    b = torch.randint(0, 256, (n_blocks, qt.bytes), dtype=torch.uint8, generator=g)
    scales = {2: [0], 3: [0, 2], 8: [0], 12: [0, 2], 13: [0, 2], 14: [208]}[ggml_type]
    for at in scales:
        val = torch.rand(n_blocks, generator=g) * 0.02 + 0.001
        b[:, at : at + 2] = val.half().view(torch.uint8).view(n_blocks, 2)
    return b


@pytest.mark.parametrize("ggml_type,fmt,exact", [(8, "q8_0", True), (2, "q4_0", True), (3, "int4_g32", True),
                                                 (12, "int4_g32", False), (13, "q8_0", False),
                                                 (14, "q8_0", False)])
def test_gguf_blocks_convert_to_the_kernel_layout(ggml_type, fmt, exact):
    """GGUF tensors become kernel blocks on the device that loads them: Q8_0/Q4_0 as they are, Q4_1 relaid
    exactly, Q4_K relaid with its sub-block scales d*sc and mins dmin*m rounded to fp16 (relative 2^-11 of
    each term), 5/6-bit types through 8 bits (half an int8 step)."""
    rows, cols = 16, 512
    qt = gq.TYPES[ggml_type]
    raw = _random_blocks(ggml_type, rows * cols // qt.block).reshape(-1)
    ref = gq.dequantize(raw, ggml_type, (rows, cols))
    got = B.from_gguf(raw, ggml_type, (rows, cols), None, "cpu")
    assert got.fmt == fmt
    deq = got.dequantize()
    if exact:
        assert torch.equal(deq, ref)
    elif ggml_type == 12:
        assert (deq - ref).abs().max() <= ref.abs().max() * 2**-10
    else:
        step = ref.view(rows, -1, 32).abs().amax(-1, keepdim=True) / 127
        assert ((deq - ref).view(rows, -1, 32).abs() <= step * 0.51 + 1e-7).all()


def test_gguf_requantize_in_chunks_equals_one_pass(monkeypatch):
    """A 6-bit tensor converted a few rows at a time (the device's bounded scratch) gives the same blocks."""
    raw = _random_blocks(14, 16 * 512 // 256).reshape(-1)
    whole = B.from_gguf(raw, 14, (16, 512), None, "cpu")
    monkeypatch.setattr(B, "CHUNK_VALUES", 3 * 512)  # 3 rows per chunk: 6 chunks, the last one short
    assert torch.equal(B.from_gguf(raw, 14, (16, 512), None, "cpu").data, whole.data)


def test_routing_sorts_slots_by_expert_with_padding():
    ids = torch.tensor([[0, 2], [2, 3], [-1, 0], [3, 3], [1, 9]])  # -1 and 9 (>= E) are dropped
    r = moe_align(ids, 4, 4)
    assert r.slots.numel() % 4 == 0 and r.block_expert.numel() == r.slots.numel() // 4
    seen = []
    for b, e in enumerate(r.block_expert.tolist()):
        block = r.slots[4 * b : 4 * b + 4].tolist()
        if e < 0:
            assert block == [-1] * 4
            continue
        for s in block:
            if s >= 0:
                assert ids.view(-1)[s] == e
                seen.append(s)
    valid = [s for s, e in enumerate(ids.view(-1).tolist()) if 0 <= e < 4]
    assert sorted(seen) == valid


def test_routing_has_static_sizes():
    """Sizes depend on T, K, E, block only: a CUDA graph replays it for any routing."""
    a = moe_align(torch.zeros(8, 2, dtype=torch.long), 16, 16)
    b = moe_align(torch.arange(16).view(8, 2), 16, 16)
    assert a.slots.shape == b.slots.shape and a.block_expert.shape == b.block_expert.shape


@pytest.mark.parametrize("via", ["blocks", "mapped"])
@pytest.mark.parametrize("fmt", ["int4_g32", "int8", "bf16"])
def test_cpu_experts_stream_to_the_gpu_layout_as_they_are(fmt, via):
    """Layer-wise prefill uploads the CPU kernel's bytes; on the GPU they read as the same weights."""
    E, I, D = 3, 128, 256  # noqa: E741
    g = torch.Generator().manual_seed(3)
    gate, up = torch.randn(E, I, D, generator=g) / 16, torch.randn(E, I, D, generator=g) / 16
    down = torch.randn(E, D, I, generator=g) / 11
    if fmt == "bf16":
        parts = [t.bfloat16().contiguous() for t in (gate, up, down)]
    else:
        parts = [K.quantize(t.reshape(-1, t.shape[-1]), fmt) for t in (gate, up, down)]
    kernel = K.MoEExperts.from_blocks(*parts, fmt, E, I, D)

    if via == "blocks":  # experts.cpu: CpuExperts.blocks() names the format and hands views of its buffers
        backend = CpuExperts(kernel, torch.float32, "test", tuple(parts))
    else:  # any backend exposing its MoEExperts as .kernel: the buffers the kernel maps

        class Backend:
            pass

        backend = Backend()
        backend.kernel = kernel
    lb = cpu_blocks(backend)
    assert isinstance(lb, LayerBlocks) and lb.shape == (E, I, D)
    w13_raw = torch.cat((lb.gate, lb.up), 1).reshape(-1)  # what the streamer uploads
    w13, w2 = to_gpu_experts(w13_raw, lb.down.reshape(-1), lb)
    g13, d2 = w13.dequantize(), w2.dequantize()
    for e in range(E):
        assert torch.equal(g13[e, :I], kernel.dequantize("gate", e))
        assert torch.equal(g13[e, I:], kernel.dequantize("up", e))
        assert torch.equal(d2[e], kernel.dequantize("down", e))


def test_layerwise_threshold_from_measured_rates():
    # DeepSeek-V3 layer, int4_g32: 7.4 GB of experts; 55 GB/s over PCIe; the CPU computes 2000 tokens/s per layer
    t = layerwise_threshold(7_400_000_000, 55e9, 2000.0)
    assert t == 270  # streaming takes 134.5 ms, the CPU does 269.1 tokens in that time
    assert layerwise_threshold(1, 1e12, 1.0) == 1
    with pytest.raises(ValueError, match="positive"):
        layerwise_threshold(1, 0.0, 1.0)


def test_q8_0_planar_holds_the_same_values_and_bytes_per_row():
    """GPU linears hold q8_0 re-laid per row (values, then scales) for the decode GEMV: exact, same row size, and
    never a format a rule can ask for."""
    w = _weights(rows=6, cols=96, seed=3)
    q = B.from_float(w, "q8_0")
    p = B.q8_0_planar(q)
    assert p.fmt == "q8_0p" and p.data.shape == q.data.shape and B.row_bytes("q8_0p", 96) == q.data.shape[-1]
    assert torch.equal(p.dequantize(), q.dequantize())
    assert torch.equal(p.data[:, :96], q.data.view(6, 3, 34)[:, :, 2:].reshape(6, 96))
    with pytest.raises(ValueError, match="not a GPU weight format"):
        B.canonical("q8_0p")
    with pytest.raises(ValueError, match="not q8_0"):
        B.q8_0_planar(B.from_float(w, "q4_0"))


def test_format_names_and_bad_shapes():
    assert B.canonical("int8") == "q8_0" and B.canonical("int4", 128) == "int4_g128"
    assert B.canonical("int4_sym") == "q4_0"
    with pytest.raises(ValueError, match="not a GPU weight format"):
        B.canonical("int3")
    with pytest.raises(ValueError, match="multiple of int4_g32's block of 128"):
        B.quantize(torch.zeros(4, 96), "int4_g32")


def test_host_registry_locks_only_pages_of_their_own(monkeypatch):
    """Direct uploads page-lock only whole pages or buffers mmapped on their own; small heap tensors (which share
    pages with other data) are left to staging, and a registration is asked once per range."""
    from tandem.gpu import transfer

    calls = []
    monkeypatch.setattr(transfer, "_on_own_thread", lambda fn: calls.append(fn) or True)
    reg = transfer.HostRegistry()
    small = torch.empty(1000, dtype=torch.uint8)
    assert not reg.register(small) and not calls
    big = torch.empty(transfer.OWN_PAGES, dtype=torch.uint8)
    assert reg.register(big) and len(calls) == 1
    assert reg.register(big[100:200]) and len(calls) == 1  # inside a range registered before
    start, stop = reg.ranges[0]
    assert start % transfer.PAGE == 0 and stop % transfer.PAGE == 0 and start <= big.data_ptr() < stop
    assert reg.keep == [big]  # held until unregistered


def test_host_registry_adjacent_tensors_share_a_page(monkeypatch):
    """Two large tensors side by side in one mapping (a GGUF's stacked experts, not page-aligned): the second
    locks only the pages the first did not; the ranges stay disjoint and together cover both."""
    from tandem.gpu import transfer

    calls = []
    monkeypatch.setattr(transfer, "_on_own_thread", lambda fn: calls.append(fn) or True)
    reg = transfer.HostRegistry()
    n = transfer.OWN_PAGES
    buf = torch.empty(2 * n + 3 * transfer.PAGE, dtype=torch.uint8)
    first, second = buf[100 : 100 + n], buf[100 + n : 100 + 2 * n]  # the boundary falls inside a page
    assert reg.register(first) and reg.register(second) and len(calls) == 2
    (a0, b0), (a1, b1) = sorted(reg.ranges)
    assert b0 == a1 and a0 <= first.data_ptr() and second.data_ptr() + n <= b1
    assert reg.covers(first.data_ptr(), second.data_ptr() + n) and reg.keep == [first, second]


# ---------------------------------------------------------------------- long prefill: dequantize once, dense GEMMs


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "int4_g32", "int4_g128"])
def test_dequantize_into_equals_the_cpu_kernels_dequantizer(fmt, monkeypatch):
    """fp32: exactly the C++ dequantizer's values; bf16: those values rounded once (round to nearest even)."""
    from tandem.gpu import dequant

    monkeypatch.setattr(dequant, "CHUNK_VALUES", 1000)  # several chunks of rows
    w = _weights(rows=3 * 40, cols=256, seed=7).view(3, 40, 256)
    qt = B.from_float(w, fmt)
    ref = K.dequantize(qt.data.reshape(-1), fmt, 120, 256).view(3, 40, 256)
    out = dequant.dequantize_into(qt, torch.empty(3, 40, 256))
    assert torch.equal(out, ref)
    half = dequant.dequantize_into(qt[1:], torch.empty(2, 40, 256, dtype=torch.bfloat16))  # a slice of experts
    assert torch.equal(half, ref[1:].to(torch.bfloat16))
    with pytest.raises(ValueError, match="dequantize_into"):
        dequant.dequantize_into(qt, torch.empty(3, 40, 128))


@pytest.mark.parametrize("ggml_type", [12, 13, 14])
def test_kquant_blocks_dequantize_into_the_reference(ggml_type, monkeypatch):
    """GGUF K-quants kept as the file stores them: fp32 equal to ggml's dequantizer, bf16 that rounded once."""
    from tandem.gpu import dequant

    monkeypatch.setattr(dequant, "CHUNK_VALUES", 1000)  # several chunks of rows
    rows, cols = 3 * 20, 512
    raw = _random_blocks(ggml_type, rows * cols // 256, seed=ggml_type).reshape(3, 20, -1)
    qt = B.QuantTensor(B.GGUF_KQUANT[ggml_type], raw, (3, 20, cols))
    ref = gq.dequantize(raw.reshape(-1), ggml_type, (3, 20, cols))
    assert B.row_bytes(qt.fmt, cols) == raw.shape[-1] and torch.equal(qt.dequantize(), ref)
    assert torch.equal(dequant.dequantize_into(qt, torch.empty(3, 20, cols)), ref)
    half = dequant.dequantize_into(qt[1:], torch.empty(2, 20, cols, dtype=torch.bfloat16))
    assert torch.equal(half, ref[1:].to(torch.bfloat16))


@pytest.mark.parametrize("dtype,grouped", [(torch.float32, False), (torch.bfloat16, True)])
def test_gguf_kquant_experts_stream_as_they_are(dtype, grouped):
    """A Q4_K_M layer (gate/up Q4_K, down Q6_K) uploads its bytes unchanged; the dense path dequantizes them,
    and the grouped GEMM gets them converted as a GGUF load converts them (Q4_K -> int4_g32, Q6_K -> q8_0)."""
    from tandem.gpu.prefill_gemm import Workspace, dense_experts

    e, i, d, t, k = 4, 256, 256, 29, 2
    gate, up = (_random_blocks(12, e * i * d // 256, seed=s).view(e, i, -1) for s in (1, 2))
    down = _random_blocks(14, e * d * i // 256, seed=3).view(e, d, -1)
    lb = LayerBlocks((12, 12, 14), gate, up, down, (e, i, d))
    w13, w2 = to_gpu_experts(torch.cat((gate, up), 1).reshape(-1), down.reshape(-1), lb)
    assert (w13.fmt, w2.fmt) == ("q4_k", "q6_k") and torch.equal(w2.data, down)
    g13, g2 = B.to_grouped(w13), B.to_grouped(w2)
    assert (g13.fmt, g2.fmt) == ("int4_g32", "q8_0") and B.to_grouped(g13) is g13
    assert torch.equal(g2.data, B.from_gguf(down.reshape(-1), 14, (e, d, i), None, "cpu").data)
    deq13, deq2 = w13.dequantize(), w2.dequantize()
    assert torch.equal(deq13[:, :i], gq.dequantize(gate.reshape(-1), 12, (e, i, d)))
    g = torch.Generator().manual_seed(4)
    x = torch.randn(t, d, generator=g)
    ids = torch.randint(0, e, (t, k), generator=g)
    w = torch.rand(t, k, generator=g)
    ref = _experts_reference(x, ids, w, deq13[:, :i], deq13[:, i:], deq2)
    y = dense_experts(x.to(dtype), ids, w, w13, w2, torch.nn.functional.silu, Workspace(), grouped=grouped)
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert err < (1e-5 if dtype == torch.float32 else 2e-2), err  # as test_dense_prefill_experts_equal_the_reference


def _experts_reference(x, ids, w, gate, up, down):
    """Per token and slot, in fp64: sum_k w_k down_e(silu(gate_e x) up_e x)."""
    x64, out = x.double(), torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e < 0:
                continue
            h = torch.nn.functional.silu(gate[e].double() @ x64[t]) * (up[e].double() @ x64[t])
            out[t] += float(w[t, k]) * (down[e].double() @ h)
    return out


@pytest.mark.parametrize("fmt", ["int4_g32", "q8_0", "fp32"])
@pytest.mark.parametrize("dtype,grouped", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_dense_prefill_experts_equal_the_reference(fmt, dtype, grouped):
    """Slots sorted by expert, experts dequantized in chunks of 2 (a small workspace), one GEMM per expert or
    torch._grouped_mm; padding ids (-1) add nothing and an expert no token chose is skipped."""
    from tandem.gpu.prefill_gemm import Workspace, dense_experts

    e, i, d, t, k = 5, 128, 128, 37, 2
    g = torch.Generator().manual_seed(3)
    gate, up = torch.randn(e, i, d, generator=g) * 0.1, torch.randn(e, i, d, generator=g) * 0.1
    down = torch.randn(e, d, i, generator=g) * 0.1
    w13, w2 = B.from_float(torch.cat((gate, up), 1), fmt), B.from_float(down, fmt)
    deq13, deq2 = w13.dequantize(), w2.dequantize()  # what both paths compute with
    x = torch.randn(t, d, generator=g)
    ids = torch.randint(0, e - 1, (t, k), generator=g)  # expert e - 1: no token
    ids[::5, 1] = -1
    w = torch.rand(t, k, generator=g)
    ref = _experts_reference(x, ids, w, deq13[:, :i], deq13[:, i:], deq2)
    ws = Workspace(limit_bytes=2 * 3 * i * d * torch.finfo(dtype).bits // 8)
    y = dense_experts(x.to(dtype), ids, w, w13, w2, torch.nn.functional.silu, ws, grouped=grouped)
    assert y.dtype == dtype and ws.buf.numel() == 2 * 3 * i * d
    err = ((y.double() - ref).norm() / ref.norm()).item()
    # fp32: accumulation order only (~1e-6); bf16: x, weights and the hidden rounded to 8 bits (~3 rel. steps)
    assert err < (1e-5 if dtype == torch.float32 else 2e-2), err


def test_dense_prefill_threshold(monkeypatch):
    """bf16 with torch._grouped_mm from DENSE_TOKENS; other dtypes (per-expert loop) from LOOP_TOKENS; 0: off."""
    from tandem.gpu import prefill_gemm as P

    cpu = torch.device("cpu")
    assert P.dense_threshold(torch.bfloat16, cpu) == P.DENSE_TOKENS
    assert P.dense_threshold(torch.float32, cpu) == max(P.DENSE_TOKENS, P.LOOP_TOKENS)
    monkeypatch.setattr(P, "DENSE_TOKENS", 0)
    assert P.dense_threshold(torch.bfloat16, cpu) == 0
