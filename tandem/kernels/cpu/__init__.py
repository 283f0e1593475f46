"""CPU MoE kernels (C++ extension ``_tandem_cpu``, no torch inside: tensors cross as checked raw pointers).

    from tandem.kernels.cpu import MoEExperts, available_isas, set_num_threads
    w = MoEExperts.from_weights(gate, up, down, fmt="int4_g32")      # [E, I, H], [E, I, H], [E, H, I]
    w = MoEExperts.from_gguf_blocks(g_bytes, u_bytes, d_bytes, ggml_type, E, I, H)   # blocks used as-is
    out = w.forward(x, topk_ids, topk_weights)                         # [T, H] -> [T, H]
    h = w.submit(x, topk_ids, topk_weights, out); ...; h.sync()       # async, GIL released

Shapes: T tokens, K experts per token, E experts, H hidden size, I expert intermediate size. Weight
orientation is nn.Linear's: gate/up [I, H], down [H, I] per expert; out = sum_k w_k * down(silu(gate x) * up x).
Formats: "bf16", "fp32", "int8" (= GGUF Q8_0 layout: one fp16 scale per 32), "int4_g32" / "int4_g128"
(fp16 scale and min per group), "int8_row" (int8, one fp32 scale per output row: rows of cols int8 + 8 bytes),
and the GGUF blocks "q8_0", "q4_0", "q4_k", "q5_k", "q6_k". Integer formats quantize activations to int8 per
block (32, 128 or 256 values, as the format's act block) on the decode path.
Experts that receive at least ``gemm_min_tokens()`` tokens in a call (prefill) take a GEMM path instead where
the kernel path has one (``avx512_bf16``: vdpbf16ps, ``amx``: AMX-BF16 tiles): weight rows dequantized to bf16
panels on the fly, activations and silu(g)*u rounded to bf16, fp32 accumulation (fp32 weights stay per-row).
Layers all in int8_row take an int8 GEMM instead (``amx``: AMX-INT8 tdpbssd; ``avx512_vnni``, ``avx512_bf16``:
vpdpbusd): x and silu(g)*u quantized to int8 per token (one scale over the row), int32 sums, fp32 rescale.
The kernel path is chosen from CPUID; ``TANDEM_CPU_ISA=generic|avx2|avx512|avx512_vnni|avx512_bf16|amx`` or
``set_isa`` forces one. The thread pool is persistent, one thread pinned per physical core (``set_num_threads``).
NUMA: with several nodes each expert's intermediate dimension is split over them, each node's slice in its
own memory and computed by its threads (``TANDEM_NUMA_NODES`` / ``set_numa_nodes`` override the detection).
"""

from __future__ import annotations

import atexit
import ctypes
from dataclasses import dataclass

import numpy as np
import torch

from . import _tandem_cpu as _C

__all__ = [
    "FORMATS",
    "HostJob",
    "MoEExperts",
    "available_isas",
    "all_isas",
    "current_isa",
    "dequantize",
    "gemm_min_tokens",
    "has_gemm",
    "host_entry",
    "doorbell_add",
    "doorbell_jobs_run",
    "doorbell_read_ahead",
    "doorbell_remove",
    "doorbell_stop",
    "host_trace",
    "host_trace_start",
    "num_threads",
    "numa_nodes",
    "physical_cores",
    "quantize",
    "read_ahead_stats",
    "set_read_ahead",
    "row_bytes",
    "set_gemm_min_tokens",
    "set_isa",
    "set_num_threads",
    "set_numa_nodes",
]

