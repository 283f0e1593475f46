"""CUDA-graph decode: one graph per (batch-size bucket, context-width bucket), replayed for decode steps, so
Python runs once per token instead of once per layer.

A graph covers the decoder layers and the final norm (not the embedding, which may live on the CPU, nor the
LM head: logits are computed eagerly from the graph's output, as nano-vllm does). Its inputs are static
buffers: hidden states [B, D], and the paged metadata (positions, slot mapping, block tables, context lengths).
Real rows are copied in; padded rows write to the cache's sink block and attend to it alone.

A model is captured only when every module under the layers is on the graph's CUDA device or says it is
capturable (`graph_capturable = True`, e.g. CPU experts run as host nodes); a module with
`graph_capturable = False`, a tensor elsewhere, a host sync in the eager warm-up step (checked unless a module
vouches for itself: its eager path may wait for the CPU), or a failed capture turn graphs off for good (logged
once) and decode runs eagerly. The contract operators follow is in
the README section on GPUs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from tandem.engine.kv_cache import KVCache
from tandem.models.attention import Batch, PagedMeta

log = logging.getLogger("tandem.engine")


def model_devices(model: nn.Module) -> set[torch.device]:
    """Devices holding any parameter or buffer of `model`."""
    return {t.device for t in (*model.parameters(), *model.buffers())}


def batch_buckets(max_batch: int) -> list[int]:
    """Batch sizes a graph is captured for: 1, 2, 4, 8, ... and max_batch itself."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return [*out, max_batch]


def pick_bucket(buckets: list[int], n: int) -> int | None:
    """The smallest bucket that holds n sequences; None if none does."""
    return next((b for b in buckets if b >= n), None)


def width_bucket(blocks: int, max_blocks: int, min_blocks: int = 16) -> int:
    """Block-table columns of the graph for a batch whose longest table has `blocks` blocks: a power of two
    (so the gathered context, and the work, is at most twice what the batch needs), within [min, max]."""
    w = max(min_blocks, 1 << max(blocks - 1, 0).bit_length())
    return max(blocks, min(w, max_blocks))


def transfer_map(decoder: nn.Module) -> dict[int, str]:
    cfg = getattr(decoder, "op_config", None)
    return dict(cfg.kwargs.get("transfer_map") or {}) if cfg is not None else {}


