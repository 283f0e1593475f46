"""Where the hybrid MoE layer's time goes on a GPU host: the CPU experts kernel called directly, as a CUDA host
node, inside small CUDA graphs, and in the eager hybrid pattern, under pool sizes, pool idle spins and CUDA's
host-wait modes; then a synthesized model's decode (eager and host-node graphs) under the same knobs, and a
per-part breakdown of one eager decode step.

    python bench/hybrid_overhead.py [--model qwen3-30b-a3b:4] [--dir /tmp/tandem-e2e] [--json]

Each variant runs in its own process (CUDA's wait mode must be set before the context exists). Shapes: one
Qwen3-30B-A3B MoE layer (E 128, I 768, H 2048, top-8, int4_g32), T = 1; successive calls cycle through 16
disjoint expert sets so they read from RAM, not the last-level cache. Times in ms.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

MICRO = [  # (pool threads, CUDA wait mode, pool idle spin in us)
    (16, "auto", 2000), (15, "auto", 2000), (16, "auto", 50), (15, "auto", 50),
    (16, "blocking", 2000), (16, "blocking", 50), (15, "blocking", 50), (16, "yield", 50),
]
MODEL = [  # (CUDA wait mode, GOMP_SPINCOUNT or None for libgomp's default, [(threads, spin_us)])
    ("auto", None, [(16, 2000)]),
    ("auto", "10000", [(16, 2000), (15, 2000), (16, 50), (15, 50)]),
    ("blocking", "10000", [(16, 2000), (16, 50), (15, 50)]),
]


def timed(fn, reps: int = 48) -> tuple[float, float]:
    """(ms per call, main thread CPU % while timing)."""
    import torch

    for i in range(4):
        fn(i)
    torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.thread_time()
    for i in range(reps):
        fn(i)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return round(wall / reps * 1e3, 3), round(100 * (time.thread_time() - c0) / wall)


def micro(threads: int, sched: str) -> dict:
    import torch

    from tandem.gpu.host_func import launch_host_func, schedule, set_schedule

    set_schedule(sched)
    from tandem.kernels import cpu as K

    K.set_num_threads(threads)
    E, I, H, k, NS = 128, 768, 2048, 8, 16  # noqa: E741
    torch.manual_seed(0)

    def r(*s):
        return torch.randn(*s, dtype=torch.bfloat16) * 0.02

    kern = K.MoEExperts.from_weights(r(E, I, H), r(E, I, H), r(E, H, I), "int4_g32")
    sets = torch.randperm(E).view(NS, 1, k)

    def pin(t):
        return t.contiguous().pin_memory()

    xs = [pin(torch.randn(1, H, dtype=torch.bfloat16)) for _ in range(NS)]
    ids = [pin(sets[i]) for i in range(NS)]
    w = pin(torch.full((1, k), 1.0 / k))
    outs = [pin(torch.empty(1, H, dtype=torch.bfloat16)) for _ in range(NS)]
    torch.cuda.init()
    res = {"threads": K.num_threads(), "sched": schedule(), "spin_us": int(os.environ.get("TANDEM_CPU_SPIN_US",
                                                                                           "2000"))}
    res["direct"] = timed(lambda i: kern.forward(xs[i % NS], ids[i % NS], w, outs[i % NS]))
    jobs = [kern.host_job(xs[i], ids[i], w, outs[i]) for i in range(NS)]
    cur = torch.cuda.current_stream()
    res["host_node_b2b"] = timed(lambda i: launch_host_func(jobs[i % NS].fn, jobs[i % NS].arg))

    def host_sync(i):
        launch_host_func(jobs[i % NS].fn, jobs[i % NS].arg)
        cur.synchronize()

    res["host_node_sync"] = timed(host_sync)

    # graphs: staging as HybridMoE has it (one pinned set), ids taken from a GPU tensor set before each replay
    dev = torch.device("cuda")
    xp, idp, wp, outp = pin(xs[0].clone()), pin(ids[0].clone()), pin(w.clone()), pin(outs[0].clone())
    job = kern.host_job(xp, idp, wp, outp)
    L = 8
    rot = torch.stack([torch.stack([sets[(j + layer) % NS] for layer in range(L)]) for j in range(NS)]).to(dev)
    id_now = rot[0].clone()
    h0 = torch.randn(1, H, device=dev, dtype=torch.bfloat16)
    wg = w.to(dev)
    mats = [torch.randn(H, H, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(L)]

    def layer(h, n, eager: bool, blocking_event: bool = False):
        h = torch.tanh(h @ mats[n])  # stand-in for the GPU part of a layer
        xp.copy_(h, non_blocking=True)
        idp.copy_(id_now[n], non_blocking=True)
        wp.copy_(wg, non_blocking=True)
        if eager:
            ev = torch.cuda.Event(blocking=blocking_event)
            ev.record()
            ev.synchronize()
            kern.submit(xp, idp, wp, out=outp).sync()
        else:
            launch_host_func(job.fn, job.arg, torch.cuda.current_stream())
        return h + outp.to(dev, non_blocking=True)

    graphs = {}
    for name, n_layers in (("graph_1layer", 1), ("graph_8layers", L)):
        g, s = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        s.wait_stream(cur)
        with torch.cuda.stream(s):
            h = h0
            for n in range(n_layers):
                h = layer(h, n, eager=True)
            torch.cuda.synchronize()
            with torch.cuda.graph(g, stream=s):
                h = h0
                for n in range(n_layers):
                    h = layer(h, n, eager=False)
        graphs[name] = (g, n_layers)

    for name, (g, n_layers) in graphs.items():
        def replay(i, g=g):
            id_now.copy_(rot[i % NS])
            g.replay()
            cur.synchronize()

        ms, cpu = timed(replay, 32)
        res[name] = (round(ms / n_layers, 3), cpu)  # per layer

    for name, blocking in (("eager_8layers", False), ("eager_8layers_blocking_event", True)):
        def step(i, blocking=blocking):
            id_now.copy_(rot[i % NS])
            h = h0
            for n in range(L):
                h = layer(h, n, eager=True, blocking_event=blocking)
            cur.synchronize()

        ms, cpu = timed(step, 32)
        res[name] = (round(ms / L, 3), cpu)
    return res


# ---------------------------------------------------------------------- a real (synthesized) model


class Parts:
    """Wall time per named part of a decode step, and torch.profiler ranges of the same names."""

    def __init__(self):
        self.ms: dict[str, float] = {}

    def wrap(self, owner, attr: str, name: str) -> None:
        import torch

        fn = getattr(owner, attr)

        def wrapped(*a, **kw):
            t0 = time.perf_counter()
            with torch.profiler.record_function(name):
                out = fn(*a, **kw)
            self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - t0) * 1e3
            return out

        setattr(owner, attr, wrapped)


def model_run(spec: str, root: Path, sched: str, knobs: list, profile: bool) -> dict:

    from tandem.gpu.host_func import schedule, set_schedule

    set_schedule(sched)
    sys.path.insert(0, str(Path(__file__).parent))
    from e2e import decode, rules_file

    import tandem
    from tandem.kernels import cpu as K
    from tandem.ops.moe import HybridMoE
    from tandem.rules.presets import FAMILY_PRESETS
    from tandem.synth import PRESETS, synthesize

    preset, layers = spec.split(":")
    out = root / f"{preset}-{layers}"
    if not (out / "config.json").exists():
        synthesize(preset, out, int(layers), progress=False)
    rules = rules_file(FAMILY_PRESETS[PRESETS[preset]["model_type"]], root / f"{preset}.yaml")
    llm = tandem.load(out, rules=str(rules), dtype="bfloat16", progress=False)
    res = {"sched": schedule(), "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"), "decode_b1": []}

    def reset_graphs():
        g = llm.engine.graphs
        g.graphs.clear()
        g.disabled, g.device, g.replays = None, None, 0

    for threads, spin in knobs:
        os.environ["TANDEM_CPU_SPIN_US"] = str(spin)
        K.set_num_threads(threads)  # recreates the pool, which reads the spin
        for host_nodes in (False, True):
            HybridMoE.host_nodes = host_nodes
            reset_graphs()
            tps = decode(llm, 1, 12)
            res["decode_b1"].append({"threads": threads, "spin_us": spin, "host_nodes": host_nodes,
                                     "tok_s": round(tps, 2), "replays": llm.engine.graphs.replays})
            print(f"  {sched} gomp={res['gomp_spincount']} threads={threads} spin={spin} host_nodes={host_nodes}: "
                  f"{tps:.1f} tok/s", file=sys.stderr, flush=True)
    if profile:
        res["eager_step"] = eager_breakdown(llm)
    return res


def eager_breakdown(llm) -> dict:
    """One eager decode step split into named parts (ms per step, wall), and the profiler's top ops."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import tandem.engine.engine as engine_mod
    from tandem.engine import SamplingParams, Sequence
    from tandem.kernels import cpu as K
    from tandem.models.attention import PagedMeta
    from tandem.ops.moe import HybridMoE

    HybridMoE.host_nodes = False
    llm.engine.graphs.off("eager breakdown")
    parts = Parts()
    for layer in llm.model.model.layers:
        parts.wrap(layer.self_attn, "forward", "attention")
    parts.wrap(HybridMoE, "_route", "moe.router")
    parts.wrap(HybridMoE, "_stage", "moe.stage_d2h")
    parts.wrap(torch.cuda.Event, "synchronize", "moe.wait_d2h")
    parts.wrap(K.MoEExperts, "submit", "moe.cpu_submit")
    parts.wrap(K.Handle, "sync", "moe.cpu_wait")
    parts.wrap(HybridMoE, "forward", "moe.total")
    parts.wrap(llm.model, "compute_logits", "logits")
    parts.wrap(engine_mod, "sample", "sample")
    parts.wrap(PagedMeta, "build", "paged_meta")
    parts.wrap(llm.engine, "_run", "step.run")
    parts.wrap(llm.engine, "step", "step.total")
    engine = llm.engine
    engine.add(Sequence(list(range(10, 26)), SamplingParams(max_new_tokens=40, ignore_eos=True)))
    for _ in range(4):
        engine.step()
    parts.ms.clear()
    steps = 16
    with torch.inference_mode():
        for _ in range(steps):
            engine.step()
    res = {"ms_per_step": {k: round(v / steps, 3) for k, v in sorted(parts.ms.items())}}
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            engine.step()
        torch.cuda.synchronize()
    while engine.has_work():
        engine.step()
    res["profile"] = prof.key_averages().table(sort_by="cpu_time_total", row_limit=30)
    return res


