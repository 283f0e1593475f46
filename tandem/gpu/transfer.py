"""Streaming CPU-resident experts to the GPU for a layer-wise prefill: a ring of GPU slots, a side stream.

While layer i computes on the GPU with the experts in slot i % S, a worker thread queues the uploads of the next
layers into the other slots (from the CPU kernel's memory, page-locked in place, or through pinned staging), in
chunks of which at most two wait on the copy engine, so other host-to-device copies are not stuck behind them;
when layer i's compute is queued its slot takes layer i + S. S: as many layers as AHEAD_BYTES holds (at least
2), so the upload runs on while the compute stream waits for the host. The CPU kernel's blocks move as they are
(the GPU kernels read the same layouts), gate's and up's as two halves, GGUF's K-quants (Q4_K, Q5_K, Q6_K) too: a
long prefill's dense path dequantizes them into its workspace (tandem.gpu.dequant); below its threshold the
grouped GEMM, which does not read them, gets them joined and converted on the GPU at the layer's first call
(StreamedExperts). bench/results/prefill-8192-h200.md: where an 8192-token prefill's time goes.

Legend: E experts, I expert intermediate size, D hidden size.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import weakref
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from tandem.gpu import blocks as B
from tandem.gpu.prefill_gemm import Workspace
from tandem.ops.experts_gpu import GpuExperts

log = logging.getLogger(__name__)

# The compute stream waits for a layer's upload where the experts are first read (after the layer's attention and
# router), not before the layer: those overlap the upload. TANDEM_PREFILL_LATE_WAIT=0: before the layer.
LATE_WAIT = os.environ.get("TANDEM_PREFILL_LATE_WAIT", "1") == "1"
# Gate and up uploaded as two contiguous halves, read apart by the dense path (no interleaving copy on the upload
# stream); TANDEM_PREFILL_SPLIT=0: interleaved into the joined [E, 2I] layout after the upload.
SPLIT_UPLOAD = os.environ.get("TANDEM_PREFILL_SPLIT", "1") == "1"
# GPU memory for layers uploaded ahead (at least two slots, at most every layer, at most a quarter of the free
# memory): the upload runs on while the compute stream waits for the host (a cuDNN plan built at a new prompt
# length, ~30 ms on the H200; host syncs), instead of stopping two layers ahead. TANDEM_PREFILL_AHEAD_MB.
AHEAD_BYTES = int(os.environ.get("TANDEM_PREFILL_AHEAD_MB", "4096")) << 20
# Uploads reach the copy engine in chunks, at most DMA_DEPTH of them queued at once: the engine runs host-to-device
# copies in the order they were queued, so another copy (the prompt's hidden states from a CPU embedding) waits
# behind ~2 chunks, not behind every layer queued ahead (56 ms for 8 Qwen3 layers). TANDEM_PREFILL_DMA_CHUNK_MB=0:
# whole copies, none held back.
DMA_CHUNK = int(os.environ.get("TANDEM_PREFILL_DMA_CHUNK_MB", "64")) << 20
DMA_DEPTH = 2

# CPU kernel weight type id (tandem.kernels.cpu.FORMATS / ggml ids) -> the GPU format that reads it as is
DIRECT = {0: "fp32", 30: "bf16", 8: "q8_0", 2: "q4_0", 1001: "int4_g32", 1002: "int4_g128"}


@dataclass
class LayerBlocks:
    """One layer's CPU experts as bytes: gate / up [E, I, gate_row_bytes], down [E, D, down_row_bytes]."""

    types: tuple[int, int, int]  # weight type id per projection (gate, up, down)
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    shape: tuple[int, int, int]  # E, I, D

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.gate, self.up, self.down))


def _as_tensor(keep) -> torch.Tensor:
    """A buffer the CPU kernel keeps alive (torch tensor, or (buffer, numpy array)) as a flat uint8 tensor."""
    if isinstance(keep, torch.Tensor):
        return keep.reshape(-1).view(torch.uint8) if keep.dtype != torch.uint8 else keep.reshape(-1)
    arr = keep[1] if isinstance(keep, tuple) else keep
    return torch.frombuffer(arr, dtype=torch.uint8)


