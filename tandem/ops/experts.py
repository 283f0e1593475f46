"""The routed-experts operator: one layer's experts, a backend per phase, optional hot experts on another device.

Backends (registry names):
- `experts.torch` (`TorchExperts`): the reference, per expert down(act(gate x) * up x) in the model dtype.
- `experts.cpu` (`CpuExperts`): the C++ kernel of tandem.kernels.cpu. Its weights are mapped or converted once
  at load. By default it is exact: it holds the weights in the dtype the model is loaded in (bf16 -> bf16,
  fp32 -> fp32; fp16 -> fp32, which holds fp16 values exactly, bf16 would drop 3 mantissa bits), so it equals
  the reference up to float summation order. `weight_format: int8 | int4_g32 | int4_g128` (or `int4` with
  `group_size: 32 | 128`) quantizes at load (opt-in; the integer formats also quantize activations to int8 per
  block). `weight_format: int8_row` (one scale per output row, converted in C++ on the kernel's threads) runs
  prefill on int8 GEMMs (AMX-INT8 where the CPU has it) with activations quantized to int8 per token; its
  weights live in kernel memory and have no `blocks()`, so a layer-wise GPU prefill leaves such layers on the
  CPU. From a GGUF file, experts stored in a block type the kernel runs (Q8_0, Q4_0, Q4_K, Q5_K, Q6_K, F32,
  BF16) are used as the file's blocks, never dequantized; other types are converted once at load (see
  `convert_target`), with one log line. The kernel reads a file's blocks from its mapping, as llama.cpp does
  (on several NUMA nodes it copies each node's shard there); `use_mmap: false` (llama.cpp's --no-mmap) copies
  them into the kernel's own memory on huge pages and the file's pages leave the process: measured no faster
  on the H200 host's Xeon (bench/results/cpu_moe-xeon-h200.md), slower to load. `threads` sets the kernel's
  thread pool (one per process).

A backend takes the weights once at load, either `load(weights: ExpertWeights, device, **kwargs)` or, for plain
float kernels, `from_weights(gate [E, I, D], up [E, I, D], down [E, D, I], act, device, **kwargs)`; then
`forward(x [N, D], topk_ids [N, K], topk_weights [N, K]) -> [N, D]`, and optionally `submit(x, ids, w, out=None)`
returning a handle with `wait()`. Negative ids are padding: that slot is skipped.

Contract for hybrid operators (router and shared experts on the GPU while the CPU computes the routed ones):

    handle = op.submit(x, topk_ids, topk_weights)   # x [N, D], topk_ids [N, K] int, topk_weights [N, K]; any device
    ...                                             # GPU work here overlaps the CPU experts
    y = handle.wait()                               # [N, D], x's dtype, on out_device; forward() = submit + wait
    op.submit(x, ids, w, out=buf).wait()            # or into `buf` (e.g. pinned CPU [N, D], fp32/bf16), in place

With `experts.cpu`, submit copies x, ids and weights to the CPU (a blocking copy from a GPU; none for CPU
tensors already fp32/bf16 and contiguous, which must then stay unmodified until wait) and returns while the
kernel's pool computes with the GIL released; the result is read only by wait(). Torch backends compute inside
submit. For host functions in CUDA graphs, `op.backends[phase].kernel` is the tandem.kernels.cpu.MoEExperts
(host_job / host_entry), and `op.backends[phase].blocks()` the weights as the kernel reads them. `hot_experts`
(a list of expert ids for every layer the rule places, or a mapping layer index -> ids) keeps those experts in
the model dtype on `hot_device` (default out_device), computed there by the torch backend during the same call:
routing is split by id, the main backend gets the others (hot slots as padding), and the results are summed.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tandem.gpu.blocks import q4_1_to_int4_g32
from tandem.models.layers import Experts, route
from tandem.ops.base import LoadContext, OpConfig
from tandem.ops.registry import BACKENDS, resolve

Q4_1 = 3  # ggml type id

log = logging.getLogger(__name__)

ROLES = ("gate", "up", "down")
ROW_FORMATS = ("int8_row",)  # converted by the kernel into its memory: one scale per row, no GPU layout


@dataclass
class ExpertWeights:
    """One layer's routed experts as the checkpoint holds them, handed once to each backend at load.

    `stored`: per projection the GGUF file's blocks ([E, out, in], tandem.weights.gguf.StoredExperts), when
    the file has them; `floats(device)`: stacked model-dtype tensors, read once per device and shared.
    """

    name: str  # module name, for messages
    n_experts: int
    shapes: tuple[tuple[int, int], ...]  # one expert's [out, in] per projection (gate, up, down)
    dtype: torch.dtype
    act: Callable
    stored: tuple | None
    ctx: LoadContext
    proj_names: tuple[str, str, str]  # checkpoint names of (gate, up, down) inside one expert
    home: str = "cpu"  # where float backends' weights live (the generate device; streamed to another)
    _floats: dict = field(default_factory=dict)

    def floats(self, device: str, experts: list[int] | None = None) -> tuple[torch.Tensor, ...]:
        """(gate [E, I, D], up [E, I, D], down [E, D, I]) in the model dtype on `device`; `experts`: those only."""
        key = device if experts is None else None
        if key in self._floats:
            return self._floats[key]
        ids = range(self.n_experts) if experts is None else experts
        out = []
        for proj, shape in zip(self.proj_names, self.shapes):
            w = torch.empty((len(ids), *shape), dtype=self.dtype, device=device)
            for i, e in enumerate(ids):
                w[i] = self.ctx.load(f"{self.name}.{e}.{proj}.weight", shape, device)
            out.append(w)
        if key is not None:
            self._floats[key] = tuple(out)
        return tuple(out)

    def say(self, msg: str, *args) -> None:
        """Log `msg` at INFO once per model load."""
        text = msg % args if args else msg
        if text not in self.ctx.said:
            self.ctx.said.add(text)
            log.info("%s", text)


# ---------------------------------------------------------------------------------------------- handles


class Ready:
    """A result computed at submit (torch backends)."""

    def __init__(self, out: torch.Tensor):
        self.out = out

    def wait(self) -> torch.Tensor:
        return self.out


class ExpertsHandle:
    """An ExpertsOp.submit in flight: wait() -> [N, D] in x's dtype on out_device (or the `out` it was given)."""

    def __init__(self, main, hot: torch.Tensor | None, dtype: torch.dtype, out_device: str,
                 out: torch.Tensor | None = None):
        self.main, self.hot, self.dtype, self.out_device, self.out = main, hot, dtype, out_device, out

    def wait(self) -> torch.Tensor:
        y = self.main.wait()
        if self.out is not None:
            if y is not self.out:
                self.out.copy_(y)
            if self.hot is not None:
                self.out.add_(self.hot.to(self.out.device, self.out.dtype))
            return self.out
        y = y.to(self.out_device, self.dtype)
        if self.hot is not None:
            y = y + self.hot.to(self.out_device, self.dtype)
        return y


