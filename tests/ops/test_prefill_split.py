"""CPU-side logic of the layer-wise prefill's split upload (runs in `make test`): gate and up uploaded as two
contiguous halves, dequantized into their rows of the joined [E, 2I, D] layout, and the dense expert GEMMs fed
the pair equal to the joined weights (and to a float64 reference, with padding slots and workspace chunks)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from moe_ref import moe_float64

from tandem.gpu import blocks as B
from tandem.gpu.dequant import dequantize_into, rows_apart
from tandem.gpu.prefill_gemm import Workspace, dense_experts
from tandem.gpu.transfer import LayerBlocks, slot_count, split_gpu_experts, to_gpu_experts


def test_dequantize_into_half_of_a_joined_buffer():
    g = torch.Generator().manual_seed(3)
    qt = B.from_float(torch.randn(3, 20, 256, generator=g) * 0.05, "int4_g32")
    joined = torch.full((3, 40, 256), 7.0)
    assert rows_apart(joined[:, 20:]) == (20, 40 * 256) and rows_apart(joined) == (40, 40 * 256)
    dequantize_into(qt, joined[:, 20:])
    assert torch.equal(joined[:, 20:], qt.dequantize()) and (joined[:, :20] == 7).all()
    with pytest.raises(ValueError, match="contiguous rows"):
        dequantize_into(qt, torch.empty(3, 256, 20).transpose(1, 2))


def test_split_upload_layout_equals_the_joined_one():
    """The bytes the streamer uploads with SPLIT_UPLOAD (gate's rows, then up's) read as the pair equal the joined
    layout's halves, format by format (direct formats and GGUF K-quants as stored)."""
    e, i, d = 4, 128, 256
    g = torch.Generator().manual_seed(4)
    for fmt, type_id in (("int4_g32", 1001), ("q8_0", 8)):
        gate, up, down = (B.quantize(torch.randn(e, r, c, generator=g) * 0.05, fmt)
                          for r, c in ((i, d), (i, d), (d, i)))
        lb = LayerBlocks((type_id,) * 3, gate.view(torch.uint8), up.view(torch.uint8), down.view(torch.uint8),
                         (e, i, d))
        (sg, su), w2 = split_gpu_experts(torch.cat((gate.reshape(-1), up.reshape(-1))).view(torch.uint8),
                                         down.reshape(-1).view(torch.uint8), lb)
        w13, w2j = to_gpu_experts(torch.cat((gate, up), 1).reshape(-1).view(torch.uint8),
                                  down.reshape(-1).view(torch.uint8), lb)
        full = w13.dequantize()
        assert sg.shape == su.shape == (e, i, d) and sg.fmt == fmt
        assert torch.equal(sg.dequantize(), full[:, :i]) and torch.equal(su.dequantize(), full[:, i:])
        assert torch.equal(w2.dequantize(), w2j.dequantize())




@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("chunks", [False, True])
def test_dense_experts_from_the_pair_on_the_cpu(padded, chunks):
    """fp32 on the CPU (loop of torch.mm): the pair and the joined weights give the same values, equal to the float64
    reference within fp32 accumulation order (1e-5); with padding slots (id -1) and in chunks of 3 experts."""
    e, i, d, t, k = 8, 128, 256, 200, 3
    g = torch.Generator().manual_seed(5)
    w13 = B.from_float(torch.randn(e, 2 * i, d, generator=g) * 0.05, "int4_g32")
    w2 = B.from_float(torch.randn(e, d, i, generator=g) * 0.05, "int4_g32")
    pair = tuple(B.QuantTensor("int4_g32", h.contiguous(), (e, i, d)) for h in (w13.data[:, :i], w13.data[:, i:]))
    x = torch.randn(t, d, generator=g)
    ids = torch.stack([torch.randperm(e - 1, generator=g)[:k] for _ in range(t)])
    if padded:
        ids[::7, 0] = -1
    w = torch.rand(t, k, generator=g)
    deq13 = w13.dequantize()
    ref = moe_float64(x, ids, w, deq13[:, :i], deq13[:, i:], w2.dequantize())
    limit = 3 * 3 * i * d * 4 if chunks else 1 << 30
    y_pair = dense_experts(x, ids, w, pair, w2, F.silu, Workspace(limit), grouped=False)
    y_joined = dense_experts(x, ids, w, w13, w2, F.silu, Workspace(limit), grouped=False)
    assert torch.equal(y_pair, y_joined)
    assert ((y_pair.double() - ref).norm() / ref.norm()).item() < 1e-5


def test_slot_count_of_the_upload_ring():
    assert slot_count(8, 100, 10_000, ahead_bytes=450) == 4
    assert slot_count(8, 100, 1_000, ahead_bytes=4000) == 2  # a quarter of the free memory, at least 2
    assert slot_count(3, 100, 10**9, ahead_bytes=10**9) == 3  # one per layer at most
