"""The MoE block operator: router and shared experts on the GPU, routed experts wherever their rule put them.

When the routed experts run on the CPU kernel and the block on a GPU, one layer is (KTransformers' hybrid MoE):

    router (GPU) -> x, ids, weights copied to pinned host buffers (non_blocking, one event)
    shared experts queued on the GPU          | CPU experts: the C++ kernel, GIL released
    [hot experts: the Triton grouped GEMM]    |
    wait -> the result copied back (pinned, non_blocking) -> added on the GPU, handed to out_device

Under CUDA-graph capture the same layer is stream work only: the copies, the C++ kernel as a host node
(cudaLaunchHostFunc with MoEExperts.host_job), the shared experts on a forked side stream joined after; so a
decode graph replays the whole layer with no Python. During a layer-wise GPU prefill (ops/model.py) the model
operator hands the layer its experts streamed to the GPU (`streamed`) and the block runs there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from tandem.models.deepseek import MoEGate
from tandem.models.transformer import SparseMoE, TopKRouter
from tandem.ops.base import DeviceOp, LoadContext, OpConfig, load_own_tensors

GRAPH_TOKENS = 512  # tokens the graph buffers hold: the largest decode batch a captured graph may have


@dataclass
class Staging:
    """Pinned host buffers for `cap` tokens: the layer's input, routing and the CPU experts' output."""

    x: torch.Tensor  # [cap, D] bf16 / fp32
    ids: torch.Tensor  # [cap, K] int64
    weights: torch.Tensor  # [cap, K] fp32
    out: torch.Tensor  # [cap, D], x's dtype
    hint: torch.Tensor  # [cap, K] int64: the next layer's predicted ids, for the read-ahead (written by the GPU)
    jobs: dict = field(default_factory=dict)  # (kernel id, n) -> HostJob bound to these buffers
    bells: dict = field(default_factory=dict)  # (job id, n) -> its tandem.gpu.doorbell.Doorbell

    @classmethod
    def allocate(cls, cap: int, d: int, k: int, dtype: torch.dtype) -> Staging:
        def pinned(*shape, dt):
            return torch.empty(*shape, dtype=dt, pin_memory=True)

        return cls(pinned(cap, d, dt=dtype), pinned(cap, k, dt=torch.long), pinned(cap, k, dt=torch.float32),
                   pinned(cap, d, dt=dtype), pinned(cap, k, dt=torch.long).fill_(-1))

    @property
    def cap(self) -> int:
        return self.x.shape[0]


@dataclass
class Unstaged:
    """A hybrid block's output not read back yet: the CPU experts' rows in pinned memory and the device tensors
    (shared / hot experts) to add to them in order. tandem.ops.residual adds it into the residual stream inside the
    next norm's launch (tandem.gpu.fused.add_rms_norm) instead of a stage_in, an add and a norm."""

    out: torch.Tensor  # [N, D] pinned, kernel_dtype
    adds: tuple[torch.Tensor, ...]


class PinnedPool:
    """The staging buffers every hybrid MoE layer of one model shares: layers run one after another in stream
    order, so a layer's copies are done before the next layer's kernel writes the buffers again.

    Eager calls use buffers that grow with the batch; graphs use buffers allocated once for GRAPH_TOKENS tokens
    and never moved, since a captured host node holds their addresses."""

    def __init__(self):
        self.eager: dict[tuple, Staging] = {}
        self.graph: dict[tuple, Staging] = {}

    def get(self, n: int, d: int, k: int, dtype: torch.dtype, for_graph: bool) -> Staging:
        key = (d, k, dtype)
        pool = self.graph if for_graph else self.eager
        st = pool.get(key)
        if for_graph:
            if st is None:
                st = pool[key] = Staging.allocate(GRAPH_TOKENS, d, k, dtype)
            if n > st.cap:
                raise ValueError(f"a CUDA graph of {n} tokens exceeds the hybrid MoE's graph buffers ({st.cap})")
            return st
        if st is None or st.cap < n:
            st = pool[key] = Staging.allocate(max(n, 2 * st.cap if st else 64), d, k, dtype)
        return st


