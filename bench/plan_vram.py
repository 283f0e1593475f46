"""Planned vs measured GPU memory: synthesize real-shape models (fewer layers), plan them for this machine's GPU,
load them with the planned rules, run the worst step the plan allows (every sequence prefilling a full context,
then decoding), and compare the measured peak (torch.cuda.max_memory_allocated + the measured runtime overhead)
with the plan's total for the GPU: it must be <= the plan and within 10% of it.

    python bench/plan_vram.py                       # the three models below, one process each
    python bench/plan_vram.py --one qwen3-30b-a3b 8 # one model (what the driver runs)

Writes bench/results/plan-vram-<gpu>.md (and $OUT/ when set).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

MODELS = [("qwen3-30b-a3b", 8), ("deepseek-v2-lite", 8), ("deepseek-v3", 2)]
CONTEXT, SEQUENCES, CHUNK, NEW = 4096, 2, 2048, 8


def one(preset: str, layers: int, root: Path) -> dict:
    import tandem
    from tandem.engine import SamplingParams, Sequence
    from tandem.plan import detect_devices, make_plan, open_source
    from tandem.plan.memory import gpu_overhead
    from tandem.synth import synthesize

    path = root / f"{preset}-{layers}"
    t0 = time.perf_counter()
    synthesize(preset, path, layers, progress=False)
    t_synth = time.perf_counter() - t0
    plan = make_plan(open_source(path), detect_devices(), context=CONTEXT, sequences=SEQUENCES, prefill_chunk=CHUNK)
    (path / "plan.yaml").write_text(plan.rules)
    ov = gpu_overhead("cuda:0")
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    llm = tandem.load(path, rules=str(path / "plan.yaml"), engine_config=plan.engine_config(), progress=False)
    t_load = time.perf_counter() - t0
    after_load = torch.cuda.memory_allocated()
    gen = torch.Generator().manual_seed(0)
    vocab = llm.model.args.vocab_size
    seqs = [Sequence(torch.randint(0, vocab, (CONTEXT - NEW,), generator=gen).tolist(),
                     SamplingParams(max_new_tokens=NEW, ignore_eos=True)) for _ in range(SEQUENCES)]
    t0 = time.perf_counter()
    for s in seqs:
        llm.engine.add(s)
    while llm.engine.has_work():
        llm.engine.step()
    torch.cuda.synchronize()
    t_run = time.perf_counter() - t0
    free, total = torch.cuda.mem_get_info()
    led = plan.ledger["cuda:0"]
    measured = torch.cuda.max_memory_allocated() + ov.bytes
    out = {"model": f"{preset} --layers {layers}", "plan": led, "measured": measured,
           "max_allocated": torch.cuda.max_memory_allocated(), "overhead": ov.bytes, "overhead_measured": ov.measured,
           "after_load_allocated": after_load, "max_reserved": torch.cuda.max_memory_reserved(),
           "device_used_end": total - free, "ratio": measured / led["total"],
           "ok": measured <= led["total"] and measured >= 0.9 * led["total"],
           "layers_on": sorted(set(plan.assignment.layers)), "experts_on": sorted({e for e in plan.assignment.experts
                                                                                 if e}),
           "tokens": [len(s.output) for s in seqs], "s": {"synth": t_synth, "load": t_load, "run": t_run}}
    shutil.rmtree(path)
    return out


def gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def report(rows: list[dict], cmd: str) -> str:
    name = torch.cuda.get_device_name(0)
    lines = [f"# Planned vs measured GPU memory ({name})", "",
             f"Command: `{cmd}` (torch {torch.__version__}, CUDA {torch.version.cuda}). Each model: synthesized "
             f"with `tandem synth PRESET --layers N` (bf16), planned by `make_plan` for this GPU at context {CONTEXT}"
             f" x {SEQUENCES} sequences, prefill chunk {CHUNK}, loaded with the planned rules, then {SEQUENCES} "
             f"prompts of {CONTEXT - NEW} random tokens prefilled together and {NEW} tokens decoded each. measured = "
             "torch.cuda.max_memory_allocated (load included) + the runtime overhead measured at planning "
             "(total - free - reserved after a warm-up). Must be <= plan and >= 90% of it.", "",
             "| model | layers / experts on | plan weights | plan KV | plan buffers | overhead | plan total (GiB) "
             "| measured (GiB) | measured / plan | ok | max reserved | device used at end |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | error: {r['error']} |" + " |" * 10)
            continue
        p = r["plan"]
        lines.append(f"| {r['model']} | {','.join(r['layers_on'])} / {','.join(r['experts_on'])} | {gib(p['weights'])} "
                     f"| {gib(p['kv'])} | {gib(p['buffers'])} | {gib(p['overhead'])}"
                     f"{'' if r['overhead_measured'] else ' (est.)'} | {gib(p['total'])} | {gib(r['measured'])} "
                     f"| {r['ratio']:.3f} | {'yes' if r['ok'] else 'NO'} | {gib(r['max_reserved'])} "
                     f"| {gib(r['device_used_end'])} |")
    lines += ["", "Raw: " + json.dumps(rows)]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", nargs=2, metavar=("PRESET", "LAYERS"))
    ap.add_argument("--root", default="/tmp/plan_vram")
    args = ap.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), root)))
        return 0
    rows = []
    for preset, layers in MODELS:
        res = subprocess.run([sys.executable, __file__, "--one", preset, str(layers), "--root", str(root)],
                             capture_output=True, text=True)
        try:
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        except (IndexError, json.JSONDecodeError):
            err = (res.stderr.strip().splitlines() or ["no output"])[-1][:300]
            rows.append({"model": f"{preset} --layers {layers}", "error": err})
        print(json.dumps(rows[-1]), flush=True)
    text = report(rows, "python bench/plan_vram.py")
    tag = torch.cuda.get_device_name(0).split()[-1].lower()
    for d in [Path(__file__).parent / "results", Path(os.environ["OUT"]) if os.environ.get("OUT") else None]:
        if d is not None:
            d.mkdir(parents=True, exist_ok=True)
            (d / f"plan-vram-{tag}.md").write_text(text)
    print(text)
    return 0 if all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
