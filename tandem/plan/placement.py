"""Decide where every module goes, in value-per-byte order, and check that it fits.

What each byte on a GPU saves per decode step decides the order: the attention, norms, routers, shared experts,
dense MLPs, the LM head and the KV cache are read whole every step (first); a layer's routed experts are read in
part (top-k of E per token: next, whole layers, or the hottest experts first when routing statistics are given);
the token embedding is a row lookup (last). Layers go to GPUs as contiguous ranges in proportion to what each can
hold; a GPU that cannot hold one layer with its KV and its buffers is left out, with the reason. The user's
rules are constraints: what they place stays where they put it, the plan fills in around it, and a conflict is
an error that names the rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tandem.plan.devices import Device, format_size
from tandem.plan.memory import ALLOC_ROUNDING, MemoryModel, Overhead, host_overhead
from tandem.plan.perf import Estimate, Rates, touched

GLOBALS = ("model.embed_tokens", "model.norm", "lm_head")
KEYS = ("weights", "kv", "buffers", "overhead")


class PlanError(ValueError):
    """The request cannot fit, or contradicts the user's rules; the message says what would work."""


@dataclass
class Constraints:
    """What the user's rules fix: layer -> device, experts -> (device, prefill device), globals -> device."""

    layers: dict[int, tuple[str, str]] = field(default_factory=dict)  # layer -> (device, which rule)
    experts: dict[int, tuple[str, str, str]] = field(default_factory=dict)  # layer -> (generate, prefill, rule)
    globals: dict[str, tuple[str, str]] = field(default_factory=dict)
    model_rule: bool = False  # the user's rules place `model` (and its transfer_map)
    resident: dict[str, int] = field(default_factory=dict)  # linear -> weight bytes held (linear.marlin / .fp8)

    def devices(self) -> set[str]:
        return ({d for d, _ in self.layers.values()} | {d for d, _, _ in self.experts.values()}
                | {p for _, p, _ in self.experts.values()} | {d for d, _ in self.globals.values()})


@dataclass
class Assignment:
    """Where each part runs."""

    layers: list[str]  # device of each layer (attention, norms, router, shared/dense MLP, KV cache)
    experts: list[str | None]  # where each layer's routed experts compute (None: a dense layer)
    experts_prefill: list[str | None]
    hot: dict[int, list[int]] = field(default_factory=dict)  # layer -> experts kept on its GPU (rest on the CPU)
    globals: dict[str, str] = field(default_factory=dict)

    def used_devices(self) -> set[str]:
        return {*self.layers, *(e for e in self.experts if e), *(p for p in self.experts_prefill if p),
                *self.globals.values()}


@dataclass
class Options:
    gpu_prefill: bool = False  # CPU experts of a GPU layer prefill on that GPU, their weights streamed per step
    stats: dict[int, list[int]] | None = None  # layer -> routing count per expert


def paged(devices: list[Device]) -> bool:
    """The engine attends over the paged cache as a batch whenever the model has a GPU."""
    return any(d.is_gpu for d in devices)


def ledger(mm: MemoryModel, a: Assignment, devices: list[Device], ov: dict[str, Overhead]) -> dict[str, dict[str, int]]:
    """Bytes per device and kind (weights, kv, buffers, overhead), with total and capacity."""
    out = {d.name: dict.fromkeys(KEYS, 0) for d in devices}
    on_gpu = paged([d for d in devices if d.name in a.used_devices()])
    act: dict[str, list[int]] = {}
    work: dict[str, int] = {}
    stream: dict[str, int] = {}  # layer-wise prefill buffers, per device: the largest streamed layer's
    large = dict.fromkeys(out, 0)  # tensors whose allocation may round up by a block
    for info in mm.layers:
        i, dev = info.index, a.layers[info.index]
        out[dev]["weights"] += info.core
        large[dev] += info.large + 2  # its core tensors, its KV storage
        out[dev]["kv"] += mm.kv(i)
        pre, dec = mm.activation(i, on_gpu)
        act.setdefault(dev, [0, 0])
        act[dev] = [max(act[dev][0], pre), max(act[dev][1], dec)]
        if info.n_experts:
            out[a.experts[i]]["weights"] += info.experts_cpu if a.experts[i] == "cpu" else info.experts
            large[a.experts[i]] += 3  # stacked gate, up, down
            for d in {a.experts[i], a.experts_prefill[i]}:
                work[d] = max(work.get(d, 0), mm.experts_workspace(i))
            if a.experts_prefill[i] != a.experts[i]:  # layer-wise prefill (tandem/gpu/transfer.py)
                d = a.experts_prefill[i]
                stream[d] = max(stream.get(d, 0), mm.stream_bytes(i))
                if a.experts[i] == "cpu" and info.experts_cpu != info.experts:  # the torch prefill's float copy
                    out["cpu"]["weights"] += info.experts
            if a.hot.get(i):
                out[dev]["weights"] += len(a.hot[i]) * mm.expert_bytes(i)
                large[dev] += 3
                work[dev] = max(work.get(dev, 0), mm.experts_workspace(i))
            if a.experts[i] == "cpu" and dev != "cpu":
                out["cpu"]["buffers"] += mm.pinned_bytes()
    for name, dev in a.globals.items():
        out[dev]["weights"] += mm.globals[name]
        large[dev] += 1
    layer_gpus = {d for d in a.layers if d != "cpu"}
    for d in devices:
        led = out[d.name]
        pre, dec = act.get(d.name, (0, 0))
        graphs = d.is_gpu and len(layer_gpus) == 1 and d.name in layer_gpus  # decode graphs keep a pool
        led["buffers"] += (pre + dec if graphs else max(pre, dec)) + work.get(d.name, 0) + stream.get(d.name, 0)
        if d.name in act and on_gpu:
            led["buffers"] += mm.metadata_bytes()
        if a.globals.get("lm_head") == d.name:
            led["buffers"] += mm.logits_bytes()
        if d.is_gpu and d.name in a.used_devices():
            led["overhead"] = ov[d.name].bytes
            led["buffers"] += ov[d.name].workspace + large[d.name] * ALLOC_ROUNDING
        elif not d.is_gpu:
            led["overhead"] = host_overhead()
            led["buffers"] += mm.src.largest_tensor()  # the tensor being copied during the load, mapped
        led["total"] = sum(led[k] for k in KEYS)
        led["capacity"] = d.capacity
    return out