def submit(backend, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
           out: torch.Tensor | None = None):
    """backend.submit(x, ids, w, out=...) if it has one, else its forward now."""
    if hasattr(backend, "submit"):
        return backend.submit(x, topk_ids, topk_weights, out=out)
    return Ready(backend.forward(x, topk_ids, topk_weights))


# ---------------------------------------------------------------------------------------------- backends


class TorchExperts:
    """Reference: per expert, down(act(gate x) * up x), weighted and summed, in the model dtype."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act, device: str, **kwargs):
        self.gate, self.up, self.down, self.act, self.device = gate, up, down, act, device

    @classmethod
    def from_weights(cls, gate, up, down, act, device: str, **kwargs):
        return cls(gate, up, down, act, device, **kwargs)

    def describe(self) -> str:
        return f"torch, {str(self.gate.dtype).removeprefix('torch.')} weights on {self.gate.device}"

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        x, topk_ids, topk_weights = x.to(self.device), topk_ids.to(self.device), topk_weights.to(self.device)
        n = self.gate.shape[0]
        topk_ids = topk_ids.masked_fill(topk_ids < 0, n)  # padding: an extra bucket that is skipped
        out = torch.zeros_like(x)
        for e, idx, w in route(topk_ids, topk_weights, n):
            if e >= n:
                continue
            g, u, d = (p[e].to(self.device) for p in (self.gate, self.up, self.down))  # a no-op when resident
            xe = x[idx]
            out.index_add_(0, idx, F.linear(self.act(F.linear(xe, g)) * F.linear(xe, u), d) * w.to(x.dtype))
        return out


def _kernel():
    from tandem.kernels import cpu  # the compiled extension, imported when a model uses it

    return cpu


def float_format(dtype: torch.dtype) -> str:
    """The kernel format that holds weights of `dtype` exactly."""
    if dtype == torch.bfloat16:
        return "bf16"
    if dtype in (torch.float32, torch.float16):
        return "fp32"  # fp32 holds fp16 exactly; bf16 would drop 3 of its mantissa bits
    raise ValueError(f"experts.cpu: model dtype {dtype} is not supported (float32, bfloat16 or float16)")


def requested_format(weight_format, group_size, name: str) -> str | None:
    """The kernel format a rule's weight_format / group_size ask for (None: exact, the model dtype)."""
    if weight_format is None:
        if group_size is not None:
            raise ValueError(f"{name}: group_size needs weight_format int4")
        return None
    fmt = {"float32": "fp32", "bfloat16": "bf16"}.get(str(weight_format).lower(), str(weight_format).lower())
    if fmt == "int4":
        fmt = f"int4_g{group_size or 32}"
    elif group_size is not None and fmt != f"int4_g{group_size}" and not (fmt == "int8" and group_size == 32):
        raise ValueError(f"{name}: group_size {group_size} does not fit weight_format {weight_format}")
    quantizable = ("int8", "int4_g32", "int4_g128", "int8_row", "bf16", "fp32")
    if fmt not in quantizable:
        raise ValueError(f"{name}: weight_format {weight_format!r} is not one experts.cpu converts to "
                         f"({', '.join(quantizable)}; GGUF block formats are used as a GGUF file stores them)")
    return fmt


