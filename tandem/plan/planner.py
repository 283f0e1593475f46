"""`make_plan`: model + devices + workload (+ the user's rules, routing statistics) -> a Plan that fits, or a
one-line error saying what would (less context, fewer sequences, more RAM, a smaller format)."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tandem.plan.devices import Device, format_size
from tandem.plan.memory import MemoryModel, Overhead, Workload, gpu_overhead
from tandem.plan.perf import Estimate, Rates, cached_rates
from tandem.plan.placement import GLOBALS, Assignment, Constraints, Options, Placed, PlanError, best, candidates, fill
from tandem.plan.render import rules_yaml
from tandem.plan.source import ModelSource

LAYER = re.compile(r"^model\.layers\.(\d+)(?:\.|$)")
CONTEXT_STEP = 256  # the context search's resolution
CHUNKS = (2048, 1024, 512, 256)  # prefill chunks tried, largest first, when none is given
FOUR_BIT = 4.5  # bits per weight of a 4-bit format with its scales (Q4_K, int4 with group scales)


@dataclass
class Plan:
    """A placement that fits: where everything goes, the bytes per device, the rule file that says so."""

    source: ModelSource
    workload: Workload
    devices: list[Device]
    assignment: Assignment
    ledger: dict[str, dict[str, int]]
    excluded: list[tuple[str, str]]
    estimate: Estimate
    rates: Rates
    rules: str  # YAML: the user's rules first, then the plan's
    notes: list[str] = field(default_factory=list)

    def ruleset(self):
        from tandem.rules import parse_rules

        return parse_rules(self.rules, "tandem plan")

    def engine_config(self, **overrides):
        """The engine settings the plan was sized for (cache capacity, batch, prefill chunk)."""
        from tandem.engine import EngineConfig

        w = self.workload
        return EngineConfig(max_batch=w.sequences, kv_tokens=w.pool_tokens, block_size=w.block_size,
                            prefill_chunk=w.prefill_chunk, **overrides)


# ---------------------------------------------------------------------- the user's rules as constraints


def _layer(name: str) -> int | None:
    m = LAYER.match(name)
    return int(m.group(1)) if m else None


def _in_experts(src: ModelSource, name: str) -> bool:
    """Whether module `name` is inside a routed-experts module (counted with the experts, not the layer's core)."""
    from tandem.models.layers import Experts

    parts = name.split(".")
    return any(isinstance(src.model.get_submodule(".".join(parts[:k])), Experts) for k in range(1, len(parts)))


def constraints(src: ModelSource, spec: str, devices: list[Device]) -> tuple[Constraints, str]:
    """What the user's rules (a file or preset) fix, and their text; contradictions are a PlanError."""
    from tandem.ops.linear import held_weight_bytes
    from tandem.ops.registry import OPS
    from tandem.rules import load_rules
    from tandem.rules import plan as rules_plan
    from tandem.rules.presets import FAMILY_PRESETS, PRESETS

    rules = load_rules(spec, src.model_type)
    path = Path(spec)
    if not path.is_file():
        name = spec if "/" in spec else f"{FAMILY_PRESETS.get(src.model_type, '')}/{spec}"
        path = PRESETS / f"{name}.yaml"
    text = path.read_text()
    names = [d.name for d in devices]
    pl = rules_plan(src.model, rules, src.model_type, names, "cpu")
    bad = [e for e in pl.errors if "is not a device here" in e or "cannot run on" in e or "no kernel" in e]
    if bad:
        raise PlanError(bad[0].replace("with --devices", "with --gpu"))
    cons = Constraints()

    def pin_layer(i: int, dev: str, why: str, what: str) -> None:
        old = cons.layers.get(i)
        if old and old[0] != dev:
            raise PlanError(f"{why}: puts {what} on {dev}, but {old[1]} puts layer {i} on {old[0]}; "
                            "a layer runs on one device (its experts may compute elsewhere)")
        cons.layers.setdefault(i, (dev, f"{why} ({what})"))

    for name, p in pl.modules.items():
        if p.rule is None:
            continue
        why = rules.rules[p.rule].where()
        if isinstance(m := src.model.get_submodule(name), nn.Linear) and not _in_experts(src, name):
            try:
                held = held_weight_bytes(m, p.generate_op, p.prefill_op, p.kwargs, name)
            except (KeyError, ValueError) as e:
                raise PlanError(f"{why}: {e}") from None
            if held is not None:
                cons.resident[name] = held
        i = _layer(name)
        if name in GLOBALS:
            cons.globals[name] = (p.generate_device, why)
        elif name == "model":
            cons.model_rule = True
            given = sorted((int(k) if not isinstance(k, str) else _end(k, len(src.model.model.layers)), d)
                           for k, d in (p.kwargs.get("transfer_map") or {}).items())
            for n, (start, dev) in enumerate(given):
                end = given[n + 1][0] if n + 1 < len(given) else len(src.model.model.layers)
                for j in range(start, end):
                    pin_layer(j, dev, why, "transfer_map")
        elif i is not None and OPS[p.op].isolated:
            cons.experts[i] = (p.generate_device, p.prefill_device, why)
            pin_layer(i, p.out_device, why, f"{name} out_device")
        elif i is not None:  # a container too: the rule layer adds its children's results on its device
            pin_layer(i, p.generate_device, why, name)
    return cons, text


def _end(k: str, n: int) -> int:
    return round(n * int(k[:-1]) / 100) if k.endswith("%") else int(k)


# ---------------------------------------------------------------------- routing statistics


def load_stats(path: str | Path, n_layers: int | None = None) -> dict[int, list[int]]:
    """layer -> routing count per expert, from `tandem profile-experts` output."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
        layers = {int(k): [int(c) for c in v] for k, v in d["layers"].items()}
    except OSError as e:
        raise OSError(f"--expert-stats {path}: cannot read ({e.strerror})") from None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(f"--expert-stats {path}: not a routing-statistics file (expected {{\"layers\": "
                         "{\"3\": [count per expert, ...]}}, as tandem profile-experts writes)") from None
    if n_layers is not None and any(i >= n_layers for i in layers):
        raise ValueError(f"--expert-stats {path}: has layer {max(layers)}, the model has {n_layers} layers "
                         "(statistics of another model?)")
    return layers


# ---------------------------------------------------------------------- planning


def _overheads(devices: list[Device]) -> tuple[dict[str, Overhead], list[str]]:
    here = torch.cuda.is_available()
    out, notes = {}, []
    for d in devices:
        if d.is_gpu:
            # a GPU of this machine is measured (once, cached); a given one is assumed to run this same stack
            out[d.name] = gpu_overhead(d.name if d.label != "given" else "cuda:0") if here else gpu_overhead(None)
    if out and not here:
        notes.append(f"GPU runtime overhead is an estimate ({format_size(next(iter(out.values())).bytes)} per GPU): "
                     "no GPU here to measure it on")
    return out, notes


def _search(fits, lo: int, hi: int) -> int | None:
    """Largest value in [lo, hi] (multiples of CONTEXT_STEP, or hi) for which fits() holds; None if none."""
    if fits(hi):
        return hi
    lo_i, hi_i, found = 1, max(hi // CONTEXT_STEP, 1), None
    while lo_i <= hi_i:
        mid = (lo_i + hi_i) // 2
        if fits(mid * CONTEXT_STEP):
            found, lo_i = mid * CONTEXT_STEP, mid + 1
        else:
            hi_i = mid - 1
    return found if found is None or found >= lo else None


def make_plan(src: ModelSource, devices: list[Device], context: int | None = None, sequences: int = 1,
              prefill_chunk: int | None = None, dtype: str | torch.dtype | None = None,
              kv_dtype: str | torch.dtype | None = None, rules: str | None = None,
              stats: dict[int, list[int]] | None = None, rates: Rates | None = None,
              kv_tokens: int | None = None) -> Plan:
    """Plan `src` onto `devices`; context None: the largest that fits (up to the model's maximum); prefill_chunk
    None: 2048, or the largest smaller chunk that keeps every layer on the GPUs when 2048 does not."""
    from tandem.llm import parse_dtype

    wdtype = parse_dtype(dtype, src.config)
    kdtype = parse_dtype(kv_dtype, src.config) if kv_dtype is not None else wdtype
    rates = rates or cached_rates()
    cons, user_text = constraints(src, rules, devices) if rules else (Constraints(), None)
    ov, notes = _overheads(devices)
    base = MemoryModel(src, Workload(context or 4096, sequences, prefill_chunk or CHUNKS[0], wdtype, kdtype,
                                     kv_tokens=kv_tokens), resident=cons.resident)
    _ = base.layers, base.globals  # computed once, shared by every workload below
    chunks = (prefill_chunk,) if prefill_chunk else CHUNKS

    def model_for(ctx: int, chunk: int) -> MemoryModel:
        mm = MemoryModel(src, dataclasses.replace(base.w, context=ctx, prefill_chunk=chunk))
        mm.__dict__.update(layers=base.layers, globals=base.globals)
        return mm

    def best_at(ctx: int, gpu_layers: bool) -> tuple[Placed | None, int]:
        """The best plan over the prefill chunks: the fastest decode, and of plans within 2% of it the largest
        chunk (smaller chunks free GPU memory for weights, larger ones prefill faster)."""
        found = [(got, chunk) for chunk in chunks if (got := best(candidates(
            model_for(ctx, chunk), devices, cons, stats, rates, ov), gpu_layers)) is not None]
        if not found:
            return None, chunks[0]
        top = max(got.estimate.decode_tok_s for got, _ in found)
        return max(((g, c) for g, c in found if g.estimate.decode_tok_s >= 0.98 * top), key=lambda gc: gc[1])

    has_gpu = any(d.is_gpu for d in devices)
    if context is None:
        top = int(src.config.get("max_position_embeddings") or 4096)
        ctx = _search(lambda c: best_at(c, has_gpu)[0] is not None, CONTEXT_STEP, top)
        if ctx is None and has_gpu:
            ctx = _search(lambda c: best_at(c, False)[0] is not None, CONTEXT_STEP, top)
        if ctx is None:
            raise PlanError(_cannot_fit(src, devices, model_for(CONTEXT_STEP, chunks[-1]), cons, stats, rates, ov))
        notes.append(f"context {ctx}: the largest that fits (none was given; the model allows {top})")
        context = ctx
    chosen, chunk = best_at(context, False)
    if chosen is None:
        raise PlanError(_cannot_fit(src, devices, model_for(context, chunks[-1]), cons, stats, rates, ov))
    if chunk != CHUNKS[0] and not prefill_chunk:
        notes.append(f"prefill chunk {chunk}: smaller chunks free GPU memory; this one decodes fastest")
    mm = model_for(context, chunk)
    full = fill_all(mm, devices, cons, stats, rates, ov)
    if kdtype != wdtype:
        notes.append(f"KV planned in {str(kdtype).removeprefix('torch.')}: tandem's engine keeps the cache in the "
                     f"weights' dtype ({str(wdtype).removeprefix('torch.')}) today")
    too_small = dict(full.excluded)
    excluded = [(g.name, too_small.get(g.name) or f"{g.name}: the performance model ranks the plans without it "
                 "faster; not used") for g in devices if g.is_gpu and g.name not in chosen.assignment.used_devices()]
    header = (f"planned by tandem plan for {src.name}: context {context} x {sequences} sequence(s), prefill chunk "
              f"{chunk}, on " + ", ".join(f"{d.name} ({format_size(d.memory)})" for d in devices))
    text = rules_yaml(chosen.assignment, header, user_text, model_rule=not cons.model_rule)
    plan = Plan(src, mm.w, devices, chosen.assignment, chosen.ledger, excluded, chosen.estimate, rates, text, notes)
    _validate(plan)
    return plan


def fill_all(mm: MemoryModel, devices: list[Device], cons: Constraints, stats, rates: Rates,
             ov: dict[str, Overhead]) -> Placed:
    """The candidate on every GPU: whose exclusions say which GPUs are too small, and why."""
    return fill(mm, devices, [d for d in devices if d.is_gpu], cons, Options(False, stats), rates, ov)


def _validate(plan: Plan) -> None:
    """The rule file must place the model exactly as planned; a clash with the user's rules is an error."""
    from tandem.rules import plan as rules_plan

    pl = rules_plan(plan.source.model, plan.ruleset(), plan.source.model_type, [d.name for d in plan.devices],
                    dtype=plan.workload.dtype)
    if pl.errors:
        raise PlanError(f"your rules conflict with the plan: {pl.errors[0]}")


def _cannot_fit(src: ModelSource, devices: list[Device], mm: MemoryModel, cons: Constraints, stats, rates: Rates,
                ov: dict[str, Overhead]) -> str:
    """One line: what overflows, and what would fit instead."""
    w = mm.w
    cands = candidates(mm, devices, cons, stats, rates, ov)
    first = min(cands, key=lambda c: sum(max(v["total"] - v["capacity"], 0) for v in c.ledger.values()))
    over = [(d, v) for d, v in first.ledger.items() if v["total"] > v["capacity"]]
    what = "; ".join(f"{d} needs {format_size(v['total'])}, has {format_size(v['capacity'])}" for d, v in over)
    pinned = [why for d, _ in over for (dev, why) in [*cons.layers.values(), *cons.globals.values()] if dev == d]
    fixes = []

    def fits_with(**change) -> bool:
        w2 = dataclasses.replace(w, **change)
        m2 = MemoryModel(src, w2)
        m2.__dict__.update(layers=mm.layers, globals=mm.globals)
        return best(candidates(m2, devices, cons, stats, rates, ov)) is not None

    ctx = _search(lambda c: fits_with(context=c), CONTEXT_STEP, w.context - 1) if w.context > CONTEXT_STEP else None
    if ctx:
        fixes.append(f"--context {ctx}")
    if w.sequences > 1:
        seqs = next((s for s in range(w.sequences - 1, 0, -1) if fits_with(sequences=s)), None)
        if seqs:
            fixes.append(f"--sequences {seqs}")
    cpu = first.ledger.get("cpu")
    ram = next(d for d in devices if not d.is_gpu)
    if cpu and cpu["total"] > cpu["capacity"]:
        fixes.append(f"--ram {format_size(cpu['total'] + ram.reserve).replace(' ', '')} (this plan's host RAM)")
        small = cpu["weights"] * FOUR_BIT / (8 * w.dtype.itemsize)
        fixes.append(f"a 4-bit format (~{format_size(cpu['total'] - cpu['weights'] + small)} of host RAM)")
    line = f"{src.name} does not fit at context {w.context} x {w.sequences} sequence(s): {what}"
    if pinned:
        line += f" (your rules put parts there: {pinned[0]})"
    return line + (f". What would fit: {' | '.join(fixes)}" if fixes else ". Nothing smaller fits either: more "
                   "memory or a smaller format")