def overflow(led: dict[str, dict[str, int]]) -> list[str]:
    return [d for d, v in led.items() if v["total"] > v["capacity"]]


@dataclass
class Placed:
    assignment: Assignment
    ledger: dict[str, dict[str, int]]
    excluded: list[tuple[str, str]]  # (device, why)
    estimate: Estimate
    gpus: list[str]  # GPUs the candidate was allowed to use

    @property
    def fits(self) -> bool:
        return not overflow(self.ledger)

    @property
    def all_layers_on_gpu(self) -> bool:
        return all(d != "cpu" for d in self.assignment.layers)


class _Filler:
    """Greedy filling of one candidate: which GPUs, whether CPU experts prefill on the GPU."""

    def __init__(self, mm: MemoryModel, devices: list[Device], gpus: list[Device], cons: Constraints, opt: Options,
                 ov: dict[str, Overhead]):
        self.mm, self.devices, self.gpus, self.cons, self.opt, self.ov = mm, devices, gpus, cons, opt, ov
        n = len(mm.layers)
        self.a = Assignment(["cpu"] * n, [None] * n, [None] * n)
        self.used = {g.name: 0 for g in gpus}
        self.room: dict[str, int] = {}
        self.excluded: list[tuple[str, str]] = []

    def base_buffers(self, g: Device, n_gpus: int) -> int:
        """Buffers a GPU holding any layer needs, before experts: its largest layer kind's activations."""
        peaks = [self.mm.activation(i, True) for i in {li.kind: li.index for li in self.mm.layers}.values()]
        pre, dec = max(p for p, _ in peaks), max(d for _, d in peaks)
        ov = self.ov[g.name]
        return (pre + dec if n_gpus == 1 else max(pre, dec)) + self.mm.metadata_bytes() + ov.workspace + ov.bytes

    def layer_need(self, i: int) -> int:
        """A layer's core, its KV and the allocator's rounding of their tensors, on a GPU."""
        li = self.mm.layers[i]
        return li.core + self.mm.kv(i) + (li.large + 2) * ALLOC_ROUNDING

    def exclude_small(self) -> None:
        need = min(self.layer_need(li.index) for li in self.mm.layers)
        pinned = self.cons.devices()
        keep = []
        for g in self.gpus:
            base = self.base_buffers(g, len(self.gpus))
            if g.capacity - base < need and g.name not in pinned:
                self.excluded.append((g.name, f"{g.name} ({format_size(g.capacity)} usable) is too small for one "
                                      f"layer ({format_size(need)} with its KV) plus its buffers and overhead "
                                      f"({format_size(base)}); not used"))
            else:
                keep.append(g)
                self.room[g.name] = g.capacity - base
        self.gpus = keep

    def fits(self, dev: str, n: int) -> bool:
        return dev == "cpu" or self.used[dev] + n <= self.room[dev]

    def take(self, dev: str, n: int) -> None:
        if dev != "cpu":
            self.used[dev] += n

    def run(self) -> Assignment:
        mm, a, cons = self.mm, self.a, self.cons
        self.exclude_small()
        names = [g.name for g in self.gpus]
        # the user's placements first: they are not negotiable
        for i, (dev, _) in cons.layers.items():
            a.layers[i] = dev
            self.take(dev, self.layer_need(i))
        for name, (dev, _) in cons.globals.items():
            a.globals[name] = dev
            self.take(dev, mm.globals[name] + ALLOC_ROUNDING)
        # the LM head (and the final norm) on the roomiest GPU: read whole every step
        for name in ("lm_head", "model.norm"):
            if name not in a.globals:
                best = max(names, key=lambda d: self.room[d] - self.used[d], default="cpu")
                extra = mm.globals[name] + ALLOC_ROUNDING + (mm.logits_bytes() if name == "lm_head" else 0)
                a.globals[name] = best if best != "cpu" and self.fits(best, extra) else "cpu"
                self.take(a.globals[name], extra)
        self.place_layers(names)
        self.place_experts()
        if "model.embed_tokens" not in a.globals:  # a row lookup: the last thing worth a GPU's memory
            first = a.layers[0]
            a.globals["model.embed_tokens"] = first if first != "cpu" and self.fits(
                first, mm.globals["model.embed_tokens"] + ALLOC_ROUNDING) else "cpu"
        return a

    def place_layers(self, names: list[str]) -> None:
        mm, a = self.mm, self.a
        free = [li.index for li in mm.layers if li.index not in self.cons.layers]
        need = {i: self.layer_need(i) for i in free}
        total = sum(need.values())
        left = {d: self.room[d] - self.used[d] for d in names}
        pool = sum(max(v, 0) for v in left.values())
        quota = {d: (max(left[d], 0) / pool * total if pool and total <= pool else left[d]) for d in names}
        k, got = 0, dict.fromkeys(names, 0)
        for i in free:
            while k < len(names) and (got[names[k]] + need[i] / 2 > quota[names[k]]
                                      or not self.fits(names[k], need[i])):
                k += 1
            if k == len(names):  # the GPUs are full: the remaining layers run on the CPU
                spare = [d for d in names if self.fits(d, need[i])]
                dev = spare[-1] if spare and total <= pool else "cpu"
            else:
                dev = names[k]
            a.layers[i] = dev
            got.setdefault(dev, 0)
            got[dev] += need[i]
            self.take(dev, need[i])

    def place_experts(self) -> None:
        mm, a, cons, opt = self.mm, self.a, self.cons, self.opt
        workspace: set[str] = set()
        for info in mm.layers:
            i = info.index
            if not info.n_experts:
                continue
            if i in cons.experts:
                gen, pre, _ = cons.experts[i]
                a.experts[i], a.experts_prefill[i] = gen, pre
                self.take(gen, info.experts_cpu if gen == "cpu" else info.experts + 3 * ALLOC_ROUNDING)
                continue
            a.experts[i] = "cpu"
            gpu = a.layers[i] if a.layers[i] != "cpu" else None
            a.experts_prefill[i] = gpu if opt.gpu_prefill and gpu else "cpu"
            if a.experts_prefill[i] != "cpu" and a.experts_prefill[i] not in workspace:
                ws = mm.experts_workspace(i) + mm.stream_bytes(i)
                if self.fits(gpu, ws):
                    self.take(gpu, ws)
                    workspace.add(gpu)
                else:
                    a.experts_prefill[i] = "cpu"
        order = [li for li in mm.layers
                 if li.n_experts and li.index not in cons.experts and a.layers[li.index] != "cpu"]
        if opt.stats:
            self.place_hot(order, workspace)
            return
        for info in order:  # whole layers: every layer's experts are worth the same per byte
            i, dev = info.index, a.layers[info.index]
            ws = (0 if dev in workspace else mm.experts_workspace(i)) + 3 * ALLOC_ROUNDING
            if self.fits(dev, info.experts + ws):
                self.take(dev, info.experts + ws)
                workspace.add(dev)
                a.experts[i] = a.experts_prefill[i] = dev

    def place_hot(self, order, workspace: set[str]) -> None:
        mm, a = self.mm, self.a
        cands = []
        for info in order:
            counts = (self.opt.stats or {}).get(info.index) or [0] * info.n_experts
            for e, c in enumerate(counts[: info.n_experts]):
                cands.append((-c, info.index, e))
        cands.sort()
        chosen: dict[int, list[int]] = {}
        for neg, i, e in cands:
            if neg == 0:
                break  # never routed to in the profile: no value on a GPU
            dev = a.layers[i]
            ws = (0 if dev in workspace else mm.experts_workspace(i)) + (0 if i in chosen else 3 * ALLOC_ROUNDING)
            if self.fits(dev, mm.expert_bytes(i) + ws):
                self.take(dev, mm.expert_bytes(i) + ws)
                workspace.add(dev)
                chosen.setdefault(i, []).append(e)
        for i, ids in chosen.items():
            if len(ids) == mm.layers[i].n_experts:
                a.experts[i] = a.experts_prefill[i] = a.layers[i]
            else:
                a.hot[i] = sorted(ids)