def cpu_blocks(backend) -> LayerBlocks | None:
    """The blocks of an experts.cpu backend (tandem.ops.experts.CpuExperts), no copy; None if not that."""
    kernel = getattr(backend, "kernel", None)
    if kernel is None:
        return None
    if hasattr(backend, "blocks"):  # the backend says itself: a format name or a (gate, up, down) triple
        from tandem.kernels.cpu import FORMATS

        fmt, gate, up, down = backend.blocks()
        types = tuple(FORMATS[f] for f in ((fmt,) * 3 if isinstance(fmt, str) else fmt))
    else:  # the MoEExperts keeps the buffers it maps (from_gguf_blocks / from_blocks), one per projection
        keep = getattr(kernel, "_keep", [])
        if len(keep) != 3:
            return None
        types, (gate, up, down) = kernel.types, (_as_tensor(k) for k in keep)
    e, i, d = kernel.E, kernel.I, kernel.H
    return LayerBlocks(tuple(types), gate.view(e, i, -1), up.view(e, i, -1), down.view(e, d, -1), (e, i, d))


def gpu_format(type_id: int, k: int) -> str:
    """The format a CPU weight type is uploaded as (as is where a GPU kernel reads it)."""
    if type_id in DIRECT:
        return DIRECT[type_id]
    if type_id in B.GGUF_KQUANT:
        return B.GGUF_KQUANT[type_id]
    return B.gguf_natural_format(type_id, k)


def to_gpu_experts(w13_raw: torch.Tensor, down_raw: torch.Tensor, blocks: LayerBlocks):
    """Raw bytes already on the device -> (w13 [E, 2I, D], w2 [E, D, I]) QuantTensors, converting if needed."""
    e, i, d = blocks.shape
    tg, tu, td = blocks.types
    if tg != tu:
        raise ValueError("layer-wise prefill: gate and up experts in different formats are not supported")
    return (_convert(w13_raw, tg, (e, 2 * i, d)), _convert(down_raw, td, (e, d, i)))


def split_gpu_experts(raw13: torch.Tensor, down_raw: torch.Tensor, blocks: LayerBlocks):
    """Raw bytes on the device, gate's then up's ([E, I] rows each) -> ((gate, up) [E, I, D] each, w2 [E, D, I])
    QuantTensors, converting if needed: the pair the dense path reads (StreamedExperts joins it for the grouped
    GEMM)."""
    e, i, d = blocks.shape
    tg, tu, td = blocks.types
    ng = blocks.gate.nbytes
    return ((_convert(raw13[:ng], tg, (e, i, d)), _convert(raw13[ng:], tu, (e, i, d))),
            _convert(down_raw, td, (e, d, i)))


def _convert(raw: torch.Tensor, type_id: int, shape: tuple[int, int, int]) -> B.QuantTensor:
    fmt = gpu_format(type_id, shape[-1])
    if type_id in DIRECT or type_id in B.GGUF_KQUANT:  # the uploaded bytes as they are
        if fmt in B.FLOAT_FORMATS:
            return B.QuantTensor(fmt, raw.view(B.FLOAT_FORMATS[fmt]).view(shape), shape)
        return B.QuantTensor(fmt, raw.view(*shape[:2], -1), shape)
    return B.from_gguf(raw.reshape(-1), type_id, shape, None, raw.device)  # other GGUF types: on the GPU


