"""Peak activation memory of one decoder layer's forward, measured by running it on the meta device.

Meta tensors have shapes and no data, so a DeepSeek-V3 layer at 128K context traces in milliseconds; a dispatch
mode counts every storage an op creates and a weak reference sees it freed, so the peak is the model code's own
(its temporaries, its float32 upcasts, its history gathers), whatever that code becomes. What meta cannot see:
the routed experts (their routing needs data; the memory model adds their workspace), and which attention
kernel CUDA picks. For the latter, scaled_dot_product_attention is answered during the trace as CUDA's rules
would pick (flash for unmasked equal head dims, memory-efficient for masked inputs with equal head counts: both
allocate only their output; else the math path, traced as it is, which materializes the scores).
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tandem.models.attention import Batch

# torch's SDPBackend numbering as _fused_sdp_choice returns it
SDP_MATH, SDP_FLASH, SDP_EFFICIENT = 0, 1, 2


class PeakMemory(TorchDispatchMode):
    """Counts the bytes of live storages created under it; `peak` is the most alive at once."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._refs: dict[int, weakref.ref] = {}
        self._ignored: set[int] = set()

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = id(st)
        if key in self._refs or key in self._ignored:
            return
        n = st.nbytes()

        def freed(_ref, key=key, n=n):
            if self._refs.pop(key, None) is not None:
                self.live -= n

        self._refs[key] = weakref.ref(st, freed)
        self.live += n
        self.peak = max(self.peak, self.live)

    def untrack(self, t: torch.Tensor) -> None:
        """Stop counting `t` (memory accounted elsewhere, e.g. the KV cache)."""
        key = id(t.untyped_storage())
        if self._refs.pop(key, None) is not None:
            self.live -= t.untyped_storage().nbytes()
        self._ignored.add(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def cuda_sdp_choice(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False) -> int:
    """The backend CUDA's SDPA picks for these inputs on a recent GPU, by its documented constraints."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or q.dtype not in (torch.float16, torch.bfloat16):
        return SDP_MATH
    same_heads = q.shape[1] == k.shape[1] == v.shape[1]
    if attn_mask is None and q.shape[-1] == k.shape[-1] == v.shape[-1] <= 256 and q.shape[-1] % 8 == 0:
        return SDP_FLASH  # flash takes grouped-query heads too
    if same_heads and q.shape[-1] == k.shape[-1] and q.shape[-1] % 8 == 0 and v.shape[-1] % 8 == 0:
        return SDP_EFFICIENT
    return SDP_MATH


@contextlib.contextmanager
def cuda_attention():
    """scaled_dot_product_attention as CUDA runs it: a fused kernel allocates its output (and a float32
    log-sum-exp row per query); the math fallback is the traced decomposition."""
    math = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if cuda_sdp_choice(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa) == SDP_MATH:
            return math(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                        enable_gqa=enable_gqa)
        # SDPA first turns a boolean mask into an additive one in the query dtype (alive during the kernel)
        additive = None if attn_mask is None or attn_mask.dtype != torch.bool else torch.empty(
            attn_mask.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        out = torch.empty((*q.shape[:-1], v.shape[-1]), dtype=q.dtype, device=q.device)
        del lse, additive
        return out

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = math


class _ExpertsStandIn(nn.Module):
    """In place of the routed experts: their result [N, D] arriving on the layer's device."""

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


class _History:
    """The KV cache as a traced layer sees it: history gathers are counted, the storage itself is not (KV)."""

    def __init__(self, tracker: PeakMemory, lengths: list[int], slots: int):
        self.tracker, self.lengths, self.slots = tracker, lengths, slots
        self.storage: dict[int, tuple[torch.Tensor, ...]] = {}

    def store(self, layer: int, seq: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # the reference path copies a sequence's whole history out of the cache: that copy is workspace
        return tuple(torch.empty((self.lengths[seq], *t.shape[1:]), dtype=t.dtype, device=t.device) for t in new)

    def buffers(self, layer: int, *like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if layer not in self.storage:
            bufs = tuple(torch.empty((self.slots, *t.shape[1:]), dtype=t.dtype, device=t.device) for t in like)
            for b in bufs:
                self.tracker.untrack(b)
            self.storage[layer] = bufs
        return self.storage[layer]


@dataclass(frozen=True, slots=True)
class Step:
    """One engine step to trace: `qlens` new tokens and `starts` cached ones per sequence."""

    qlens: tuple[int, ...]
    starts: tuple[int, ...]

    @property
    def tokens(self) -> int:
        return sum(self.qlens)


def _paged_meta(step: Step, block_size: int):
    try:
        from tandem.models.attention import PagedMeta
    except ImportError:  # an engine without batched paged attention: the reference path everywhere
        return None, 0
    tables, nxt = [], 0
    for s, q in zip(step.starts, step.qlens):
        n = -(-(s + q) // block_size)
        tables.append(list(range(nxt, nxt + n)))
        nxt += n
    meta = PagedMeta.build(tables, list(step.starts), list(step.qlens), block_size)
    return meta.to("meta"), (nxt + 1) * block_size


def layer_peak(layer: nn.Module, hidden: int, dtype: torch.dtype, step: Step, paged: bool, block_size: int = 16,
               fused_attention: bool = True) -> int:
    """Peak bytes of `layer`'s forward (its input and output included) for one engine step, on meta.

    The routed experts are replaced by their result; the KV storage is not counted (the memory model counts it).
    """
    mlp = getattr(layer, getattr(layer, "mlp_name", "mlp"))
    experts = getattr(mlp, "experts", None)
    if experts is not None:
        mlp.experts = _ExpertsStandIn()
    try:
        traced = copy.deepcopy(layer).to(dtype)
    finally:
        if experts is not None:
            mlp.experts = experts
    meta, slots = _paged_meta(step, block_size) if paged else (None, 0)
    tracker = PeakMemory()
    fused = cuda_attention() if fused_attention else contextlib.nullcontext()
    with torch.no_grad(), fused, tracker:
        history = _History(tracker, [s + q for s, q in zip(step.starts, step.qlens)], slots)
        batch = Batch(list(step.qlens), list(step.starts), history, *([meta] if meta is not None else []))
        x = torch.empty((step.tokens, hidden), dtype=dtype, device="meta")
        positions = torch.empty(step.tokens, dtype=torch.long, device="meta")
        out = traced(x, positions, batch)
        del out, x, positions
    return tracker.peak