def convert_target(stored, cols: int, dtype: torch.dtype) -> str:
    """The kernel format for experts stored in a GGUF type the kernel does not run: by bits per weight, never
    fewer than the source's, with groups of 32 like every ggml block type. Q2_K, Q3_K, IQ4_XS, IQ4_NL and Q4_1
    (2.6 to 5.0 bits) -> int4_g32 (5.0 bits: an fp16 scale and min per 32 values, Q4_1's own layout); Q5_0, Q5_1
    (5.5, 6.0) -> int8 (8.5 bits: Q8_0's layout); a row that int4_g32's 128-value blocks do not divide -> int8;
    float types (F16) -> the model dtype's format, as the non-expert weights are."""
    cpu = _kernel()
    if stored.bits_per_weight >= 16:
        return float_format(dtype)
    for fmt in ("int4_g32", "int8"):
        if _bits(fmt) >= stored.bits_per_weight and cols % cpu.BLOCKS[cpu.FORMATS[fmt]][0] == 0:
            return fmt
    return float_format(dtype)


def _bits(fmt: str) -> float:
    """Bits per weight of a kernel format."""
    cpu = _kernel()
    block, nbytes = cpu.BLOCKS[cpu.FORMATS[fmt]]
    return nbytes * 8 / block


class KernelHandle:
    """A kernel submit in flight; wait() syncs (GIL released) and returns its output in `dtype`."""

    def __init__(self, handle, dtype: torch.dtype | None):
        self.handle, self.dtype = handle, dtype

    def wait(self) -> torch.Tensor:
        y = self.handle.sync()
        return y if self.dtype is None else y.to(self.dtype)


