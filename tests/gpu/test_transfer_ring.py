"""The layer-wise prefill's upload ring (tandem.gpu.transfer.LayerStreamer) on a GPU: with 2, 3 or one slot per
layer, uploaded from page-locked kernel memory or through pinned staging, whole or in chunks held back by the
worker, every layer's experts read on the compute stream equal the CPU blocks, while the compute stream is slowed
down so that an upload overwriting a slot too early would show."""

from __future__ import annotations

import pytest
import torch

from tandem.gpu import blocks as B
from tandem.gpu import transfer
from tandem.gpu.dequant import dequantize_into

pytestmark = pytest.mark.gpu
E, I, D, LAYERS = 4, 128, 256, 5


def _aligned(nbytes: int, keep: list) -> torch.Tensor:
    """A uint8 CPU tensor of whole pages on its own pages (what HostRegistry page-locks in place)."""
    size = -(-nbytes // transfer.PAGE) * transfer.PAGE
    big = torch.empty(size + transfer.PAGE, dtype=torch.uint8)
    keep.append(big)
    off = -big.data_ptr() % transfer.PAGE
    return big[off : off + size][:nbytes]


def _layer(seed: int, direct: bool, keep: list) -> transfer.LayerBlocks:
    g = torch.Generator().manual_seed(seed)
    parts = []
    for rows, cols in ((I, D), (I, D), (D, I)):
        q = B.quantize(torch.randn(E, rows, cols, generator=g) * 0.05, "int4_g32").view(torch.uint8)
        if direct:
            t = _aligned(q.numel(), keep)
            t.copy_(q.reshape(-1))
            q = t.view(q.shape)
        parts.append(q)
    return transfer.LayerBlocks((1001,) * 3, *parts, (E, I, D))


@pytest.mark.parametrize("chunk", [0, 16 << 10])
@pytest.mark.parametrize("slots", [2, 3, LAYERS])
@pytest.mark.parametrize("direct", [True, False])
def test_ring_of_slots_uploads_every_layer_intact(slots, direct, chunk, monkeypatch):
    monkeypatch.setattr(transfer, "DMA_CHUNK", chunk)  # 16 KiB: 5 chunks per 80 KiB tensor, 2 queued at most
    keep = []
    layers = [_layer(s, direct, keep) for s in range(LAYERS)]
    slot_bytes = max(lb.gate.nbytes + lb.up.nbytes for lb in layers) + max(lb.down.nbytes for lb in layers)
    monkeypatch.setattr(transfer, "AHEAD_BYTES", slots * slot_bytes)
    streamer = transfer.LayerStreamer(layers, torch.device("cuda"), torch.nn.functional.silu, transfer.HostRegistry())
    assert len(streamer.slots) == slots
    got = []
    try:
        streamer.start()
        for idx in range(LAYERS):
            experts = streamer.take(idx)
            torch.cuda._sleep(2_000_000)  # the compute stream lags: an early overwrite of a slot would show
            gate, up = experts.w13
            got.append([dequantize_into(q, torch.empty(q.shape, device="cuda")) for q in (gate, up, experts.w2)])
            streamer.done(idx)  # queues layer idx + slots into this slot, behind the reads above
    finally:
        streamer.close()
    assert streamer.direct == direct
    for idx, lb in enumerate(layers):
        for q, want in zip(got[idx], (lb.gate, lb.up, lb.down)):
            ref = B.dequantize(want, "int4_g32", tuple(q.shape))
            # Triton may fuse q d + m into an fma: within 2^-22 of the largest value (test_prefill_gemm)
            assert (q.cpu() - ref).abs().max().item() <= ref.abs().max().item() * 2**-22, (idx, slots, direct)

