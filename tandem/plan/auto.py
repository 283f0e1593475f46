"""`tandem.load(path, rules="auto")`: plan for this machine's devices on the fly, then, once loaded, compare
what each device holds with the plan (more than 5% over is a warning with the numbers)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from tandem.plan.devices import detect_devices, format_size
from tandem.plan.planner import Plan, make_plan
from tandem.plan.source import open_source

log = logging.getLogger("tandem.plan")
TOLERANCE = 0.05


def plan_for_load(path: str | Path, dtype=None, engine_config=None) -> tuple[Plan, object]:
    """A plan for `path` on this machine, and the engine settings it was sized for.

    With an engine_config, its KV capacity, batch and prefill chunk are the workload; without, 8 sequences at
    the largest context that fits.
    """
    from tandem.engine import EngineConfig

    src = open_source(path)
    devices = detect_devices()
    if engine_config is not None:
        c = engine_config
        plan = make_plan(src, devices, context=c.kv_tokens, sequences=c.max_batch, prefill_chunk=c.prefill_chunk,
                         dtype=dtype, kv_tokens=c.kv_tokens)
        return plan, c
    seqs = EngineConfig().max_batch
    plan = make_plan(src, devices, context=None, sequences=seqs, dtype=dtype)
    w = plan.workload
    return plan, EngineConfig(max_batch=w.sequences, kv_tokens=w.pool_tokens, block_size=w.block_size,
                              prefill_chunk=w.prefill_chunk)


def held_bytes() -> dict[str, int]:
    """Bytes each device holds now: torch's allocations per GPU, the resident set of this process on the host."""
    out = {}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            out[f"cuda:{i}"] = torch.cuda.memory_allocated(i)
    try:
        with open("/proc/self/statm") as f:
            out["cpu"] = int(f.read().split()[1]) * 4096
    except OSError:
        pass
    return out


def check_allocations(plan: Plan, held: dict[str, int] | None = None) -> list[str]:
    """Warnings for devices holding more than 5% over what the plan put there (weights just after loading;
    the host also holds the process and the mapped tensor of the load)."""
    held = held if held is not None else held_bytes()
    warnings = []
    for dev, v in plan.ledger.items():
        if dev not in held:
            continue
        planned = v["weights"] + (v["overhead"] + v["buffers"] if dev == "cpu" else 0)
        if held[dev] > planned * (1 + TOLERANCE) + (64 << 20):
            msg = (f"{dev} holds {format_size(held[dev])} after loading, the plan said {format_size(planned)} "
                   f"({held[dev] / max(planned, 1) - 1:+.0%}); the memory model is off for this model, so leave "
                   "more room (--reserve) or report it")
            warnings.append(msg)
            log.warning("%s", msg)
    return warnings


def describe(plan: Plan) -> str:
    """One log line: where the plan put things."""
    gpus = [d for d, v in plan.ledger.items() if d != "cpu" and v["total"]]
    w = plan.workload
    return (f"auto placement: context {w.context} x {w.sequences}, " + ", ".join(
        f"{d} {format_size(plan.ledger[d]['total'])}" for d in [*gpus, "cpu"]))