class StreamedExperts(GpuExperts):
    """A streamed layer's experts as uploaded: w13 joined [E, 2I, D] or the pair (gate, up) of [E, I, D] each, and
    w2. The dense path reads them as they are; forward (the grouped GEMM, below the dense threshold) first joins
    the pair and converts K-quants to formats it reads, on the current stream. `ready`: the upload's event, which
    the current stream waits for at the first read of w13 or w2 (LATE_WAIT)."""

    def __init__(self, w13, w2, act, device, origin: str = "", ready: torch.cuda.Event | None = None,
                 pending: Future | None = None):
        self._ready, self._pending = ready, pending  # pending: (w13, w2) once the upload is queued whole
        super().__init__(w13, w2, act, device, origin)

    @property
    def w13(self):
        self._wait()
        return self._w13

    @w13.setter
    def w13(self, value) -> None:
        self._w13 = value

    @property
    def w2(self) -> B.QuantTensor:
        self._wait()
        return self._w2

    @w2.setter
    def w2(self, value: B.QuantTensor) -> None:
        self._w2 = value

    def _wait(self) -> None:
        cur = torch.cuda.current_stream(self.device)
        if self._pending is not None:  # the streamer's worker has queued every copy (and recorded `ready`)
            self._w13, self._w2 = self._pending.result()
            self._pending = None
            for q in (*(self._w13 if isinstance(self._w13, tuple) else (self._w13,)), self._w2):
                q.data.record_stream(cur)  # converted on the side stream, read on this one: not reused before
        if self._ready is not None:
            cur.wait_event(self._ready)
            self._ready = None

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        if isinstance(self.w13, tuple):
            gate, up = self.w13
            if gate.fmt != up.fmt:
                raise ValueError("layer-wise prefill: gate and up experts in different formats are not supported "
                                 "below the dense threshold (tandem.gpu.prefill_gemm.DENSE_TOKENS)")
            self.w13 = B.QuantTensor(gate.fmt, torch.cat((gate.data, up.data), 1),
                                     (gate.shape[0], 2 * gate.shape[1], gate.shape[2]))
        self.w13, self.w2 = B.to_grouped(self.w13), B.to_grouped(self.w2)
        return super().forward(x, topk_ids, topk_weights)


@dataclass
class Slot:
    staging13: torch.Tensor | None  # pinned [E, 2I, rb], from the registry when the direct upload is refused
    staging2: torch.Tensor | None  # pinned [E, D, rb]
    gpu13: torch.Tensor
    gpu2: torch.Tensor
    ready: torch.cuda.Event  # upload done (staging reusable, GPU weights readable)
    free: torch.cuda.Event  # compute with the GPU weights done (slot reusable)


PAGE = 4096
OWN_PAGES = 32 << 20  # glibc serves allocations this large by mmap (its threshold's ceiling): pages of their own
# cudaHostRegisterPortable (pinned for every GPU's context); then with cudaHostRegisterReadOnly added, which a
# read-only mapping (a GGUF file's experts, used in place) needs
REGISTER_FLAGS = (1, 1 | 8)