def fill(mm: MemoryModel, devices: list[Device], gpus: list[Device], cons: Constraints, opt: Options,
         rates: Rates, ov: dict[str, Overhead]) -> Placed:
    """One candidate plan on `gpus` (a subset of the devices' GPUs)."""
    f = _Filler(mm, devices, gpus, cons, opt, ov)
    a = f.run()
    led = ledger(mm, a, devices, ov)
    return Placed(a, led, f.excluded, estimate(mm, a, rates, opt.stats), [g.name for g in gpus])


def candidates(mm: MemoryModel, devices: list[Device], cons: Constraints, stats, rates: Rates,
               ov: dict[str, Overhead]) -> list[Placed]:
    """Feasible or not, every candidate: all GPUs or fewer (the smallest dropped first), experts prefilling on
    the CPU or streamed to their layer's GPU."""
    gpus = [d for d in devices if d.is_gpu]
    pinned = cons.devices()
    subsets = [gpus]
    by_size = sorted(gpus, key=lambda d: d.capacity)
    for drop in range(1, len(gpus)):
        dropped = {d.name for d in by_size[:drop]}
        if not dropped & pinned:
            subsets.append([g for g in gpus if g.name not in dropped])
    has_experts = any(li.n_experts for li in mm.layers)
    out = []
    for sub in subsets:
        for gp in ((False, True) if sub and has_experts else (False,)):
            out.append(fill(mm, devices, sub, cons, Options(gp, stats), rates, ov))
    return out


