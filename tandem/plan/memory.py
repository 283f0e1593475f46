"""The memory model: what each device holds once a model is placed and running.

- weights: every module's tensors in the bytes they take once loaded (the model dtype for torch kernels; linears
  the user's rules put on linear.marlin / linear.fp8 in their block format's bytes, `resident`), and the stored
  bytes of the files;
- KV cache: per layer, (MLA latent + RoPE key) or (GQA K + V) per token, times the cache's slots (the engine's
  own KVCache sizes them: blocks of `block_size`, plus its sink block);
- buffers: the peak of a layer's forward at the prefill chunk and at decode (traced on meta, trace.py), the
  routed experts' workspace, the batch metadata, the logits, CUDA-graph pools, pinned host buffers of CPU
  experts, and on the host the largest mapped tensor during the load;
- overhead: per GPU the CUDA context and libraries (measured once per GPU model and cached in
  ~/.cache/tandem; an estimate where no GPU is present, and the plan says so); on the host, the process.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from tandem.models.attention import Attention
from tandem.models.deepseek import MLAttention
from tandem.models.layers import Experts
from tandem.plan.source import ModelSource
from tandem.plan.trace import Step, layer_peak

GPU_OVERHEAD_ESTIMATE = 640 << 20  # CUDA context + cuBLAS/cuDNN modules (lazy loading) on recent drivers
LIBRARY_WORKSPACE = 32 << 20  # cuBLAS workspace (held by torch's allocator) per GPU
HOST_OVERHEAD = 1 << 30  # the Python process with torch and tandem imported (CUDA libraries mapped)
ALLOC_ROUNDING = 2 << 20  # torch's allocator may count a large tensor's whole 2 MiB-rounded block as allocated
LARGE = 1 << 20  # tensors above this come from its large pool
PINNED_TOKENS = 256  # tokens of the pinned host buffers a CPU-experts layer keeps (hybrid MoE operator)
# GGUF block types experts.cpu runs as the file stores them (mapped, never converted)
KERNEL_GGUF_TYPES = {"F32", "BF16", "Q4_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K"}


@dataclass(frozen=True, slots=True)
class Workload:
    """What the plan must run: `sequences` sequences of up to `context` tokens, prompts fed `prefill_chunk`
    tokens per sequence per step; weights in `dtype`, the cache in `kv_dtype`."""

    context: int
    sequences: int = 1
    prefill_chunk: int = 2048
    dtype: torch.dtype = torch.bfloat16
    kv_dtype: torch.dtype = torch.bfloat16
    block_size: int = 16
    kv_tokens: int | None = None  # the cache's capacity over all sequences (default context * sequences)

    def __post_init__(self):
        for name in ("context", "sequences", "prefill_chunk", "block_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name.replace('_', ' ')} must be positive, got {getattr(self, name)}")

    @property
    def pool_tokens(self) -> int:
        return self.kv_tokens or self.context * self.sequences

    def steps(self) -> tuple[Step, Step]:
        """The worst prefill step (every sequence's chunk at the end of a full context) and decode step."""
        t = min(self.prefill_chunk, self.context)
        b, c = self.sequences, self.context
        return Step((t,) * b, (c - t,) * b), Step((1,) * b, (c - 1,) * b)


def cache_rows(w: Workload) -> int:
    """Slots the engine's KV cache allocates per layer for this workload (its own sizing rule)."""
    from tandem.engine.kv_cache import KVCache

    cache = KVCache(-(-w.pool_tokens // w.block_size), w.block_size)
    return cache.storage(0, (torch.empty((1, 1), device="meta"),))[0].shape[0]


def kv_per_token(attn: nn.Module) -> int:
    """Values one token keeps in the cache of this attention layer."""
    if isinstance(attn, MLAttention):
        return attn.a.kv_lora_rank + attn.a.qk_rope_head_dim  # the normed latent and the shared RoPE key
    if isinstance(attn, Attention):
        return 2 * attn.n_kv_heads * attn.head_dim  # K and V of every key/value head
    return 0


def tensor_bytes(t: torch.Tensor, dtype: torch.dtype) -> int:
    return t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())


def large_tensors(module: nn.Module, dtype: torch.dtype, skip: nn.Module | None = None) -> int:
    """Tensors of `module` (not under `skip`) above 1 MiB once loaded in `dtype`."""
    skipped = {id(t) for t in skip.parameters()} if skip is not None else set()
    return sum(1 for t in (*module.parameters(), *module.buffers())
               if id(t) not in skipped and tensor_bytes(t, dtype) > LARGE)


def own_bytes(module: nn.Module, dtype: torch.dtype) -> int:
    """Bytes of `module`'s tensors and all below it, loaded in `dtype` (integer tensors keep theirs)."""
    return sum(tensor_bytes(t, dtype) for t in (*module.parameters(), *module.buffers()))


@dataclass
class LayerInfo:
    """One decoder layer as the planner sees it."""

    index: int
    core: int  # bytes of everything but the routed experts (attention, norms, router, shared/dense MLP)
    experts: int  # bytes of the routed experts in the model dtype (0: a dense layer): on a GPU, or hot
    experts_cpu: int  # bytes experts.cpu holds: the GGUF blocks as stored, else the dtype it computes in
    n_experts: int
    top_k: int
    kv_token: int  # bytes one cached token takes in this layer
    kind: str  # layers of one kind trace alike
    experts_name: str | None = None  # module name of its routed experts
    large: int = 0  # tensors of the core above 1 MiB (each may round up by up to 2 MiB on a GPU)


@dataclass
class MemoryModel:
    """Per-module bytes and per-device buffers of one model under one workload."""

    src: ModelSource
    w: Workload
    _traces: dict = field(default_factory=dict, repr=False)
    resident: dict[str, int] = field(default_factory=dict)  # linear -> its weight's bytes as held, if not `dtype`

    def held_less(self, prefix: str) -> int:
        """Bytes the `resident` linears named `prefix` or below it hold less than their weights in the dtype."""
        return sum(tensor_bytes(self.src.model.get_submodule(n).weight, self.w.dtype) - b
                   for n, b in self.resident.items() if n == prefix or n.startswith(prefix + "."))

    @cached_property
    def layers(self) -> list[LayerInfo]:
        out = []
        decoder = self.src.model.model
        for i, layer in enumerate(decoder.layers):
            mlp_name = getattr(layer, "mlp_name", "mlp")
            mlp = getattr(layer, mlp_name)
            experts = getattr(mlp, "experts", None)
            eb = own_bytes(experts, self.w.dtype) if isinstance(experts, Experts) else 0
            k = getattr(mlp.gate, "top_k", None) or getattr(getattr(mlp.gate, "a", None), "num_experts_per_tok", 0) \
                if experts is not None else 0
            kind = f"{type(layer.self_attn).__name__}/{type(mlp).__name__}"
            name = f"model.layers.{i}.{mlp_name}.experts"
            core = own_bytes(layer, self.w.dtype) - eb - self.held_less(f"model.layers.{i}")
            out.append(LayerInfo(i, core, eb, self.cpu_experts_bytes(name, eb),
                                 len(experts) if experts else 0, k,
                                 kv_per_token(layer.self_attn) * self.w.kv_dtype.itemsize, kind,
                                 f"model.layers.{i}.{mlp_name}.experts" if experts is not None else None,
                                 large_tensors(layer, self.w.dtype, skip=experts)))
        return out

    def cpu_experts_bytes(self, name: str, in_dtype: int) -> int:
        """What experts.cpu holds for experts `name`: a GGUF file's blocks when it runs them (mapped), else the
        weights in the dtype it computes in (fp16 is held as fp32, exactly)."""
        stored = [t for n, t in self.src.tensors.items() if n.startswith(name + ".")]
        if self.src.kind in ("gguf", "hybrid") and stored and all(t.format in KERNEL_GGUF_TYPES for t in stored):
            return sum(t.nbytes for t in stored)
        return in_dtype * 2 if self.w.dtype == torch.float16 else in_dtype

    @cached_property
    def globals(self) -> dict[str, int]:
        """embed_tokens, norm, lm_head: bytes each (a tied lm_head is still its own copy once loaded)."""
        m = self.src.model
        return {"model.embed_tokens": own_bytes(m.model.embed_tokens, self.w.dtype),
                "model.norm": own_bytes(m.model.norm, self.w.dtype),
                "lm_head": own_bytes(m.lm_head, self.w.dtype) - self.held_less("lm_head")}

    @cached_property
    def rows(self) -> int:
        return cache_rows(self.w)

    def kv(self, i: int) -> int:
        """KV-cache bytes of layer i."""
        return self.layers[i].kv_token * self.rows

    @property
    def hidden(self) -> int:
        return self.src.model.model.embed_tokens.embedding_dim

    @property
    def vocab(self) -> int:
        return self.src.model.model.embed_tokens.num_embeddings

    # ------------------------------------------------------------------ activations

    def activation(self, i: int, paged: bool) -> tuple[int, int]:
        """(prefill, decode) peak bytes of layer i's forward, traced (cached per layer kind)."""
        kind = self.layers[i].kind
        key = (kind, paged)
        if key not in self._traces:
            layer = self.src.model.model.layers[i]
            self._traces[key] = tuple(layer_peak(layer, self.hidden, self.w.dtype, s, paged, self.w.block_size)
                                      for s in self.w.steps())
        return self._traces[key]

    def step_tokens(self) -> int:
        """The most tokens one engine step carries (every sequence's prefill chunk)."""
        return self.w.sequences * min(self.w.prefill_chunk, self.w.context)

    def experts_workspace(self, i: int, tokens: int | None = None) -> int:
        """Routed experts' temporaries for one step, per-expert loop with every token at one expert (bound)."""
        info = self.layers[i]
        if not info.n_experts:
            return 0
        n = tokens or self.step_tokens()
        inter = info.experts // info.n_experts // (3 * self.hidden * self.w.dtype.itemsize)
        b = self.w.dtype.itemsize
        return n * (4 * self.hidden + 3 * inter) * b + n * info.top_k * 20

    def stream_bytes(self, i: int) -> int:
        """GPU buffers of a layer-wise prefill through layer i (tandem/gpu/transfer.py, prefill_gemm.py): two slots
        of the layer's experts as the CPU holds them (one computes while the next uploads) and the workspace the
        long-prefill GEMMs dequantize them into."""
        from tandem.gpu.prefill_gemm import WORKSPACE_BYTES  # the GPU module, loaded only when a plan streams

        info = self.layers[i]
        if not info.n_experts:
            return 0
        return 2 * info.experts_cpu + min(WORKSPACE_BYTES, info.experts)

    def expert_bytes(self, i: int) -> int:
        info = self.layers[i]
        return info.experts // info.n_experts if info.n_experts else 0

    def metadata_bytes(self) -> int:
        """The step's paged metadata on each device (slot map, positions, block tables, lengths)."""
        n, b = self.step_tokens(), self.w.sequences
        width = -(-self.w.context // self.w.block_size)
        return 8 * (4 * n + b * width + 2 * b)

    def logits_bytes(self) -> int:
        """compute_logits on the last token of each sequence: [B, V] in the model dtype, then float32."""
        return self.w.sequences * (self.vocab * (self.w.dtype.itemsize + 4) + self.hidden * self.w.dtype.itemsize)

    def pinned_bytes(self) -> int:
        """Pinned host buffers one CPU-experts layer keeps for GPU <-> CPU copies (x, out, ids, weights)."""
        k = max((li.top_k for li in self.layers), default=0)
        return PINNED_TOKENS * (2 * self.hidden * self.w.dtype.itemsize + k * 12)


# ---------------------------------------------------------------------- per-GPU runtime overhead


def _cache_file() -> Path:
    return Path(os.environ.get("TANDEM_CACHE", Path.home() / ".cache" / "tandem")) / "gpu-overhead.json"


@dataclass(frozen=True, slots=True)
class Overhead:
    bytes: int  # CUDA context, kernels' modules: device memory outside torch's allocator
    workspace: int  # library workspaces torch's allocator holds (cuBLAS)
    measured: bool


def gpu_overhead(device: str | None = None) -> Overhead:
    """Runtime overhead of one GPU: measured on `device` (cached per GPU model, driver and torch), else an
    estimate."""
    if device is None or not torch.cuda.is_available():
        return Overhead(GPU_OVERHEAD_ESTIMATE, LIBRARY_WORKSPACE, False)
    idx = torch.device(device).index or 0
    props = torch.cuda.get_device_properties(idx)
    key = f"{props.name}|{props.total_memory}|torch {torch.__version__}|cuda {torch.version.cuda}"
    path = _cache_file()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if key not in cached:
        cached[key] = measure_gpu_overhead(idx)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cached, indent=1))
    return Overhead(int(cached[key]["overhead"]), int(cached[key]["workspace"]), True)


def measure_gpu_overhead(index: int = 0) -> dict[str, int]:
    """Device memory in use that torch's allocator does not hold, after the kernels a model step uses ran once."""
    import torch.nn.functional as F

    dev = torch.device("cuda", index)
    with torch.no_grad():
        a = torch.randn(256, 256, device=dev, dtype=torch.bfloat16)
        q = torch.randn(1, 4, 64, 64, device=dev, dtype=torch.bfloat16)
        _ = (F.linear(a, a) @ a).float().softmax(-1).topk(4, -1)
        _ = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        _ = F.scaled_dot_product_attention(q.float(), q.float(), q.float())
        _ = torch.cat([a, a]).index_select(0, torch.arange(4, device=dev)).sum()
        del a, q, _
    torch.cuda.synchronize(dev)
    free, total = torch.cuda.mem_get_info(dev)
    return {"overhead": total - free - torch.cuda.memory_reserved(dev),
            "workspace": torch.cuda.memory_allocated(dev)}


def host_overhead() -> int:
    return HOST_OVERHEAD


def gib(n: int | float) -> float:
    return round(n / (1 << 30), 3)


def ceil_to(n: int, m: int) -> int:
    return math.ceil(n / m) * m