class HostRegistry:
    """CPU memory this model page-locked in place (cudaHostRegister) for direct uploads, as page ranges.

    Only memory whose pages nothing else uses is registered: a range of whole pages, or a buffer of OWN_PAGES or
    more (an mmap of its own). A pageable copy of another tensor that starts in a registered page is taken for a
    pinned one and refused by the driver ("CUDA error: invalid argument", reported at a later call), and so is
    memory freed while registered and reused. So the registry holds the tensors it registered and unregisters
    them when it is collected (with the model operator that keeps it); smaller buffers go through staging."""

    def __init__(self):
        self.ranges: list[tuple[int, int]] = []  # [start, stop) byte addresses, page-aligned, disjoint
        self.keep: list[torch.Tensor] = []  # the registered tensors, alive while their pages are locked
        self.stage: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # slot -> pinned staging (gate+up, down)
        fin = weakref.finalize(self, _unregister, self.ranges, self.keep)
        fin.atexit = False  # at exit the process goes, and its registrations with it

    def covers(self, start: int, stop: int) -> bool:
        return not self._gaps(start, stop)

    def _gaps(self, start: int, stop: int) -> list[tuple[int, int]]:
        """The parts of [start, stop) no registered range covers."""
        gaps, at = [], start
        for a, b in sorted(self.ranges):
            if b <= at or a >= stop:
                continue
            if a > at:
                gaps.append((at, a))
            at = max(at, b)
        return gaps + ([(at, stop)] if at < stop else [])

    def staging(self, slot: int, n13: int, n2: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pinned staging buffers of a streamer's slot, kept across prefills (pinning GBs takes ~0.1 s per GB)."""
        have = self.stage.get(slot)
        if have is None or have[0].numel() < n13 or have[1].numel() < n2:
            have = self.stage[slot] = (torch.empty(n13, dtype=torch.uint8, pin_memory=True),
                                       torch.empty(n2, dtype=torch.uint8, pin_memory=True))
        return have

    def register(self, t: torch.Tensor) -> bool:
        """Page-lock the pages of `t`; False (the caller stages) where they may hold other data, overlap a range
        registered before, or the driver refuses."""
        ptr, n = t.data_ptr(), t.numel() * t.element_size()
        if self.covers(ptr, ptr + n):
            return True
        whole = ptr % PAGE == 0 and n % PAGE == 0
        if not (whole or n >= OWN_PAGES):
            return False
        # the pages not yet locked: tensors side by side in one mapping (a GGUF's stacked experts) share a page
        ok = True
        for a, b in self._gaps(ptr // PAGE * PAGE, -(-(ptr + n) // PAGE) * PAGE):
            if not any(_on_own_thread(lambda a=a, b=b, f=f: int(torch.cuda.cudart().cudaHostRegister(a, b - a, f)) == 0)
                       for f in REGISTER_FLAGS):
                ok = False
                break
            self.ranges.append((a, b))
        self.keep.append(t)  # also after a refusal midway: the pages locked before it must outlive their lock
        return ok


def _on_own_thread(fn):
    """fn() on a thread of its own: a CUDA call that fails leaves the runtime's per-thread error set, and the next
    kernel launch of the thread that made it would report it as its own."""
    result = []
    th = threading.Thread(target=lambda: result.append(fn()))
    th.start()
    th.join()
    return result[0] if result else None


def _unregister(ranges: list[tuple[int, int]], keep: list[torch.Tensor]) -> None:
    if ranges and torch.cuda.is_initialized():
        cudart = torch.cuda.cudart()
        _on_own_thread(lambda: [cudart.cudaHostUnregister(a) for a, _ in ranges])
    ranges.clear()
    keep.clear()  # the memory may be freed now that no registration points at it


def slot_count(layers: int, slot_bytes: int, free_bytes: int, ahead_bytes: int | None = None) -> int:
    """GPU slots of a streamer: as many layers as AHEAD_BYTES and a quarter of the free memory hold, at least 2
    (double buffering), at most one per layer."""
    budget = min(AHEAD_BYTES if ahead_bytes is None else ahead_bytes, free_bytes // 4)
    return max(2, min(layers, budget // max(1, slot_bytes)))


class LayerStreamer:
    """Upload of a sequence of layers' CPU experts into a ring of GPU slots (see the module docstring): start()
    queues the first len(slots) layers, done(i) frees layer i's slot and queues layer i + len(slots) into it.

    The CPU kernel's buffers are page-locked in place on first use (HostRegistry) and uploaded straight from
    there; where that fails for any of them the bytes go through pinned staging buffers, one per slot."""

    def __init__(self, layers: list[LayerBlocks], device: torch.device, act, registry: HostRegistry | None = None):
        self.layers, self.device, self.act = layers, torch.device(device), act
        big13 = max(lb.gate.nbytes + lb.up.nbytes for lb in layers)
        big2 = max(lb.down.nbytes for lb in layers)
        self.side = torch.cuda.Stream(self.device)
        n = slot_count(len(layers), big13 + big2, torch.cuda.mem_get_info(self.device)[0])
        self.slots = [Slot(None, None, torch.empty(big13, dtype=torch.uint8, device=self.device),
                           torch.empty(big2, dtype=torch.uint8, device=self.device),
                           torch.cuda.Event(), torch.cuda.Event()) for _ in range(n)]
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="tandem-stream")
        # upload from the kernel's page-locked memory; False: through the staging slots. Registered before any
        # upload is queued, once per buffer (the registry outlives this streamer)
        self.registry = registry if registry is not None else HostRegistry()
        self.direct = all(self.registry.register(t) for lb in layers for t in (lb.gate, lb.up, lb.down))
        self.big = (big13, big2)
        self.pending: dict[int, Future] = {}
        self.inflight: deque[torch.cuda.Event] = deque()  # the worker's chunks queued on the side stream
        self.workspace = Workspace()  # dequantized experts of a long prefill, one chunk of one layer at a time

    def start(self) -> None:
        """Queue the uploads of the first layers, one per slot."""
        for idx in range(len(self.slots)):
            self.prefetch(idx)

    def prefetch(self, idx: int) -> None:
        """Queue layer idx's upload (its slot's previous layer must be done(), or never used)."""
        if 0 <= idx < len(self.layers) and idx not in self.pending:
            self.pending[idx] = self.worker.submit(self._upload, idx)

    def _upload(self, idx: int):
        with torch.inference_mode():  # the buffers were made under the caller's inference mode
            return self._upload_now(idx)

    def _upload_now(self, idx: int):
        lb, slot = self.layers[idx], self.slots[idx % len(self.slots)]
        e, i, _ = lb.shape
        n13, n2 = lb.gate.nbytes + lb.up.nbytes, lb.down.nbytes
        if self.direct:
            try:
                return self._upload_direct(lb, slot, n13, n2)
            except RuntimeError as err:  # the driver refused the page-locked copy: stage from now on
                log.info("layer-wise prefill: uploading from the kernel's memory failed (%s); staging instead", err)
                self.direct = False
        slot.ready.synchronize()  # the previous upload from this staging is done
        if slot.staging13 is None:
            slot.staging13, slot.staging2 = self.registry.staging(idx % len(self.slots), *self.big)
        if SPLIT_UPLOAD:  # gate's rows then up's
            slot.staging13[: lb.gate.nbytes].copy_(lb.gate.reshape(-1))
            slot.staging13[lb.gate.nbytes : n13].copy_(lb.up.reshape(-1))
        else:  # gate rows then up rows per expert: the joined layout of GpuExperts
            st13 = slot.staging13[:n13].view(e, 2 * i, -1)
            st13[:, :i].copy_(lb.gate)
            st13[:, i:].copy_(lb.up)
        slot.staging2[:n2].copy_(lb.down.reshape(-1))
        with torch.cuda.stream(self.side):
            self.side.wait_event(slot.free)  # the layer that used this slot is done with it
            self._dma(slot.gpu13[:n13], slot.staging13[:n13])
            self._dma(slot.gpu2[:n2], slot.staging2[:n2])
            experts = (split_gpu_experts if SPLIT_UPLOAD else to_gpu_experts)(slot.gpu13[:n13], slot.gpu2[:n2], lb)
            slot.ready.record(self.side)
        return experts

    def _upload_direct(self, lb: LayerBlocks, slot: Slot, n13: int, n2: int):
        """DMA from the kernel's own memory, page-locked in place: contiguous uploads (SPLIT_UPLOAD: nothing
        else; otherwise gate and up then interleaved into the joined layout on the GPU)."""
        e, i, _ = lb.shape
        ng = lb.gate.nbytes
        with torch.cuda.stream(self.side):
            self.side.wait_event(slot.free)
            if SPLIT_UPLOAD:
                self._dma(slot.gpu13[:ng], lb.gate.reshape(-1))
                self._dma(slot.gpu13[ng:n13], lb.up.reshape(-1))
                self._dma(slot.gpu2[:n2], lb.down.reshape(-1))
                experts = split_gpu_experts(slot.gpu13[:n13], slot.gpu2[:n2], lb)
                slot.ready.record(self.side)
                return experts
            tmp = torch.empty(n13, dtype=torch.uint8, device=self.device)
            tmp[:ng].copy_(lb.gate.reshape(-1), non_blocking=True)
            tmp[ng:].copy_(lb.up.reshape(-1), non_blocking=True)
            g13 = slot.gpu13[:n13].view(e, 2 * i, -1)
            g13[:, :i].copy_(tmp[:ng].view(e, i, -1))
            g13[:, i:].copy_(tmp[ng:].view(e, i, -1))
            slot.gpu2[:n2].copy_(lb.down.reshape(-1), non_blocking=True)
            w13, w2 = to_gpu_experts(slot.gpu13[:n13], slot.gpu2[:n2], lb)
            slot.ready.record(self.side)
        return w13, w2

    def _dma(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """dst.copy_(src) (flat uint8) on the side stream, in DMA_CHUNK pieces with at most DMA_DEPTH queued:
        the worker waits for the oldest piece before queueing another."""
        step = DMA_CHUNK or src.numel()
        for a in range(0, src.numel(), step):
            while DMA_CHUNK and len(self.inflight) >= DMA_DEPTH:
                self.inflight.popleft().synchronize()
            dst[a : a + step].copy_(src[a : a + step], non_blocking=True)
            if DMA_CHUNK:
                done = torch.cuda.Event()
                done.record(self.side)
                self.inflight.append(done)

    def take(self, idx: int) -> StreamedExperts:
        """Layer idx's experts on the GPU, ordered after their upload on the current stream (LATE_WAIT: at their
        first read, which also waits there for the worker to have queued the whole upload; else now)."""
        ready = self.slots[idx % len(self.slots)].ready
        experts = StreamedExperts(None, None, self.act, self.device, "streamed for a layer-wise prefill", ready,
                                  self.pending.pop(idx))
        if not LATE_WAIT:
            experts._wait()
        return experts

    def done(self, idx: int) -> None:
        """Layer idx's compute is queued: its slot is free once the stream passes this point, and the layer that
        uses the slot next is queued behind that."""
        self.slots[idx % len(self.slots)].free.record(torch.cuda.current_stream(self.device))
        self.prefetch(idx + len(self.slots))

    def close(self) -> None:
        self.worker.shutdown(wait=True)
        self.workspace.buf = None  # back to the caching allocator once the queued layers are done


# ---------------------------------------------------------------------- when to stream


def layerwise_threshold(layer_bytes: int, h2d_bytes_per_s: float, cpu_tokens_per_s: float) -> int:
    """The prompt length from which streaming a layer's experts (layer_bytes / h2d) costs less than computing
    them on the CPU (tokens / cpu_tokens_per_s, one layer's routed experts at prefill batch sizes); the GPU's
    own compute is far faster than both and is left out."""
    if h2d_bytes_per_s <= 0 or cpu_tokens_per_s <= 0:
        raise ValueError("layer-wise prefill threshold: measured rates must be positive")
    return max(1, math.ceil(layer_bytes / h2d_bytes_per_s * cpu_tokens_per_s))


def measure_h2d(device: torch.device, nbytes: int = 256 << 20) -> float:
    """Host-to-device bandwidth from pinned memory, bytes/s (best of 3)."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = float("inf")
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return nbytes / best


def measure_cpu_tokens_per_s(kernel, tokens: int = 128, top_k: int = 8) -> float:
    """Tokens per second of one layer's CPU experts kernel at a prefill-like batch (random routing)."""
    import time

    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, kernel.H, generator=g).to(torch.bfloat16)
    k = min(top_k, kernel.E)
    ids = torch.stack([torch.randperm(kernel.E, generator=g)[:k] for _ in range(tokens)])
    w = torch.full((tokens, k), 1.0 / k)
    kernel.forward(x, ids, w)  # warm
    start = time.perf_counter()
    kernel.forward(x, ids, w)
    return tokens / (time.perf_counter() - start)