@cache
def _mm_fp32_out(device: torch.device) -> bool:
    """Whether torch.mm takes out_dtype=float32 for bf16 inputs on this device (CUDA builds of torch >= 2.8)."""
    one = torch.ones(1, 1, dtype=torch.bfloat16, device=device)
    try:
        torch.mm(one, one, out_dtype=torch.float32)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return True


def fp32_logits(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x w^T in float32 as MoEGate computes it (x.float() @ w.float()^T): bf16 products are exact in fp32, so a
    bf16 GEMM accumulating in fp32 gives the same sums (up to their order) without converting the weight."""
    if x.dtype == w.dtype == torch.bfloat16 and x.is_cuda and _mm_fp32_out(x.device):
        return torch.mm(x, w.t(), out_dtype=torch.float32)
    return F.linear(x.float(), w.float())


def same_device(a, b) -> bool:
    """cuda and cuda:<current> are one device."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    here = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return (a.index if a.index is not None else here) == (b.index if b.index is not None else here)


def kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The activation dtype the CPU kernel takes for a model dtype (bf16 as is, others through fp32)."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def grouping_of(gate: MoEGate):
    """MoEGate's selection after its logits as tandem.gpu.staging.Grouping."""
    from tandem.gpu import staging

    a = gate.a
    normalize = a.norm_topk_prob and a.num_experts_per_tok > 1
    return staging.Grouping(getattr(gate, "e_score_correction_bias", None), sigmoid=a.scoring_func == "sigmoid",
                            n_group=1 if a.topk_method == "greedy" else a.n_group, topk_group=a.topk_group or 1,
                            top2=a.topk_method == "noaux_tc",
                            scale=a.routed_scaling_factor if a.v3_routing or not normalize else 1.0)


def top_k_of(gate: nn.Module) -> int:
    """Experts per token of a router (TopKRouter or DeepSeek's MoEGate)."""
    return getattr(gate, "top_k", None) or gate.a.num_experts_per_tok


def leave_cores(n: int) -> None:
    """Shrink the CPU kernel's pool by `n` threads if it has its default size (one pinned thread per physical
    core), so that the threads driving the GPU never share a core with a pool thread."""
    from tandem.kernels import cpu

    cores = cpu.physical_cores()
    if n > 0 and cores > 2 * n and cpu.num_threads() == cores:
        cpu.set_num_threads(cores - n)


class HybridMoE(DeviceOp):
    """Mixed under SparseMoE (see the module docstring). `pool` is set by the model operator."""

    pool: PinnedPool
    # CPU experts as CUDA-graph host nodes (TANDEM_HOST_NODES=0 turns them off: eager hybrid layers). They were
    # 19x slower than the direct kernel call while the pool had a thread pinned on every core: the driver's
    # host-function thread and Python's main thread (spinning in a CUDA sync) then share a core with a pool
    # thread and every barrier of the kernel waits a time slice. With one core left to them (driver_cores) a
    # host node costs what the direct call does (bench/results/e2e-h200.md, 2026-11-21 overhead section).
    host_nodes: bool = os.environ.get("TANDEM_HOST_NODES", "1") == "1"
    # Cores the CPU kernel's pool leaves to the threads that drive the GPU, when it has its default size (one
    # thread per physical core); TANDEM_DRIVER_CORES overrides, 0 keeps every core.
    driver_cores: int = int(os.environ.get("TANDEM_DRIVER_CORES", "1"))
    # Shared / hot experts of a captured layer on a parallel branch next to the CPU experts (1), or before them in
    # stream order (TANDEM_SHARED_BRANCH=0; measured slower: DeepSeek-V3's gap between calls 0.216 -> 0.389 ms)
    shared_branch: bool = os.environ.get("TANDEM_SHARED_BRANCH", "1") == "1"
    # TANDEM_READ_AHEAD=1: captured layers with a doorbell predict the next hybrid layer's experts (its router on
    # this layer's input, on the GPU while the CPU computes this layer) and the pool reads them ahead while the GPU
    # works between the two calls (csrc/tandem/read_ahead.h). Off by default: on the H200 host each thread
    # computes the rows it read (4.8-5.3 MB of a Qwen3-30B-A3B call's 23.6 MB) and the call was at most 3% faster,
    # within the noise (bench/results/e2e-h200.md, sixth session).
    read_ahead: bool = os.environ.get("TANDEM_READ_AHEAD", "0") == "1"
    next_block: tuple = ()  # (the next HybridMoE of the stack,), set by the model operator (a tuple: no submodule)
    _pool_sized = False
    streamed = None  # GpuExperts for the current layer-wise prefill, set and cleared by the model operator
    workspace = None  # tandem.gpu.prefill_gemm.Workspace of that prefill (dense path), set with `streamed`
    _side: torch.cuda.Stream | None = None
    _hot_gpu = None

    # ------------------------------------------------------------------ what runs where

    def cpu_kernel(self):
        """The C++ MoEExperts of the current phase if this layer runs hybrid (GPU block, CPU experts)."""
        experts = self.experts
        backends = getattr(experts, "backends", None)
        if backends is None or self.streamed is not None:
            return None
        kernel = getattr(backends[self.run_state.phase], "kernel", None)
        dev = torch.device(self.op_config.generate_device)
        return kernel if kernel is not None and dev.type == "cuda" and hasattr(kernel, "submit") else None

    @property
    def graph_capturable(self) -> bool | None:
        """What this block says to the graph runner (E1's contract, tandem/engine/graphs.py): True when its decode
        step is stream work only with the CPU kernel as a host node; None (decided by where its tensors are)
        when the routed experts run on the block's own GPU with a capturable backend; False otherwise."""
        dev = torch.device(self.op_config.generate_device)
        backends = getattr(self.experts, "backends", None)
        if backends is None:
            return None  # the model's own Experts: their parameters say where they are
        generate = backends["generate"]
        if dev.type == "cuda" and hasattr(getattr(generate, "kernel", None), "host_job"):
            return bool(self.host_nodes)
        if getattr(self.experts, "hot", None) is not None:
            return False  # hot experts outside a hybrid layer run the torch reference (host sync)
        if getattr(generate, "capturable", False) and same_device(generate.device, dev):
            return None  # e.g. experts.marlin: routing and grouped GEMMs on this GPU, no host sync
        return False

    def shared(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.shared_name is None:
            return None
        s = getattr(self, self.shared_name)(x)
        if hasattr(self, "shared_expert_gate"):
            s = torch.sigmoid(self.shared_expert_gate(x)) * s
        return s

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.streamed is not None:
            return self._on_gpu(x.to(self.op_config.generate_device), self.streamed)
        kernel = self.cpu_kernel()
        if kernel is None:
            return super().forward(x)  # DeviceOp: SparseMoE.forward on the block's device
        self._size_pool()
        x = x.to(self.op_config.generate_device)
        with torch.cuda.device(x.device):
            if torch.cuda.is_current_stream_capturing():
                y = self._captured(x, kernel)
            else:
                y = self._hybrid(x, kernel)
        return y.to(self.op_config.out_device)

    def _size_pool(self) -> None:
        if not self._pool_sized:  # first (eager) call: no job of the pool in flight
            leave_cores(self.driver_cores)
            self._pool_sized = True

    def takes_residual(self, h: torch.Tensor) -> bool:
        """Whether forward_residual runs this block hybrid on h's device (else the caller norms and calls it)."""
        cfg = self.op_config
        return (self.cpu_kernel() is not None and same_device(cfg.generate_device, h.device)
                and same_device(cfg.out_device, h.device) and h.is_cuda)

    def forward_residual(self, h: torch.Tensor, a: torch.Tensor, norm_weight: torch.Tensor, eps: float
                         ) -> tuple[torch.Tensor, torch.Tensor | Unstaged]:
        """(s, y): the decoder layer's residual s = h + a and this block's output y on rms_norm(s) (norm_weight,
        eps), left Unstaged. The add, the norm and the router (+ its hand-off) are one launch where the router
        fuses (tandem.gpu.staging.route_entry), else the add and norm are one (tandem.gpu.fused.add_rms_norm)."""
        kernel = self.cpu_kernel()
        self._size_pool()
        with torch.cuda.device(h.device):
            capturing = torch.cuda.is_current_stream_capturing()
            x, s, staged = self._enter(h, a, norm_weight, eps, for_graph=capturing)
            run = self._captured if capturing else self._hybrid
            return s, run(x, kernel, staged, defer=True)

    def _enter(self, h: torch.Tensor, a: torch.Tensor, norm_weight: torch.Tensor, eps: float, for_graph: bool):
        """(x, s, (staging, hot experts' local ids, weights)) of forward_residual."""
        from tandem.gpu import fused, staging

        router = self._fused_router(h) if staging.ENTRY else None
        if router is not None and torch.promote_types(h.dtype, norm_weight.dtype) == self.gate.weight.dtype:
            k = top_k_of(self.gate)
            st = self.pool.get(h.shape[0], h.shape[1], k, kernel_dtype(h.dtype), for_graph)
            gate = self.gate
            got = staging.route_entry(
                h, a, norm_weight, eps, gate.weight, k, st.x, st.ids, st.weights,
                renormalize=gate.norm_topk_prob if router == "topk" else gate.a.norm_topk_prob and k > 1,
                grouping=grouping_of(gate) if router == "deepseek" else None)
            if got is not None:
                return got[0], got[1], (st, None, None)
        x, s = fused.add_rms_norm(h, a, norm_weight, eps)
        return x, s, self._route_and_stage(x, for_graph)

    def _on_gpu(self, x: torch.Tensor, experts) -> torch.Tensor:
        ids, w = self.gate(x)
        y = self._dense_prefill(x, ids, w, experts)
        if y is None:
            y = experts.forward(x, ids, w)
        s = self.shared(x)
        return (y if s is None else y + s).to(self.op_config.out_device)

    def _dense_prefill(self, x, ids, w, experts) -> torch.Tensor | None:
        """A long layer-wise prefill: the streamed experts dequantized once, dense GEMMs (None: below the
        threshold, tandem.gpu.prefill_gemm.dense_threshold, or no workspace / block weights given)."""
        from tandem.gpu import prefill_gemm

        if self.workspace is None or not hasattr(experts, "w13"):
            return None
        limit = prefill_gemm.dense_threshold(x.dtype, x.device)
        if limit <= 0 or x.shape[0] < limit:
            return None
        return prefill_gemm.dense_experts(x, ids.to(x.device), w.to(x.device), experts.w13, experts.w2,
                                          experts.act, self.workspace)

    def _route(self, x: torch.Tensor):
        """Router on the GPU; the ids the CPU kernel gets (hot ones masked) and the hot experts' own."""
        ids, w = self.gate(x)
        hot = getattr(self.experts, "hot", None)
        if hot is None:
            return ids, w, None
        main, local = hot.split(ids)
        return main, w, local

    def _hot(self, x: torch.Tensor, local: torch.Tensor | None, w: torch.Tensor) -> torch.Tensor | None:
        """The hot experts on the GPU, with the Triton grouped GEMM (capturable; no per-expert Python loop)."""
        if local is None:
            return None
        if self._hot_gpu is None:
            from tandem.ops.experts_gpu import GpuExperts

            b = self.experts.hot.backend  # TorchExperts holding the hot experts' float weights on the GPU
            fmt = str(b.gate.dtype).removeprefix("torch.")
            self._hot_gpu = GpuExperts.from_weights(b.gate, b.up, b.down, b.act, x.device, weight_format=fmt)
        return self._hot_gpu.forward(x, local, w)

    def _fused_router(self, x: torch.Tensor) -> str | None:
        """Which router runs inside the staging kernel: "topk" (TopKRouter), "deepseek" (MoEGate), or None (the
        gate's own forward, then the staging kernel). Only a gate as it is or only placed, on x's device, and no
        hot experts (they need the ids on the GPU)."""
        from tandem.gpu import staging

        gate = self.gate
        if not staging.ENABLED or getattr(self.experts, "hot", None) is not None or gate.weight.device != x.device:
            return None
        if isinstance(gate, TopKRouter) and type(gate).forward in (TopKRouter.forward, DeviceOp.forward):
            return "topk" if gate.weight.shape[0] <= staging.MAX_EXPERTS else None
        if isinstance(gate, MoEGate) and type(gate).forward in (MoEGate.forward, DeviceOp.forward):
            supported = staging.grouped_router_supported(gate.a.n_routed_experts, grouping_of(gate).n_group)
            return "deepseek" if supported else None
        return None

    def _route_and_stage(self, x: torch.Tensor, for_graph: bool):
        """Router, then x / ids / weights into the pinned buffers: (staging, hot experts' local ids, weights)."""
        from tandem.gpu import staging

        n = x.shape[0]
        fused = self._fused_router(x)
        if fused == "topk":
            gate = self.gate
            st = self.pool.get(n, x.shape[1], gate.top_k, kernel_dtype(x.dtype), for_graph)
            staging.route_out(x, F.linear(x, gate.weight), gate.top_k, gate.norm_topk_prob, st.x, st.ids,
                              st.weights)
            return st, None, None
        if fused == "deepseek":
            a = self.gate.a
            st = self.pool.get(n, x.shape[1], a.num_experts_per_tok, kernel_dtype(x.dtype), for_graph)
            g = grouping_of(self.gate)
            staging.route_out_grouped(
                x, fp32_logits(x, self.gate.weight), g.bias, sigmoid=g.sigmoid, n_group=g.n_group,
                topk_group=g.topk_group, top2=g.top2, top_k=a.num_experts_per_tok,
                renormalize=a.norm_topk_prob and a.num_experts_per_tok > 1, scale=g.scale, hx=st.x, hids=st.ids,
                hw=st.weights)
            return st, None, None
        ids, w, local = self._route(x)
        st = self.pool.get(n, x.shape[1], ids.shape[1], kernel_dtype(x.dtype), for_graph)
        if staging.ENABLED:
            staging.stage_out(x, ids, w, st.x, st.ids, st.weights)
        else:
            st.x[:n].copy_(x.to(st.x.dtype), non_blocking=True)
            st.ids[:n].copy_(ids, non_blocking=True)
            st.weights[:n].copy_(w.float(), non_blocking=True)
        return st, local, w

    @staticmethod
    def _unstage(st: Staging, x: torch.Tensor, *adds: torch.Tensor | None, defer: bool = False
                 ) -> torch.Tensor | Unstaged:
        """The CPU experts' output on x's device in x's dtype, plus `adds` (None skipped); `defer`: left as
        Unstaged for the next norm to read (with the staging kernels)."""
        from tandem.gpu import staging

        n = x.shape[0]
        if staging.ENABLED and defer:
            return Unstaged(st.out[:n], tuple(t for t in adds if t is not None))
        if staging.ENABLED:
            return staging.stage_in(st.out[:n], x.dtype, x.device, *adds)
        y = st.out[:n].to(x.device, non_blocking=True).to(x.dtype)
        for t in adds:
            if t is not None:
                y = y + t
        return y

    def _hybrid(self, x: torch.Tensor, kernel, staged: tuple | None = None, defer: bool = False
                ) -> torch.Tensor | Unstaged:
        n = x.shape[0]
        st, local, w = staged or self._route_and_stage(x, for_graph=False)
        if self._side is None:
            self._side = torch.cuda.Stream(x.device)  # made before any capture, used by the captured variant
        copied = torch.cuda.Event()
        copied.record()
        shared = self.shared(x)  # queued: the GPU runs it while the CPU computes the routed experts
        copied.synchronize()
        handle = kernel.submit(st.x[:n], st.ids[:n], st.weights[:n], out=st.out[:n])
        hot = self._hot(x, local, w)
        handle.sync()
        return self._unstage(st, x, hot, shared, defer=defer)

    def _captured(self, x: torch.Tensor, kernel, staged: tuple | None = None, defer: bool = False
                  ) -> torch.Tensor | Unstaged:
        n = x.shape[0]
        cur = torch.cuda.current_stream()
        st, local, w = staged or self._route_and_stage(x, for_graph=True)
        job = st.jobs.get((id(kernel), n))
        if job is None:
            job = st.jobs[id(kernel), n] = kernel.host_job(st.x[:n], st.ids[:n], st.weights[:n], st.out[:n])
        call = self._cpu_call(st, job, n)
        if not self.shared_branch:  # before the CPU experts, in stream order
            shared, hot = self.shared(x), self._hot(x, local, w)
            call(cur)
            return self._unstage(st, x, shared, hot, defer=defer)
        if self._side is None:
            self._side = torch.cuda.Stream(x.device)
        self._side.wait_stream(cur)
        with torch.cuda.stream(self._side):  # a parallel branch of the graph, next to the host node
            self._predict_next(x, st.hint[:n])
            shared = self.shared(x)
            hot = self._hot(x, local, w)
        call(cur)
        cur.wait_stream(self._side)
        return self._unstage(st, x, shared, hot, defer=defer)

    def _cpu_call(self, st: Staging, job, n: int):
        """The stream's call of the CPU experts: a doorbell (stream memory operations, tandem.gpu.doorbell) where
        the driver has them, else a host node."""
        from tandem.gpu import doorbell
        from tandem.gpu.host_func import launch_host_func

        if doorbell.ENABLED and doorbell.available():
            bell = st.bells.get((id(job), n))
            if bell is None:
                bell = st.bells[id(job), n] = doorbell.Doorbell(job)
            self._read_ahead(bell, st.hint[:n])
            return bell.ring_and_wait
        return lambda stream: launch_host_func(job.fn, job.arg, stream)

    def _next_kernel(self, device: torch.device):
        """The next block's CPU kernel if it runs hybrid with its router on `device` (what a read-ahead needs)."""
        if not self.read_ahead or not self.next_block:
            return None
        nxt = self.next_block[0]
        kernel = nxt.cpu_kernel()
        if kernel is None or not hasattr(kernel, "host_job") or nxt.gate.weight.device != device:
            return None
        return kernel if top_k_of(nxt.gate) == top_k_of(self.gate) else None  # hint: this layer's [cap, K]

    def _read_ahead(self, bell, hint: torch.Tensor) -> None:
        """After this doorbell's job the pool reads the experts `hint` names of the next block (bell keeps it)."""
        from tandem.kernels import cpu

        kernel = self._next_kernel(self.gate.weight.device)
        if kernel is not None and not hasattr(bell, "ahead"):
            cpu.doorbell_read_ahead(bell.words.data_ptr(), kernel, hint)
            bell.ahead = (kernel, hint)  # alive while the pool may read them (doorbell_remove waits for it)

    def _predict_next(self, x: torch.Tensor, hint: torch.Tensor) -> None:
        """The next block's router applied to this block's input, its top-k ids into `hint` (pinned): the residual
        stream changes little from one layer to the next, so they are mostly the ids that block will pick (the
        hit rate is in tandem.kernels.cpu.read_ahead_stats()). A guess for caching only: results never use it."""
        if self._next_kernel(x.device) is None:
            return
        gate = self.next_block[0].gate
        logits = F.linear(x, gate.weight)
        if isinstance(gate, MoEGate) and gate.a.topk_method == "noaux_tc":
            logits = logits.float().sigmoid() + gate.e_score_correction_bias.float()
        hint.copy_(logits.topk(hint.shape[1], dim=-1).indices, non_blocking=True)

    def warm_graph_buffers(self, n: int, dtype: torch.dtype) -> None:
        """Allocate the graph buffers before a capture (the engine's eager warm-up does it too)."""
        self.pool.get(n, self.gate.weight.shape[1], top_k_of(self.gate), kernel_dtype(dtype), for_graph=True)


_CLASSES: dict[type, type] = {}


def hybridize(module: nn.Module, cfg: OpConfig, ctx_state, pool: PinnedPool) -> nn.Module:
    """Put HybridMoE in front of the SparseMoE class of `module` (also one already placed by DeviceOp)."""
    base = next(c for c in type(module).__mro__ if issubclass(c, SparseMoE) and not issubclass(c, DeviceOp))
    if base not in _CLASSES:
        _CLASSES[base] = type(f"HybridMoE[{base.__name__}]", (HybridMoE, base), {})
    module.__class__ = _CLASSES[base]
    module.op_config, module.run_state, module.pool = cfg, ctx_state, pool
    return module


def build(module: SparseMoE, cfg: OpConfig, ctx: LoadContext) -> nn.Module:
    """The `moe` operator (KDeepseekV2MoE, KQwen3MoeSparseMoeBlock, ...): the block placed by its rule."""
    load_own_tensors(module, cfg.name, cfg.generate_device, ctx)
    return hybridize(module, cfg, ctx.state, PinnedPool())  # the model operator hands all blocks one pool
