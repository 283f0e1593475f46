"""What the GPU does between the CPU experts in one graphed decode step: its kernels and copies in order, with
their durations and the idle gaps between them, per layer, under A/B switches of the engine.

    python bench/decode_timeline.py [--model qwen3-30b-a3b:4] [--dir /tmp/tandem-e2e] [--variants base,memcpy]
                                    [--gguf Q4_1] [--all-ops] [--json]

The model is synthesized as bench/e2e.py does (routed experts on the CPU in int4_g32, the rest on the GPU). The
torch profiler records 4 decode steps (CUDA graphs replayed); the GPU activity of the last step is split into
segments at idle gaps longer than --gap-us (the host nodes: the CPU experts' time), so segment i is the GPU work
between layer i-1's experts and layer i's. Each variant runs in its own process with its environment:

    base     the defaults
    memcpy   TANDEM_STAGING_KERNELS=0 (the hand-off as memcpys and torch's router kernels)
    unfused  TANDEM_FUSED=0 (torch's RMSNorm / RoPE kernels)
    layer0   TANDEM_FUSED_RESIDUAL=0 TANDEM_ROUTE_ENTRY=0 TANDEM_FUSED_KV=0 (adds, norms, router and KV write as
             launches of their own: the path before the sixth session)
    no_entry, no_residual, no_kv: one of those three off
    no_gemv  TANDEM_JOINED_GEMV=0 (joined projections by cuBLAS at one row: MLA's q_a ‖ kv_a not by tandem.gpu.gemv)
    gemv_all TANDEM_JOINED_GEMV=all (the GEMV for every joined projection at one row: GQA's q ‖ k ‖ v too)
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = {"base": {}, "memcpy": {"TANDEM_STAGING_KERNELS": "0"}, "unfused": {"TANDEM_FUSED": "0"},
            "layer0": {"TANDEM_FUSED_RESIDUAL": "0", "TANDEM_ROUTE_ENTRY": "0", "TANDEM_FUSED_KV": "0"},
            "no_entry": {"TANDEM_ROUTE_ENTRY": "0"}, "no_residual": {"TANDEM_FUSED_RESIDUAL": "0"},
            "no_kv": {"TANDEM_FUSED_KV": "0"}, "no_gemv": {"TANDEM_JOINED_GEMV": "0"},
            "gemv_all": {"TANDEM_JOINED_GEMV": "all"}}


def gpu_events(trace: Path) -> list[dict]:
    """The GPU activity of a Chrome trace (kernels, memcpys, memsets), ordered by start."""
    opener = gzip.open if trace.suffix == ".gz" else open
    with opener(trace, "rt") as f:
        events = json.load(f)["traceEvents"]
    gpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    return sorted(gpu, key=lambda e: e["ts"])


def short(name: str) -> str:
    for cut in ("<", "("):
        name = name.split(cut)[0]
    return name.removeprefix("void ").split("::")[-1][:48]


def segments(events: list[dict], gap_us: float) -> list[list[dict]]:
    """Events split where the GPU idles longer than gap_us; each event gets its gap before it ("gap")."""
    out: list[list[dict]] = []
    end = None
    for e in events:
        gap = 0.0 if end is None else e["ts"] - end
        if end is None or gap > gap_us:
            out.append([])  # its first event carries the idle time before it (the host node's) as "idle"
        out[-1].append({"name": short(e["name"]), "cat": e["cat"], "dur": e["dur"], "gap": gap if out[-1] else 0.0,
                        "idle": gap if not out[-1] else 0.0})
        end = max(end or 0, e["ts"] + e["dur"])
    return out


def summarize(segs: list[list[dict]]) -> dict:
    rows = [{"ops": len(s), "kernels": sum(e["cat"] == "kernel" for e in s),
             "copies": sum(e["cat"] != "kernel" for e in s), "busy_us": round(sum(e["dur"] for e in s), 1),
             "gaps_us": round(sum(e["gap"] for e in s), 1), "idle_before_us": round(s[0]["idle"], 1)} for s in segs]
    inner = segs[1:-1] or segs  # between two layers' experts: the repeating unit
    # the last of the longest: layer 0's segment has no previous layer's output to add
    return {"segments": rows, "middle": max(reversed(inner), key=len) if inner else [], "all": segs}


def child(spec: str, root: Path, gap_us: float, gguf: str | None = None) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    sys.path.insert(0, str(Path(__file__).parent))
    from e2e import GGUF_LINEARS, rules_file  # the same model and placement as bench/e2e.py

    import tandem
    from tandem.engine import SamplingParams, Sequence
    from tandem.rules.presets import FAMILY_PRESETS
    from tandem.synth import PRESETS, synthesize

    preset, layers = spec.split(":")
    if gguf:  # as e2e --gguf: the file's own blocks on the CPU kernel, the family's 1gpu preset
        from tandem.synth_gguf import synthesize_gguf

        out = root / f"{preset}-{layers}-{gguf}.gguf"
        if not out.exists():
            synthesize_gguf(preset, out, int(layers), quant=gguf, progress=False)
        rules = "1gpu" if gguf not in GGUF_LINEARS else str(rules_file(
            FAMILY_PRESETS[PRESETS[preset]["model_type"]], root / f"{preset}-{gguf}-timeline.yaml", None, "cpu",
            GGUF_LINEARS[gguf]))
    else:
        out = root / f"{preset}-{layers}"
        if not (out / "config.json").exists():
            synthesize(preset, out, int(layers), progress=False)
        rules = str(rules_file(FAMILY_PRESETS[PRESETS[preset]["model_type"]], root / f"{preset}-timeline.yaml"))
    llm = tandem.load(out, rules=rules, dtype="bfloat16", progress=False)
    engine = llm.engine
    engine.add(Sequence(list(range(10, 26)), SamplingParams(max_new_tokens=16, ignore_eos=True)))
    with torch.inference_mode():
        for _ in range(6):
            engine.step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(4):
                engine.step()
            torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = gpu_events(path)
    segs = segments(events, gap_us)
    n_layers = int(layers)
    step = segs[-(n_layers + 3):]  # the last step: before layer 0's experts, between layers, the LM head, sampling
    return {"model": spec, "graphs": engine.graphs is not None and engine.graphs.replays, **summarize(step)}


def table(name: str, r: dict, every: bool = False) -> str:
    lines = [f"### {name} ({r['model']}, graph replays {r['graphs']})", "",
             "| segment | idle before (host node) us | ops | kernels | copies | GPU busy us | gaps inside us |",
             "|---|---|---|---|---|---|---|"]
    for i, s in enumerate(r["segments"]):
        lines.append(f"| {i} | {s['idle_before_us']} | {s['ops']} | {s['kernels']} | {s['copies']} | {s['busy_us']} | "
                     f"{s['gaps_us']} |")
    lines += ["", "middle segment, in order (us):", "", "| op | dur | gap before |", "|---|---|---|"]
    lines += [f"| {e['name']} | {e['dur']:.1f} | {e['gap']:.1f} |" for e in r["middle"]]
    for i, seg in enumerate(r["all"] if every else []):
        lines += ["", f"segment {i}: " + ", ".join(f"{e['name']} {e['dur']:.1f}" for e in seg)]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3-30b-a3b:4")
    ap.add_argument("--dir", default="/tmp/tandem-e2e")
    ap.add_argument("--variants", default="base,memcpy")
    ap.add_argument("--gap-us", type=float, default=40.0)
    ap.add_argument("--all-ops", action="store_true", help="also list every segment's ops")
    ap.add_argument("--gguf", help="synthesize a GGUF with this --quant (e.g. Q4_1) instead of safetensors")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    if args.child:
        print(json.dumps(child(args.model, root, args.gap_us, args.gguf)))
        return
    results = {}
    for v in args.variants.split(","):
        env = {**os.environ, "GOMP_SPINCOUNT": "10000", **VARIANTS[v]}
        cmd = [sys.executable, __file__, "--child", "--model", args.model, "--dir", args.dir, "--gap-us",
               str(args.gap_us)] + (["--gguf", args.gguf] if args.gguf else [])
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if p.returncode:
            print(p.stderr[-3000:], file=sys.stderr)
            results[v] = {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else "failed"}
            continue
        results[v] = json.loads(p.stdout.strip().splitlines()[-1])
        print(table(v, results[v], args.all_ops) + "\n", flush=True)
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