# Format name -> weight type id (GGUF ones are ggml's type ids).
FORMATS = {
    "fp32": 0,
    "q4_0": 2,
    "int8": 8,
    "q8_0": 8,
    "q4_k": 12,
    "q5_k": 13,
    "q6_k": 14,
    "bf16": 30,
    "int4_g32": 1001,
    "int4_g128": 1002,
    "int8_row": 1003,
}
GGML_TYPES = {0: "fp32", 2: "q4_0", 8: "q8_0", 12: "q4_k", 13: "q5_k", 14: "q6_k", 30: "bf16"}
# Block layout the C++ header declares (elements, bytes): checked against the extension at import.
BLOCKS = {0: (1, 4), 2: (32, 18), 8: (32, 34), 12: (256, 144), 13: (256, 176), 14: (256, 210), 30: (1, 2),
          1001: (128, 80), 1002: (128, 68), 1003: (64, 64)}
# Bytes after a row's blocks (int8_row: fp32 scale + int32 sum of the row's quants)
ROW_EXTRA = {1003: 8}
for _t, _bb in BLOCKS.items():
    if tuple(_C.block_info(_t)[:2]) != _bb or _C.block_info(_t)[3] != ROW_EXTRA.get(_t, 0):
        raise ImportError(f"tandem CPU extension block layout mismatch for type {_t}: {_C.block_info(_t)}")

_DT = {torch.float32: 0, torch.bfloat16: 1, torch.int32: 2, torch.int64: 3}
_PROJ = ("gate", "up", "down")


def available_isas() -> list[str]:
    """Kernel paths this CPU and build can run, slowest first (e.g. ['generic', 'avx2', 'avx512', ...])."""
    return list(_C.available_isas())


def all_isas() -> list[str]:
    """Every kernel path name tandem knows (some may be unsupported here, or not implemented yet: amx)."""
    return list(_C.all_isas())


def current_isa() -> str:
    """The kernel path in use."""
    return _C.current_isa()


def set_isa(name: str) -> None:
    """Force a kernel path (ValueError if this CPU cannot run it). Sync pending submits first."""
    _C.set_isa(name)


def set_num_threads(n: int | None = None) -> None:
    """Recreate the thread pool with n threads (None: one per physical core). Sync pending submits first."""
    _C.set_num_threads(0 if n is None else int(n))


def num_threads() -> int:
    return _C.num_threads()


def physical_cores() -> int:
    return _C.physical_cores()


def set_numa_nodes(n: int | None = None) -> None:
    """Split the thread pool into n NUMA groups (None: the nodes of its cores, from /sys). Recreates the pool;
    layers built afterwards split their experts' intermediate dimension over the groups."""
    _C.set_numa_nodes(0 if n is None else int(n))


def numa_nodes() -> int:
    return _C.numa_nodes()


def set_gemm_min_tokens(n: int) -> None:
    """Experts receiving >= n tokens in a call use the prefill GEMM path (if the kernel path has one)."""
    if int(n) < 1:
        raise ValueError("gemm_min_tokens must be >= 1")
    _C.set_gemm_min_tokens(int(n))


def gemm_min_tokens() -> int:
    return _C.gemm_min_tokens()


def has_gemm() -> bool:
    """Whether the current kernel path has the prefill GEMM (avx512_bf16, amx)."""
    return _C.has_gemm()


def host_entry() -> int:
    """Address of ``void tandem_cpu_host_entry(void*)``, a cudaHostFn_t (see MoEExperts.host_job)."""
    return _C.host_entry_address()


def doorbell_add(words: int, job: int) -> int:
    """Register a doorbell (pinned words: ring at `words`, done 64 bytes after) for the HostJob at `job`: the pool's
    thread 0 polls it while idle (csrc/tandem/doorbell.h). Both must stay alive until doorbell_remove (or
    doorbell_stop, run at exit before Python frees them)."""
    return _C.doorbell_add(int(words), int(job))


def doorbell_remove(words: int) -> None:
    """Forget the doorbell at `words`; returns once the pool can no longer read it."""
    _C.doorbell_remove(int(words))


def doorbell_stop() -> None:
    """Forget every doorbell (at exit, before Python frees them)."""
    _C.doorbell_stop()


atexit.register(doorbell_stop)


