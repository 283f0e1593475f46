"""Where the time of one long layer-wise GPU prefill goes: wall time against its bound, and a compact summary of
the profiler's timeline (GPU busy time per stream, top kernels by category, the compute stream's idle gaps and
what the main thread was doing then, per-layer upload and compute windows), so no large trace has to be read.

    python bench/prefill_timeline.py [--model qwen3-30b-a3b:8] [--tokens 8192] [--reps 5]
                                     [--variants "before=transfer.LATE_WAIT:0,model.EARLY_START:0;after="]
                                     [--dir /tmp/tandem-e2e] [--trace-dir DIR] [--profile-new-length] [--json]

The model is bench/e2e.py's (tandem synth, routed experts on the CPU in int4_g32, the rest on one GPU); the bound
is e2e's: max(routed-expert bytes / host-to-device bandwidth, FLOPs / GPU bf16 matmul rate), measured here.
Each variant sets module attributes of tandem.gpu.* / tandem.ops.* (module.ATTR:value, ints), runs two warm
prefills, then `--reps` timed ones (median) and one profiled one, and restores the attributes. Each variant also
times one prefill at a length not seen before (n - 1 - variant index), as bench/e2e.py's timed run is (it follows
one at n + 1): cuDNN builds its attention plans for a new length inside it.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import gzip
import importlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # as bench/e2e.py: before torch loads

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import e2e  # noqa: E402  (bench/e2e.py: the model, its rules and its bound)

CATEGORIES = [  # (category, substrings of a GPU op's name), first match wins
    ("upload H2D", ("Memcpy HtoD",)),
    ("copy D2H", ("Memcpy DtoH",)),
    ("copy D2D", ("Memcpy DtoD",)),
    ("memset", ("Memset",)),
    ("dequant", ("_dequant_kernel", "_kquant_kernel")),
    ("attention", ("attention", "flash", "fmha", "cudnn", "sdpa")),
    ("grouped GEMM", ("grouped", "GroupProblemShape", "KernelTmaWarpSpecializedCooperative", "GroupedGemm")),
    ("prefill kernels", ("_gather_rows", "_combine", "_act_mul")),
    ("GEMM", ("gemm", "sm90_xmma", "cutlass", "nvjet", "matmul")),
    ("norm/rope", ("rms", "rope", "_norm")),
    ("sort/count", ("sort", "Sort", "bincount", "histogram", "cumsum", "scan", "Scan")),
    ("gather/scatter", ("index", "gather", "scatter", "Index")),
    ("copy/cast", ("copy", "Copy", "cast")),
    ("elementwise", ("elementwise", "vectorized", "reduce", "Reduce", "silu", "mul")),
]


def category(name: str) -> str:
    for cat, keys in CATEGORIES:
        if any(k in name for k in keys):
            return cat
    return "other"


def union_ms(intervals: list[tuple[float, float]]) -> float:
    busy, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            busy += b - max(a, end)
            end = b
    return busy / 1e3


def summarize(events: list[dict], label: str = "prefill") -> dict:
    """A Chrome trace's events (torch profiler) -> the summary of the `label` annotation's window."""
    spans = [e for e in events if e.get("ph") == "X" and e.get("name") == label and e.get("cat") == "user_annotation"]
    if not spans:
        raise ValueError(f"no '{label}' annotation in the trace")
    t0 = spans[0]["ts"]
    t1 = t0 + spans[0]["dur"]
    main_tid = spans[0]["tid"]
    gpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
           and e["ts"] + e["dur"] >= t0 and e["ts"] <= t1 + 50e3]
    streams: dict[int, list[dict]] = defaultdict(list)
    for e in gpu:
        streams[e.get("args", {}).get("stream", e.get("tid"))].append(e)
    gpu_end = max((e["ts"] + e["dur"] for e in gpu), default=t1)
    out = {"wall_ms": round((t1 - t0) / 1e3, 2), "gpu_first_ms": round((min(e["ts"] for e in gpu) - t0) / 1e3, 2)
           if gpu else None, "gpu_last_ms": round((gpu_end - t0) / 1e3, 2)}
    # the compute stream: the one with most kernel time (the upload stream is mostly memcpy)
    kern_ms = {s: sum(e["dur"] for e in ev if e["cat"] == "kernel") for s, ev in streams.items()}
    compute = max(kern_ms, key=kern_ms.get) if kern_ms else None
    out["streams"] = {str(s): {"busy_ms": union_ms([(e["ts"], e["ts"] + e["dur"]) for e in ev]), "ops": len(ev),
                               "first_ms": round((min(e["ts"] for e in ev) - t0) / 1e3, 2),
                               "last_ms": round((max(e["ts"] + e["dur"] for e in ev) - t0) / 1e3, 2),
                               "role": "compute" if s == compute else ""}
                      for s, ev in sorted(streams.items(), key=lambda kv: str(kv[0]))}
    out["union_busy_ms"] = union_ms([(e["ts"], e["ts"] + e["dur"]) for e in gpu])
    cats: dict[str, float] = defaultdict(float)
    tops: dict[tuple, list] = defaultdict(lambda: [0, 0.0])
    for e in gpu:
        s = e.get("args", {}).get("stream", e.get("tid"))
        cats[f"{category(e['name'])} ({'compute' if s == compute else 'side'})"] += e["dur"] / 1e3
        t = tops[(e["name"][:90], s == compute)]
        t[0] += 1
        t[1] += e["dur"] / 1e3
    out["categories_ms"] = {k: round(v, 2) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])}
    out["top_ops"] = [{"name": n, "compute": c, "count": v[0], "ms": round(v[1], 3)}
                      for (n, c), v in sorted(tops.items(), key=lambda kv: -kv[1][1])[:25]]
    # main-thread CPU ops (innermost at an instant) to explain the compute stream's gaps
    cpu_main = sorted((e for e in events if e.get("ph") == "X" and e.get("tid") == main_tid and e.get("cat") in
                       ("cpu_op", "cuda_runtime", "cuda_driver", "user_annotation") and t0 <= e["ts"] <= t1),
                      key=lambda e: e["ts"])
    starts = [e["ts"] for e in cpu_main]

    def doing(ts: float) -> str:
        best = None
        for j in range(bisect.bisect_right(starts, ts) - 1, max(-1, bisect.bisect_right(starts, ts) - 400), -1):
            e = cpu_main[j]
            if e["ts"] <= ts <= e["ts"] + e["dur"] and (best is None or e["dur"] < best["dur"]):
                best = e
        return "idle/python" if best is None else f"{best['name'][:60]} ({best['dur'] / 1e3:.2f} ms)"

    if compute is not None:
        ev = sorted(streams[compute], key=lambda e: e["ts"])
        gaps, end = [], ev[0]["ts"]
        for e in ev:
            if e["ts"] - end > 100:
                gaps.append((end, e["ts"] - end))
            end = max(end, e["ts"] + e["dur"])
        out["compute_idle_ms"] = round((end - ev[0]["ts"]) / 1e3 - out["streams"][str(compute)]["busy_ms"], 2)
        out["compute_gaps"] = [{"at_ms": round((a - t0) / 1e3, 2), "ms": round(g / 1e3, 3), "main": doing(a + g / 2)}
                               for a, g in sorted(gaps, key=lambda x: -x[1])[:20]]
    # long host calls anywhere (syncs, allocations, registrations) and the user annotations (layers, uploads)
    out["long_host_calls"] = [{"name": e["name"][:60], "tid": e["tid"] if e["tid"] != main_tid else "main",
                               "at_ms": round((e["ts"] - t0) / 1e3, 2), "ms": round(e["dur"] / 1e3, 3)}
                              for e in sorted(events, key=lambda e: e.get("ts", 0))
                              if e.get("ph") == "X" and e.get("cat") in ("cuda_runtime", "cuda_driver")
                              and e["dur"] > 300 and t0 <= e["ts"] <= t1][:40]
    out["annotations"] = [{"name": e["name"], "tid": e["tid"] if e["tid"] != main_tid else "main",
                           "at_ms": round((e["ts"] - t0) / 1e3, 2), "ms": round(e["dur"] / 1e3, 3)}
                          for e in sorted(events, key=lambda e: e.get("ts", 0))
                          if e.get("ph") == "X" and e.get("cat") == "user_annotation" and e["name"] != label
                          and t0 <= e["ts"] <= t1][:80]
    # per layer / upload: the GPU window of the work launched inside each annotation (by correlation id)
    launches = {e["args"]["correlation"]: e["ts"] for e in events if e.get("ph") == "X"
                and e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}

    def annotated_spans(prefix: str, since: float) -> list[tuple[dict, dict]]:
        """(annotation, its GPU window) for each annotation named prefix* that launched GPU work."""
        spans = []
        for a in sorted((e for e in events if e.get("ph") == "X" and e.get("cat") == "user_annotation"
                         and e["name"].startswith(prefix) and since <= e["ts"] <= t1), key=lambda e: e["ts"]):
            mine = [e for e in gpu if a["ts"] <= launches.get(e.get("args", {}).get("correlation"), -1)
                    <= a["ts"] + a["dur"]]
            if mine:
                spans.append((a, {"gpu_from_ms": round((min(e["ts"] for e in mine) - t0) / 1e3, 2),
                                  "gpu_to_ms": round((max(e["ts"] + e["dur"] for e in mine) - t0) / 1e3, 2),
                                  "busy_ms": union_ms([(e["ts"], e["ts"] + e["dur"]) for e in mine])}))
        return spans

    out["layers"] = [{"layer": a["name"], "cpu_at_ms": round((a["ts"] - t0) / 1e3, 2),
                      "cpu_ms": round(a["dur"] / 1e3, 2), "gpu_from_ms": w["gpu_from_ms"],
                      "gpu_to_ms": w["gpu_to_ms"], "gpu_busy_ms": w["busy_ms"]}
                     for a, w in annotated_spans("layer ", t0)]
    out["uploads"] = [{"upload": a["name"], "queued_at_ms": round((a["ts"] - t0) / 1e3, 2), **w}
                      for a, w in annotated_spans("upload ", t0 - 50e3)]
    return out


@contextlib.contextmanager
def annotated(llm):
    """record_function labels around each decoder layer and each streamed upload (only while profiling)."""
    from torch.profiler import record_function

    from tandem.gpu import transfer

    model = llm.model.model
    hooks = []
    for i, layer in enumerate(model.layers):
        holder = {}

        def pre(mod, args, i=i, holder=holder):
            holder["rf"] = record_function(f"layer {i}")
            holder["rf"].__enter__()

        def post(mod, args, out, holder=holder):
            holder.pop("rf").__exit__(None, None, None)

        hooks += [layer.register_forward_pre_hook(pre), layer.register_forward_hook(post)]
    orig = transfer.LayerStreamer._upload

    def upload(self, idx):
        with record_function(f"upload {idx}"):
            return orig(self, idx)

    transfer.LayerStreamer._upload = upload
    try:
        yield
    finally:
        transfer.LayerStreamer._upload = orig
        for h in hooks:
            h.remove()


def set_switches(spec: str) -> dict:
    """'mod.ATTR:value,...' -> the old values (to restore); mod is under tandem.gpu or tandem.ops."""
    old = {}
    for item in filter(None, spec.split(",")):
        path, value = item.split(":")
        mod_name, attr = path.rsplit(".", 1)
        mod = importlib.import_module(("tandem.gpu." if mod_name != "model" else "tandem.ops.") + mod_name)
        old[(mod, attr)] = getattr(mod, attr)
        setattr(mod, attr, type(old[(mod, attr)])(int(value)))
    return old


def profile_one(llm, n: int, trace_dir: Path | None, name: str) -> dict:
    from torch.profiler import ProfilerActivity, profile, record_function

    with annotated(llm), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function("prefill"):
            e2e.prefill(llm, n)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        data = json.loads(path.read_text())
        if trace_dir is not None:
            trace_dir.mkdir(parents=True, exist_ok=True)
            with gzip.open(trace_dir / f"prefill-{name}-{n}.json.gz", "wt") as f:
                f.write(path.read_text())
    return summarize(data["traceEvents"] if isinstance(data, dict) else data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen3-30b-a3b:8")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--variants", default="default=", help="name=switches;name=switches (see the docstring)")
    ap.add_argument("--dir", default="/tmp/tandem-e2e")
    ap.add_argument("--trace-dir", help="also write each variant's Chrome trace (gzip) here")
    ap.add_argument("--profile-new-length", action="store_true", help="also profile a prefill at a new length")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import tandem
    from tandem.gpu.transfer import measure_h2d
    from tandem.rules.presets import FAMILY_PRESETS
    from tandem.synth import PRESETS, synthesize

    preset, layers = args.model.split(":")
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    out = root / f"{preset}-{layers}"
    if not (out / "config.json").exists():
        synthesize(preset, out, int(layers), progress=False)
    rules = str(e2e.rules_file(FAMILY_PRESETS[PRESETS[preset]["model_type"]], root / f"{preset}.yaml"))
    llm = tandem.load(out, rules=rules, dtype="bfloat16", progress=False)
    c = e2e.model_counts(llm)
    h2d = measure_h2d(torch.device("cuda"), 1 << 30)
    tflops = e2e.gpu_matmul_tflops()
    n = args.tokens
    upload_s, flops_s = c["routed_bytes"] / h2d, e2e.prefill_flops(c, n) / (tflops * 1e12)
    bound_s = max(upload_s, flops_s)
    res = {"model": args.model, "tokens": n, "gpu": torch.cuda.get_device_name(0), "cpu_cores": os.cpu_count(),
           "h2d_gbs": round(h2d / 1e9, 1), "gpu_bf16_tflops": round(tflops, 1),
           "routed_expert_gb": round(c["routed_bytes"] / 1e9, 3), "bound_upload_ms": round(upload_s * 1e3, 2),
           "bound_flops_ms": round(flops_s * 1e3, 2), "bound_tok_s": round(n / bound_s), "variants": {}}
    print(json.dumps({k: v for k, v in res.items() if k != "variants"}), file=sys.stderr, flush=True)
    e2e.prefill(llm, 512)  # Triton compiles, the layer-wise threshold measured once
    for vi, item in enumerate(args.variants.split(";")):
        name, _, spec = item.partition("=")
        old = set_switches(spec)
        try:
            e2e.prefill(llm, n + 1)
            # e2e's timed run follows one at n + 1: at a length not seen before (cuDNN builds its plans then)
            cold_n = n - 1 - vi
            cold = e2e.prefill(llm, cold_n)
            cold_bound = max(upload_s, e2e.prefill_flops(c, cold_n) / (tflops * 1e12))
            e2e.prefill(llm, n)
            times = []
            for _ in range(args.reps):
                t = time.perf_counter()
                e2e.prefill(llm, n)
                times.append(time.perf_counter() - t)
            med = statistics.median(times)
            v = {"switches": spec, "ms": [round(t * 1e3, 2) for t in times], "median_ms": round(med * 1e3, 2),
                 "tok_s": round(n / med), "ratio": round(bound_s / med, 3),
                 "new_length": {"tokens": cold_n, "ms": round(cold_n / cold * 1e3, 2), "tok_s": round(cold),
                                "ratio": round(cold * cold_bound / cold_n, 3)}}
            v["profile"] = profile_one(llm, n, Path(args.trace_dir) if args.trace_dir else None, name)
            if args.profile_new_length:  # one more length never seen: where the plan builds' time goes
                v["profile_new_length"] = profile_one(llm, n - 101 - vi, None, name + "-new")
        finally:
            for (mod, attr), val in old.items():
                setattr(mod, attr, val)
        res["variants"][name] = v
        print(f"== {name} ({spec}): median {v['median_ms']} ms, {v['tok_s']} tok/s, {100 * v['ratio']:.1f}% of "
              f"bound; at a new length ({v['new_length']['tokens']}): {v['new_length']['ms']} ms, "
              f"{100 * v['new_length']['ratio']:.1f}%", file=sys.stderr, flush=True)
        for prof in ("profile", "profile_new_length"):
            print(f" {prof}:", file=sys.stderr)
            for key, val in v.get(prof, {}).items():  # compact: one line per key, one per item of a list
                if key in ("top_ops", "annotations"):
                    continue  # in the --json output
                rows = val if isinstance(val, list) else [val]
                print(f"  {key}:", *(json.dumps(r) for r in rows), sep="\n    " if isinstance(val, list) else " ",
                      file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(res))


if __name__ == "__main__":
    main()