def run_layers(decoder: nn.Module, h: torch.Tensor, positions: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The decoder stack after the embedding (what the model operator does, transfer_map included)."""
    state = getattr(decoder, "run_state", None)
    if state is not None:
        state.phase = "generate"
    if hasattr(decoder, "forward_layers"):  # the model operator: layers + norm, transfer_map applied
        return decoder.forward_layers(h, positions, batch)
    transfers = transfer_map(decoder)
    for i, layer in enumerate(decoder.layers):
        if i in transfers:
            h, positions = h.to(transfers[i]), positions.to(transfers[i])
        h = layer(h, positions, batch)
    norm_dev = next((t.device for t in decoder.norm.parameters()), h.device)
    return decoder.norm(h.to(norm_dev))


def graph_device(decoder: nn.Module) -> torch.device | None:
    """Where the hidden state enters layer 0."""
    start = transfer_map(decoder).get(0)
    if start is not None:
        return torch.device(start)
    return next((t.device for t in decoder.layers[0].parameters()), None)


def vouching(decoder: nn.Module) -> list[str]:
    """Modules under the layers that say they are capturable (`graph_capturable = True`)."""
    return [n for n, m in decoder.layers.named_modules() if getattr(m, "graph_capturable", None) is True]


def capture_blockers(decoder: nn.Module, device: torch.device) -> list[str]:
    """Why the decoder layers cannot be captured on `device` (empty: they can)."""
    out = [f"the hidden state moves to {d} before layer {i}" for i, d in sorted(transfer_map(decoder).items())
           if torch.device(d) != device]

    def visit(m: nn.Module, name: str) -> None:
        flag = getattr(m, "graph_capturable", None)
        if flag is False:
            out.append(f"{name} ({type(m).__name__}) is not capturable")
        if flag is not None:
            return  # a module that says it is capturable vouches for its children
        for attr, t in (*m._parameters.items(), *m._buffers.items()):
            if t is not None and t.device != device:
                out.append(f"{name}.{attr} is on {t.device}")
        for child_name, child in m._modules.items():
            if child is not None:
                visit(child, f"{name}.{child_name}")

    visit(decoder.layers, "model.layers")
    visit(decoder.norm, "model.norm")
    return out


@dataclass
class DecodeGraph:
    graph: torch.cuda.CUDAGraph
    meta: PagedMeta  # static metadata on the device: views of `flat`
    flat: torch.Tensor  # [M] int64 on the device: every metadata tensor, one copy per step fills it
    staging: torch.Tensor  # [M] int64, pinned: the step's metadata packed on the host
    h: torch.Tensor  # [B, D] static input hidden states
    out: torch.Tensor  # [B, D] static output
    copied: torch.cuda.Event | None = None  # the last step's copy out of `staging` (steps may be queued ahead)


def packed(meta: PagedMeta, out: torch.Tensor | None = None) -> torch.Tensor:
    """The metadata tensors of `meta`, flattened into one int64 row in PagedMeta.TENSORS order (into `out`)."""
    return torch.cat([getattr(meta, name).reshape(-1).long() for name in PagedMeta.TENSORS], out=out)


def unpacked(flat: torch.Tensor, like: PagedMeta) -> PagedMeta:
    """A PagedMeta whose tensors are views of `flat`, shaped like `like`'s."""
    views, at = {}, 0
    for name in PagedMeta.TENSORS:
        t = getattr(like, name)
        views[name] = flat[at : at + t.numel()].view(t.shape)
        at += t.numel()
    return PagedMeta(**views, max_qlen=1, block_size=like.block_size, fresh=False)


class GraphRunner:
    """Decode steps through CUDA graphs, captured lazily per (batch bucket, width bucket)."""

    def __init__(self, model: nn.Module, cache: KVCache, max_batch: int):
        self.model, self.cache = model, cache
        self.buckets = batch_buckets(max_batch)
        self.graphs: dict[tuple[int, int], DecodeGraph] = {}
        self.disabled: str | None = None  # why graphs are off, once found
        self.device: torch.device | None = None
        self.strict = True  # warm-up under sync checks; off when a module vouches (its eager path may sync)
        self.pool = None
        self.replays = 0  # decode steps served by a graph (tests and benchmarks read it)

    def check(self) -> bool:
        """Once: can this model be captured at all? Logs why not."""
        if self.device is None and self.disabled is None:
            decoder = self.model.model
            dev = graph_device(decoder)
            if dev is None or dev.type != "cuda":
                self.off(f"layer 0 runs on {dev}, not a GPU")
            else:
                blockers = capture_blockers(decoder, dev)
                if blockers:
                    more = f" (+{len(blockers) - 3} more)" if len(blockers) > 3 else ""
                    self.off("; ".join(blockers[:3]) + more)
                else:
                    self.device, self.strict = dev, not vouching(decoder)
        return self.disabled is None

    def off(self, why: str) -> None:
        self.disabled = why
        log.info("CUDA graphs off, decode runs eagerly: %s", why)

    def padded(self, tables: list[list[int]], starts: list[int], bucket: int, width: int) -> PagedMeta:
        pad = bucket - len(tables)
        sink = self.cache.sink
        return PagedMeta.build([*tables, *[[sink]] * pad], [*starts, *[0] * pad], [1] * bucket,
                               self.cache.block_size, width_blocks=width, pad_block=sink)

    def decode(self, ids: torch.Tensor, tables: list[list[int]], starts: list[int]) -> torch.Tensor | None:
        """Hidden states [n, D] of one decode step (one new token per sequence), or None: run it eagerly."""
        if not self.check():
            return None
        n = len(tables)
        bucket = pick_bucket(self.buckets, n)
        if bucket is None:
            return None
        width = width_bucket(max(len(t) for t in tables), self.cache.num_blocks)
        meta = self.padded(tables, starts, bucket, width)
        h = self.model.model.embed_tokens(ids)  # [n, D], eager: the embedding may live on the CPU
        g = self.graphs.get((bucket, width))
        if g is None:
            return self.capture(bucket, width, meta, h, n)
        if g.copied is not None:
            g.copied.synchronize()  # the step queued before may not have read `staging` yet
        packed(meta, out=g.staging)
        g.flat.copy_(g.staging, non_blocking=True)  # one pinned copy
        g.copied = torch.cuda.Event()
        g.copied.record(torch.cuda.current_stream(g.flat.device))  # the stream the copy went to
        g.h[:n].copy_(h, non_blocking=True)
        g.graph.replay()
        self.replays += 1
        return g.out[:n]

    def capture(self, bucket: int, width: int, meta: PagedMeta, h: torch.Tensor, n: int) -> torch.Tensor | None:
        """Run this step eagerly on static buffers (sync-checked), then capture it for the next ones."""
        decoder, dev = self.model.model, self.device
        flat = packed(meta).to(dev)
        static = unpacked(flat, meta)
        h_in = torch.zeros((bucket, h.shape[1]), dtype=h.dtype, device=dev)
        h_in[:n].copy_(h)
        starts = (meta.context_lens - 1).tolist()
        batch = Batch([1] * bucket, starts, self.cache.bind(meta.block_tables.tolist(), starts, [1] * bucket),
                      static)
        mode = torch.cuda.get_sync_debug_mode()
        try:
            with torch.cuda.device(dev):
                torch.cuda.set_sync_debug_mode("error" if self.strict else mode)
                try:
                    result = run_layers(decoder, h_in, static.positions, batch).clone()
                finally:
                    torch.cuda.set_sync_debug_mode(mode)
                torch.cuda.synchronize(dev)
                static.forget()  # per-step tensors the warm-up made: the graph must compute its own
                graph = torch.cuda.CUDAGraph()
                self.pool = self.pool or torch.cuda.graph_pool_handle()
                with torch.cuda.graph(graph, pool=self.pool):
                    out = run_layers(decoder, h_in, static.positions, batch)
        except Exception as e:  # any failure means: not capturable, decode eagerly
            self.off(f"capture of batch {bucket} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            return None
        staging = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
        self.graphs[(bucket, width)] = DecodeGraph(graph, static, flat, staging, h_in, out)
        log.debug("captured a decode graph for batch %d, %d blocks per sequence", bucket, width)
        return result[:n]