def doorbell_jobs_run() -> int:
    """Jobs run for rung doorbells."""
    return _C.doorbell_jobs_run()


def doorbell_read_ahead(words: int, experts: MoEExperts, ids: torch.Tensor) -> None:
    """After each job of the doorbell at `words`, the pool reads the weights of `experts` (the next hybrid layer's)
    that `ids` names ([rows, k] int64, pinned: a GPU writes the predicted ids while the job runs) into its caches
    until a doorbell rings (csrc/tandem/read_ahead.h). Keep `experts` and `ids` alive until doorbell_remove."""
    if ids.dim() != 2 or ids.dtype != torch.int64 or ids.device.type != "cpu" or not ids.is_contiguous():
        raise ValueError(f"doorbell_read_ahead: ids must be a contiguous int64 CPU tensor [rows, k], got "
                         f"{ids.dtype} {tuple(ids.shape)} on {ids.device}")
    _C.doorbell_read_ahead(int(words), experts._x.address, ids.data_ptr(), ids.shape[0], ids.shape[1])


def set_read_ahead(on: bool) -> None:
    """Run doorbells' read-aheads (the default) or not, without recapturing graphs (for measuring)."""
    _C.set_read_ahead(bool(on))


def read_ahead_stats() -> dict:
    """Read-ahead counters since the process started: jobs, stopped (by a ring before the end), bytes read; over
    the calls scored against the last read-ahead of their layer: distinct experts predicted, needed, hits; and
    used: bytes read ahead that the next call computed on the core that had read them."""
    keys = ("jobs", "stopped", "bytes", "predicted", "needed", "hits", "used")
    return dict(zip(keys, _C.read_ahead_stats()))


def host_trace_start(capacity: int = 4096) -> None:
    """Record the next `capacity` host-entry calls (CUDA host nodes) for host_trace(); 0 turns tracing off.
    Call it while no host node is in flight."""
    _C.host_trace_start(int(capacity))


def host_trace() -> list[tuple[int, int, int, int]]:
    """The host-entry calls recorded since host_trace_start: (start ns, end ns, cpu, tokens), start and end on
    the clock of time.perf_counter_ns (CLOCK_MONOTONIC)."""
    return [tuple(c) for c in _C.host_trace_take()]


def _fmt_id(fmt: str | int) -> int:
    if isinstance(fmt, int):
        if fmt not in BLOCKS:
            raise ValueError(f"unsupported weight type id {fmt}")
        return fmt
    try:
        return FORMATS[fmt.lower()]
    except KeyError:
        raise ValueError(f"unknown format {fmt!r}; known: {sorted(FORMATS)}") from None


def _row_bytes(t: int, cols: int) -> int:
    blck, nbytes = BLOCKS[t]
    if cols % blck:
        raise ValueError(f"{cols} values per row is not a multiple of the block size {blck}")
    return cols // blck * nbytes + ROW_EXTRA.get(t, 0)


def row_bytes(fmt: str | int, cols: int) -> int:
    """Bytes of one row of `cols` values in format fmt (its blocks, plus int8_row's per-row scale and sum)."""
    return _row_bytes(_fmt_id(fmt), cols)


def _check(t: torch.Tensor, name: str, shape: tuple, dtypes: tuple) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name}: must be on the CPU, is on {t.device}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: dtype {t.dtype} not in {dtypes}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: shape {tuple(t.shape)}, expected {tuple(shape)}")
    return t.contiguous()


def quantize(w: torch.Tensor, fmt: str | int) -> torch.Tensor:
    """Quantize a float matrix [rows, cols] (fp32/bf16) to the blocks of fmt: uint8 [rows, row_bytes]."""
    t = _fmt_id(fmt)
    if w.dim() != 2:
        raise ValueError("quantize expects a 2-D tensor")
    w = _check(w, "w", tuple(w.shape), (torch.float32, torch.bfloat16)).float().contiguous()
    rows, cols = w.shape
    out = torch.empty(rows, _row_bytes(t, cols), dtype=torch.uint8)
    _C.quantize_rows(t, w.data_ptr(), rows, cols, out.data_ptr())
    return out