# ---------------------------------------------------------------------- driver


def child(cmd: list[str], env: dict, timeout: int) -> dict:
    try:
        p = subprocess.run([sys.executable, __file__, *cmd], stdout=subprocess.PIPE, text=True, env=env,
                           timeout=timeout)
        last = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""
        return json.loads(last)
    except (subprocess.TimeoutExpired, json.JSONDecodeError, IndexError) as e:
        return {"error": f"{type(e).__name__}: {str(e)[:200]}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3-30b-a3b:4")
    ap.add_argument("--dir", default="/tmp/tandem-e2e")
    ap.add_argument("--skip-micro", action="store_true")
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--micro", nargs=2, help=argparse.SUPPRESS)  # child: threads sched
    ap.add_argument("--model-run", nargs=3, help=argparse.SUPPRESS)  # child: sched knobs-json profile
    args = ap.parse_args()
    if args.micro:
        print(json.dumps(micro(int(args.micro[0]), args.micro[1])))
        return
    if args.model_run:
        sched, knobs, prof = args.model_run
        print(json.dumps(model_run(args.model, Path(args.dir), sched, json.loads(knobs), prof == "1")))
        return
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    out = {"cpus": os.cpu_count(), "micro": [], "model": []}
    if not args.skip_micro:
        print("| threads | wait | spin us | direct | host node b2b | host node+sync | graph 1 layer | graph 8 layers "
              "(/layer) | eager 8 layers (/layer) | eager, blocking event |\n|---|---|---|---|---|---|---|---|---|---|",
              flush=True)
        for threads, sched, spin in MICRO:
            env = dict(os.environ, TANDEM_CPU_SPIN_US=str(spin), GOMP_SPINCOUNT="10000")
            r = child(["--micro", str(threads), sched], env, 40)
            out["micro"].append(r)
            if "error" in r:
                print(f"| {threads} | {sched} | {spin} | {r['error']} |", flush=True)
                continue
            cells = " | ".join(f"{r[k][0]} ({r[k][1]}%)" for k in (
                "direct", "host_node_b2b", "host_node_sync", "graph_1layer", "graph_8layers", "eager_8layers",
                "eager_8layers_blocking_event"))
            print(f"| {r['threads']} | {r['sched']} | {r['spin_us']} | {cells} |", flush=True)
    if not args.skip_model:
        for i, (sched, gomp, knobs) in enumerate(MODEL):
            env = dict(os.environ)
            env.pop("GOMP_SPINCOUNT", None)
            if gomp:
                env["GOMP_SPINCOUNT"] = gomp
            r = child(["--model", args.model, "--dir", args.dir, "--model-run", sched, json.dumps(knobs),
                       "1" if i == 1 else "0"], env, 120)
            out["model"].append(r)
            if "eager_step" in r:
                print(r["eager_step"].pop("profile"), file=sys.stderr)
                print(json.dumps(r["eager_step"]), flush=True)
            print("| wait | GOMP | threads | spin us | eager tok/s | host nodes tok/s |\n|---|---|---|---|---|---|")
            rows = r.get("decode_b1", [])
            for a, b in zip(rows[::2], rows[1::2]):
                print(f"| {r['sched']} | {r['gomp_spincount']} | {a['threads']} | {a['spin_us']} | {a['tok_s']} | "
                      f"{b['tok_s']} ({b['replays']} replays) |", flush=True)
            if "error" in r:
                print(f"model run {sched}: {r['error']}", flush=True)
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