class CpuExperts:
    """`experts.cpu`: the C++ kernel, weights mapped or converted once at load (see the module docstring)."""

    def __init__(self, kernel, dtype: torch.dtype, origin: str, buffers: tuple = ()):
        self.kernel, self.dtype, self.origin = kernel, dtype, origin
        self.buffers = buffers  # the weights as the kernel reads them, per projection (uint8, file layout)
        self.device = "cpu"

    @property
    def fmt(self) -> tuple[str, str, str]:
        """The kernel's weight format per projection (gate, up, down)."""
        return self.kernel.fmt

    def describe(self) -> str:
        f = self.fmt
        fmt = f[0] if len(set(f)) == 1 else "/".join(f)
        return f"C++ kernel, {fmt} {self.origin}, {_kernel().num_threads()} threads"

    @classmethod
    def load(cls, w: ExpertWeights, device: str, weight_format=None, group_size=None, threads=None,
             use_mmap: bool = True, **kwargs):
        if not isinstance(use_mmap, bool):
            raise ValueError(f"{w.name}: use_mmap must be true or false, got {use_mmap!r}")
        if w.act is not F.silu:
            raise ValueError(f"{w.name}: experts.cpu computes SiLU-gated experts and this model's use "
                             f"{getattr(w.act, '__name__', w.act)}; use generate_op experts.torch for it")
        cpu = _kernel()
        if threads is not None and int(threads) != cpu.num_threads():
            cpu.set_num_threads(int(threads))  # one pool per process: the last rule that sets it wins
        fmt = requested_format(weight_format, group_size, w.name)
        if fmt in ROW_FORMATS:
            return cls._from_rows(w, fmt)
        parts, origins, mapped = [], [], []
        for p, (_, cols) in enumerate(w.shapes):
            stored = w.stored[p] if w.stored is not None else None
            if stored is not None and stored.ggml_type in cpu.GGML_TYPES and (
                    fmt is None or cpu.FORMATS[fmt] == stored.ggml_type):
                parts.append((stored.ggml_type, stored.data))  # the file's blocks, as they are
                origins.append("as the GGUF file stores them")
                mapped.append(stored)
            elif stored is not None and fmt is None:
                target = convert_target(stored, cols, w.dtype)
                w.say("GGUF experts in %s are not a CPU kernel format: converted once at load to %s (%.1f bits "
                      "per weight, the file's %.2f)", stored.type_name, target, _bits(target), stored.bits_per_weight)
                parts.append((cpu.FORMATS[target], cls._convert(stored, target, w.dtype)))
                origins.append(f"converted from GGUF {stored.type_name}")
            else:
                target = fmt or float_format(w.dtype)
                parts.append((cpu.FORMATS[target], cls._from_float(w.floats("cpu")[p], target, w.name, ROLES[p])))
                origins.append("converted at load" if fmt else "weights")
        (I, D) = w.shapes[0]  # noqa: E741
        types = tuple(t for t, _ in parts)
        kernel = cpu.MoEExperts.from_gguf_blocks(*(b for _, b in parts), types, w.n_experts, I, D,
                                                 copy=not use_mmap)
        buffers = tuple(b for _, b in parts)
        if not use_mmap:
            for stored in mapped:
                stored.release()  # the kernel holds a copy: the file's pages leave this process (RSS counted once)
            if len(kernel.shards) == 1:
                buffers = tuple(kernel.memory(p) for p in ROLES)
        origin = ", ".join(dict.fromkeys(origins)) + (", mapped from the file" if use_mmap and mapped else "")
        return cls(kernel, w.dtype, origin, buffers)

    @classmethod
    def _from_rows(cls, w: ExpertWeights, fmt: str) -> CpuExperts:
        """Experts converted by the kernel into its own memory (the C++ quantizer on the pool's threads)."""
        stacks = [f if f.dtype in (torch.float32, torch.bfloat16) else f.float() for f in w.floats("cpu")]
        try:
            kernel = _kernel().MoEExperts.from_weights(*stacks, fmt)
        except ValueError as e:
            raise ValueError(f"{w.name}: weight_format {fmt} does not fit these experts: {e}") from None
        return cls(kernel, w.dtype, "converted at load")

    @property
    def blocks(self):
        """blocks() -> (format, gate [E, I, row_bytes], up [E, I, row_bytes], down [E, D, row_bytes]): uint8
        views of the weights as the kernel reads them (layouts of csrc/tandem/quants.h), for streaming them to a
        GPU. format is one name (kernels.cpu.FORMATS), or a (gate, up, down) triple when they differ. Absent
        (AttributeError) when the kernel converted the weights into its own memory (int8_row): no GPU kernel
        reads that format."""
        if not self.buffers:
            raise AttributeError(f"experts.cpu: {self.fmt[0]} weights live in kernel memory, no blocks to stream")
        return self._blocks

    def _blocks(self) -> tuple:
        k = self.kernel
        shapes = ((k.E, k.I), (k.E, k.I), (k.E, k.H))
        views = tuple(b.view(torch.uint8).reshape(*s, -1) for b, s in zip(self.buffers, shapes))
        fmt = self.fmt
        return (fmt[0] if len(set(fmt)) == 1 else fmt, *views)

    @staticmethod
    def _from_float(stack: torch.Tensor, fmt: str, name: str, role: str) -> torch.Tensor:
        """A float stack [E, out, in] in the kernel's layout: itself for fp32/bf16 (mapped, no copy), else blocks."""
        want = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(fmt)
        if want is not None:
            return stack.to(want).contiguous()
        src = stack if stack.dtype in (torch.float32, torch.bfloat16) else stack.float()
        try:
            return _kernel().quantize(src.reshape(-1, src.shape[-1]), fmt)
        except ValueError as e:
            raise ValueError(f"{name}: weight_format {fmt} does not fit the {role} projection: {e}") from None

    @staticmethod
    def _convert(stored, fmt: str, dtype: torch.dtype) -> torch.Tensor:
        """GGUF blocks of a type the kernel does not run -> `fmt`, one expert at a time (bounded scratch)."""
        cpu = _kernel()
        E, rows, cols = stored.shape
        if fmt in ("fp32", "bf16"):
            out = torch.empty(stored.shape, dtype=torch.float32 if fmt == "fp32" else torch.bfloat16)
            for e in range(E):
                out[e] = stored.expert(e, out.dtype)
            return out
        block, nbytes = cpu.BLOCKS[cpu.FORMATS[fmt]]
        out = torch.empty(E * rows, cols // block * nbytes, dtype=torch.uint8)
        relayout = fmt == "int4_g32" and stored.ggml_type == Q4_1 and cols % 128 == 0
        raw = stored.data.reshape(E, -1)
        for e in range(E):  # Q4_1 is int4_g32's own values, four blocks re-laid per block (7x faster than requantizing)
            out[e * rows : (e + 1) * rows] = (q4_1_to_int4_g32(raw[e].view(-1, 20)).view(rows, -1) if relayout
                                              else cpu.quantize(stored.expert(e), fmt))
        return out

    def submit(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
               out: torch.Tensor | None = None):
        """Start the kernel and return at once; `out` (CPU [N, D], fp32/bf16, contiguous): written in place."""
        if x.shape[0] == 0:
            return Ready(torch.zeros_like(x) if out is None else out)
        xk = x.to("cpu", torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32).contiguous()
        ids = topk_ids.to("cpu").contiguous()
        w = topk_weights.to("cpu", torch.float32).contiguous()
        direct = out is not None and out.device.type == "cpu" and out.dtype in (torch.float32, torch.bfloat16) \
            and out.is_contiguous()
        h = self.kernel.submit(xk, ids, w, out if direct else None)
        return KernelHandle(h, None if direct else x.dtype)

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        return self.submit(x, topk_ids, topk_weights).wait()


def make_backend(name: str, w: ExpertWeights, device: str, kwargs: dict):
    """Backend `name` (registry) on `device`, given the layer's weights once."""
    cls = resolve(BACKENDS[name].impl)
    if hasattr(cls, "load"):
        return cls.load(w, device, **kwargs)
    return cls.from_weights(*w.floats(w.home), w.act, device, **kwargs)


# ---------------------------------------------------------------------------------------------- hot experts


def hot_ids(spec, name: str, n_experts: int) -> list[int]:
    """The expert ids a `hot_experts` kwarg names for module `name`: a list (every layer) or layer -> list."""
    if spec is None:
        return []
    if isinstance(spec, dict):
        m = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
        layer = int(m[1]) if m else -1
        spec = spec.get(layer, spec.get(str(layer), []))
    if not isinstance(spec, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in spec):
        raise ValueError(f"{name}: hot_experts must be a list of expert ids or a mapping layer -> list of ids, "
                         f"got {spec!r}")
    bad = [i for i in spec if not 0 <= i < n_experts]
    if bad:
        raise ValueError(f"{name}: hot_experts names expert {bad[0]}, outside [0, {n_experts})")
    return sorted(set(spec))


class HotExperts:
    """Some experts kept on `device` in the model dtype and computed there by the torch reference."""

    def __init__(self, ids: list[int], w: ExpertWeights, device: str):
        self.ids, self.device = ids, device
        self.backend = TorchExperts(*w.floats(device, ids), w.act, device)
        self.local = torch.full((w.n_experts + 1,), -1, dtype=torch.long)  # expert id -> hot index; [-1] = pad
        self.local[ids] = torch.arange(len(ids))
        self._tables: dict[torch.device, torch.Tensor] = {}

    def split(self, topk_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids for the main backend, hot slots as -1; hot-local ids for this one, others as -1)."""
        dev = topk_ids.device
        if dev not in self._tables:
            self._tables[dev] = self.local.to(dev)
        local = self._tables[dev][topk_ids.long()]  # -1 indexes the pad entry
        return topk_ids.masked_fill(local >= 0, -1), local

    def forward(self, x: torch.Tensor, local_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        return self.backend.forward(x, local_ids, topk_weights)


# ---------------------------------------------------------------------------------------------- the operator


def stored_experts(ctx: LoadContext, name: str, proj_names: tuple[str, str, str], n: int):
    """The GGUF blocks of experts `name` if the source is a GGUF file holding them plainly, else None."""
    blocks = getattr(ctx.source, "expert_blocks", None)
    if blocks is None:
        return None
    for prefix in dict.fromkeys([name] + [re.sub(p, r, name + ".")[:-1] for p, r in ctx.aliases]):
        found = blocks(prefix, proj_names, n)
        if found is not None:
            return found
    return None


class ExpertsOp(nn.Module):
    def __init__(self, experts: Experts, cfg: OpConfig, ctx: LoadContext):
        super().__init__()
        self.op_config, self.run_state = cfg, ctx.state
        self.num_experts = len(experts)
        names, first = experts.proj_names, experts[0]
        shapes = tuple(tuple(getattr(first, p).weight.shape) for p in names)
        stored = stored_experts(ctx, cfg.name, names, self.num_experts)
        w = ExpertWeights(cfg.name, self.num_experts, shapes, ctx.dtype, first.act, stored, ctx, names,
                          cfg.generate_device)
        kwargs = dict(cfg.kwargs)
        hot = hot_ids(kwargs.pop("hot_experts", None), cfg.name, self.num_experts)
        hot_device = kwargs.pop("hot_device", None) or cfg.out_device
        kwargs.pop("backend", None)  # KTransformers' CPU backend choice (llamafile, AMX): one kernel here
        self.backends, built = {}, {}
        for phase, name, device in (("generate", cfg.generate_op, cfg.generate_device),
                                    ("prefill", cfg.prefill_op, cfg.prefill_device)):
            if (name, device) not in built:  # both phases on one backend and device share its weights
                built[name, device] = make_backend(name, w, device, kwargs)
            self.backends[phase] = built[name, device]
        self.hot = HotExperts(hot, w, hot_device) if hot else None
        w.say("routed experts: %s", self.describe())

    def describe(self) -> str:
        c = self.op_config
        gen, pre = self.backends["generate"], self.backends["prefill"]
        text = f"{c.generate_op} on {c.generate_device} ({gen.describe()})"
        if pre is not gen:
            text += f", prefill {c.prefill_op} on {c.prefill_device} ({pre.describe()})"
        if self.hot is not None:
            text += f", {len(self.hot.ids)} hot experts on {self.hot.device}"
        return text

    def submit(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
               out: torch.Tensor | None = None) -> ExpertsHandle:
        """Start the layer's experts: x [N, D], topk_ids [N, K], topk_weights [N, K]; wait() gives [N, D] on
        out_device, or `out` (e.g. a pinned CPU [N, D] buffer in x's dtype) filled in place."""
        backend = self.backends[self.run_state.phase]
        hot = None
        if self.hot is not None:
            topk_ids, local = self.hot.split(topk_ids)
            main = submit(backend, x, topk_ids, topk_weights, out)  # the CPU kernel starts before the hot work
            hot = self.hot.forward(x, local, topk_weights)
        else:
            main = submit(backend, x, topk_ids, topk_weights, out)
        return ExpertsHandle(main, hot, x.dtype, self.op_config.out_device, out)

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        # x [N, D], topk_ids [N, K], topk_weights [N, K] -> [N, D] on out_device
        return self.submit(x, topk_ids, topk_weights).wait()

    def extra_repr(self) -> str:
        return f"{self.num_experts} experts, {self.describe()}, out {self.op_config.out_device}"


def build(module: Experts, cfg: OpConfig, ctx: LoadContext) -> nn.Module:
    return ExpertsOp(module, cfg, ctx)