def dequantize(blocks: torch.Tensor, fmt: str | int, rows: int, cols: int) -> torch.Tensor:
    """Blocks of fmt (uint8, rows * row_bytes bytes) -> fp32 [rows, cols]."""
    t = _fmt_id(fmt)
    blocks = blocks.contiguous()
    if blocks.numel() * blocks.element_size() != rows * _row_bytes(t, cols):
        raise ValueError("block buffer size does not match rows x cols")
    out = torch.empty(rows, cols, dtype=torch.float32)
    _C.dequantize_rows(t, blocks.data_ptr(), rows, cols, out.data_ptr())
    return out


def _buffer_address(buf) -> tuple[int, int, object]:
    """(address, nbytes, keep-alive object) of a torch tensor, numpy array, bytes, memoryview or mmap."""
    if isinstance(buf, torch.Tensor):
        if buf.device.type != "cpu" or not buf.is_contiguous():
            raise ValueError("block tensor must be a contiguous CPU tensor")
        return buf.data_ptr(), buf.numel() * buf.element_size(), buf
    arr = np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf
    if not arr.flags["C_CONTIGUOUS"]:
        raise ValueError("block buffer must be contiguous")
    return arr.ctypes.data, arr.nbytes, (buf, arr)


@dataclass
class Handle:
    """An in-flight ``submit``: ``sync()`` waits (GIL released) and returns the output tensor."""

    _h: object
    out: torch.Tensor
    _keep: tuple

    def sync(self) -> torch.Tensor:
        self._h.sync()
        self._keep = ()
        return self.out

    def done(self) -> bool:
        return self._h.done()


@dataclass
class HostJob:
    """A forward bound to fixed buffers, runnable from a CUDA stream: cudaLaunchHostFunc(stream, fn, arg).

    fn = the C entry point's address, arg = this job's address. Keep this object alive while the stream or a
    captured graph may call it. If n_tokens (int32 [1]) was given, the token count is read from it at each
    call, so one captured graph serves any T <= the buffers' T; ids outside [0, E) are then skipped."""

    fn: int
    arg: int
    _job: object
    _keep: tuple