def best(cands: list[Placed], require_gpu_layers: bool = False) -> Placed | None:
    ok = [c for c in cands if c.fits and (c.all_layers_on_gpu or not require_gpu_layers)]
    return min(ok, key=lambda c: c.estimate.key(), default=None)


# ---------------------------------------------------------------------- the performance estimate


def estimate(mm: MemoryModel, a: Assignment, rates: Rates, stats: dict[int, list[int]] | None = None) -> Estimate:
    """Decode tokens/s of all sequences together and prefill tokens/s of one prompt, for assignment `a`."""
    w, b = mm.w, mm.w.sequences
    bw = {"cpu": rates.ram_bw}
    decode = prefill = 0.0
    chunk = min(w.prefill_chunk, w.context)
    avg_ctx = w.context / 2
    for info in mm.layers:
        i, dev = info.index, a.layers[info.index]
        rate = rates.ram_bw if dev == "cpu" else rates.gpu_bw
        flops = rates.cpu_flops if dev == "cpu" else rates.gpu_flops
        decode += (info.core + b * avg_ctx * info.kv_token) / rate
        prefill += 2 * info.core / w.dtype.itemsize * chunk / flops
        if i > 0 and a.layers[i - 1] != dev:
            decode += rates.hop_s
            prefill += rates.hop_s
        if not info.n_experts:
            continue
        e_dev = a.experts[i]
        frac = info.top_k / info.n_experts
        hot = a.hot.get(i, [])
        if hot and stats and stats.get(i):
            counts = stats[i]
            frac_cold = frac * (1 - sum(counts[e] for e in hot) / max(sum(counts), 1))
            cold_bytes = info.experts - len(hot) * mm.expert_bytes(i)
            decode += cold_bytes * touched(frac_cold * info.n_experts / max(info.n_experts - len(hot), 1), b) / \
                rates.ram_bw + len(hot) * mm.expert_bytes(i) * touched(frac, b) / rates.gpu_bw
        else:
            held = info.experts_cpu if e_dev == "cpu" else info.experts
            decode += held * touched(frac, b) / bw.get(e_dev, rates.gpu_bw)
        if e_dev != dev:
            decode += 2 * rates.hop_s + 2 * b * mm.hidden * w.dtype.itemsize / rates.pcie_bw
        active = info.experts * frac / w.dtype.itemsize  # parameters each token runs through
        if a.experts_prefill[i] == "cpu":
            prefill += 2 * active * chunk / rates.cpu_flops
        elif a.experts_prefill[i] != e_dev:  # streamed over PCIe for the step, computed on the GPU
            prefill += info.experts * touched(frac, chunk) / rates.pcie_bw + 2 * active * chunk / rates.gpu_flops
        else:
            prefill += 2 * active * chunk / rates.gpu_flops
    for name, dev in a.globals.items():
        if name == "lm_head":
            decode += mm.globals[name] / bw.get(dev, rates.gpu_bw)
    return Estimate(b / decode if decode else 0.0, chunk / prefill if prefill else 0.0)