class MoEExperts:
    """The routed experts of one MoE layer, in the CPU kernel's layout."""

    def __init__(self, E: int, I: int, H: int, fmt: str | int | tuple = "int4_g32",  # noqa: E741
                 numa_nodes: int | None = None):
        fmts = tuple(fmt) if isinstance(fmt, (tuple, list)) else (fmt,) * 3
        if len(fmts) != 3:
            raise ValueError("fmt: one format or a (gate, up, down) triple")
        self.types = tuple(_fmt_id(f) for f in fmts)
        self.E, self.I, self.H = int(E), int(I), int(H)
        self._x = _C.Experts(self.E, self.I, self.H, *self.types, int(numa_nodes or 0))
        self._keep: list = []  # mapped GGUF buffers

    @property
    def fmt(self) -> tuple[str, str, str]:
        names = {v: k for k, v in FORMATS.items() if k not in ("q8_0",)}
        return tuple(names[t] for t in self.types)

    def nbytes(self) -> int:
        return sum(self._x.nbytes(p) for p in range(3))

    @property
    def shards(self) -> list[tuple[int, int, int]]:
        """(i0, i1, OS node or -1) per NUMA shard: the intermediate rows each node holds and computes."""
        return [tuple(self._x.shard_range(s)) for s in range(self._x.n_shards)]

    @property
    def owns_weights(self) -> bool:
        """True when every projection lives in the kernel's own memory (copied or converted), none in a caller's
        buffer."""
        return all(self._x.shard_data(p, s)[2] for p in range(3) for s in range(self._x.n_shards))

    def memory(self, proj: str) -> torch.Tensor:
        """A uint8 view of projection `proj` (gate, up, down) in the kernel's memory, in the stacked file layout
        [E * rows * row_bytes] (one NUMA shard only: several shards each hold a slice of every expert). The view
        keeps this object alive."""
        if self._x.n_shards != 1:
            raise ValueError(f"memory({proj!r}): the weights are split over {self._x.n_shards} NUMA shards")
        addr, n, _ = self._x.shard_data(_PROJ.index(proj), 0)
        pages = (ctypes.c_uint8 * n).from_address(addr)
        pages.owner = self  # every tensor over these pages (views of views too) keeps the kernel's memory alive
        return torch.frombuffer(pages, dtype=torch.uint8)

    @classmethod
    def from_weights(cls, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                     fmt: str | int | tuple = "int4_g32", numa_nodes: int | None = None) -> MoEExperts:
        """Convert stacked float weights (fp32/bf16) gate [E,I,H], up [E,I,H], down [E,H,I] (multi-threaded)."""
        E, I, H = gate.shape  # noqa: E741
        self = cls(E, I, H, fmt, numa_nodes)
        for p, (w, shape) in enumerate(((gate, (E, I, H)), (up, (E, I, H)), (down, (E, H, I)))):
            self._set(p, w, shape, 0)
        return self

    def set_expert(self, e: int, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
        """Convert one expert's float weights (gate [I,H], up [I,H], down [H,I]) into slot e."""
        if not 0 <= e < self.E:
            raise IndexError(f"expert {e} out of range [0, {self.E})")
        I, H = self.I, self.H  # noqa: E741
        for p, (w, shape) in enumerate(((gate, (I, H)), (up, (I, H)), (down, (H, I)))):
            self._set(p, w, shape, e)

    def _set(self, p: int, w: torch.Tensor, shape: tuple, e: int) -> None:
        w = _check(w, _PROJ[p], shape, (torch.float32, torch.bfloat16))
        rows = shape[-2] * (shape[0] if len(shape) == 3 else 1)
        self._x.quantize_from(p, w.data_ptr(), _DT[w.dtype], e * shape[-2], rows)

    @classmethod
    def from_gguf_blocks(cls, gate, up, down, ggml_type: int | tuple, E: int, I: int, H: int,  # noqa: E741
                         numa_nodes: int | None = None, copy: bool = False) -> MoEExperts:
        """Use GGUF block bytes as they are (zero copy on one NUMA node; the buffers are kept alive by this
        object; with several nodes, or copy=True, each node's slice is copied into kernel-owned memory on that
        node, with huge pages asked for).

        gate/up/down: bytes of the stacked [E, I, H] / [E, I, H] / [E, H, I] tensors in a GGUF file (torch
        uint8 tensor, numpy array, memoryview, mmap...). ggml_type: one ggml type id (Q4_0 2, Q8_0 8, Q4_K 12,
        Q5_K 13, Q6_K 14, BF16 30, F32 0) or a (gate, up, down) triple."""
        types = tuple(ggml_type) if isinstance(ggml_type, (tuple, list)) else (ggml_type,) * 3
        for t in types:
            if t not in GGML_TYPES and t not in BLOCKS:
                raise ValueError(f"ggml type {t} not supported by the CPU kernels (have {sorted(GGML_TYPES)})")
        self = cls(E, I, H, types, numa_nodes)
        for p, buf in enumerate((gate, up, down)):
            addr, nbytes, keep = _buffer_address(buf)
            self._x.map_blocks(p, addr, nbytes, copy)  # checks the size
            if not copy and self._x.n_shards == 1:
                self._keep.append(keep)
        return self

    @classmethod
    def from_blocks(cls, gate, up, down, fmt: str | int | tuple, E: int, I: int, H: int,  # noqa: E741
                    numa_nodes: int | None = None, copy: bool = False) -> MoEExperts:
        """Like from_gguf_blocks, for any format name (e.g. int4_g32 blocks saved from ``block_bytes``)."""
        fmts = tuple(fmt) if isinstance(fmt, (tuple, list)) else (fmt,) * 3
        return cls.from_gguf_blocks(gate, up, down, tuple(_fmt_id(f) for f in fmts), E, I, H, numa_nodes, copy)

    def dequantize(self, proj: str, e: int) -> torch.Tensor:
        """Expert e's weight as the kernel holds it, in fp32: gate/up [I, H], down [H, I]."""
        p = _PROJ.index(proj)
        shape = (self.I, self.H) if p < 2 else (self.H, self.I)
        out = torch.empty(shape, dtype=torch.float32)
        self._x.dequantize(p, int(e), out.data_ptr())
        return out

    def _args(self, x, topk_ids, topk_weights, out):
        if x.dim() != 2:
            raise ValueError(f"x: expected [T, {self.H}], got {tuple(x.shape)}")
        T = x.shape[0]
        x = _check(x, "x", (T, self.H), (torch.float32, torch.bfloat16))
        if topk_ids.dim() != 2 or topk_ids.shape[0] != T:
            raise ValueError(f"topk_ids: expected [{T}, K], got {tuple(topk_ids.shape)}")
        K = topk_ids.shape[1]
        ids = _check(topk_ids, "topk_ids", (T, K), (torch.int32, torch.int64))
        w = _check(topk_weights, "topk_weights", (T, K), (torch.float32, torch.bfloat16)).float().contiguous()
        if out is None:
            out = torch.empty(T, self.H, dtype=x.dtype)
        else:
            _check(out, "out", (T, self.H), (torch.float32, torch.bfloat16))
            if not out.is_contiguous():
                raise ValueError("out must be contiguous")
        args = (x.data_ptr(), _DT[x.dtype], T, ids.data_ptr(), _DT[ids.dtype], K, w.data_ptr(),
                out.data_ptr(), _DT[out.dtype])
        return args, out, (x, ids, w, out)

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """out[t] = sum_k topk_weights[t,k] * expert_{topk_ids[t,k]}(x[t]); x [T,H] fp32/bf16 -> [T,H] (x's dtype
        unless out is given). Negative ids are padding (skipped); an id >= E raises IndexError."""
        args, out, _keep = self._args(x, topk_ids, topk_weights, out)
        self._x.forward(*args)
        return out

    __call__ = forward

    def submit(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
               out: torch.Tensor | None = None) -> Handle:
        """Start forward and return at once; ``handle.sync()`` waits and returns out. Do not modify the
        inputs or read out before sync."""
        args, out, keep = self._args(x, topk_ids, topk_weights, out)
        return Handle(self._x.submit(*args), out, keep)

    def host_job(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, out: torch.Tensor,
                 n_tokens: torch.Tensor | None = None) -> HostJob:
        """Bind a forward to fixed (pinned) CPU buffers for cudaLaunchHostFunc; see HostJob."""
        if topk_weights.dtype != torch.float32 or not topk_weights.is_contiguous():
            raise TypeError("host_job: topk_weights must be a contiguous float32 tensor (it is read at call time)")
        for name, t in (("x", x), ("topk_ids", topk_ids), ("out", out)):
            if not t.is_contiguous():
                raise ValueError(f"host_job: {name} must be contiguous (it is read at call time)")
        args, out, keep = self._args(x, topk_ids, topk_weights, out)
        nt = 0
        if n_tokens is not None:
            _check(n_tokens, "n_tokens", (1,), (torch.int32,))
            nt = n_tokens.data_ptr()
        job = self._x.host_job(*args, nt)
        return HostJob(host_entry(), job.address, job, (*keep, n_tokens, self))

    @property
    def host_entry(self) -> int:
        """Address of the C host function (cudaHostFn_t); its argument is a HostJob's ``arg``."""
        return host_entry()
