"""End-to-end hybrid benchmark: routed experts on the CPU (C++ kernel, int4_g32), everything else on one GPU,
against the physical bounds measured in the same run.

    python bench/e2e.py [--models qwen3-30b-a3b:8,deepseek-v2-lite:6,deepseek-v3:4] [--dir /tmp/tandem-e2e]
                        [--prefill 512,2048,8192] [--batches 1,8] [--decode-tokens 32] [--gguf Q4_K_M-like]
                        [--profile [--profile-dir DIR]] [--trace [--trace-knobs all|default|read-ahead]] [--json]
                        [--embedding gpu|cpu] [--linears fp8] [--experts-copy]

Each model is `tandem synth PRESET --layers L` (random weights in the real per-layer shapes, truncated depth:
every figure below is per token through those L layers, so ratios hold for the full depth), loaded with the
family's 1gpu preset plus `weight_format: int4_g32` on the experts and, unless --embedding cpu, the token
embedding on cuda:0 too (the presets keep it on the CPU); each runs in its own process so peak VRAM
and RSS are its own. Prefill: one prompt of P tokens through the layers (hidden states, no logits), long ones
through the layer-wise GPU prefill when above its measured threshold. Decode: the engine (paged KV, CUDA graphs
with the CPU experts as host nodes) at batch 1 and 8.

Bounds, measured in the same run: decode = RAM read bandwidth / routed-expert bytes a step reads (batch 8: the
distinct experts 8 tokens touch, expected value); prefill = max(routed-expert bytes / host-to-device bandwidth,
FLOPs / measured GPU bf16 matmul rate), FLOPs = 2 P (active non-embedding parameters) + causal attention.
`ratio` = measured tok/s / bound tok/s. Each prefill length runs twice and the second is timed (the first, at a
new length, builds kernel plans; it is reported as first_call_tok_s). --profile prints torch profiler tables of
decode steps and of the longest prefill (--profile-dir: its timeline as a Chrome trace). --trace times where a
batch-1 decode step waits (the CPU experts' host-node calls, from the C++ kernel's trace, against the GPU work
between them) under the knobs that decide who runs where (--trace-knobs default: the default knobs only;
read-ahead: the defaults with and without the read-ahead of predicted experts, alternating 3 times; it needs
TANDEM_READ_AHEAD=1, which registers the read-aheads when the graphs are captured), and
from the default knobs' trace the steady-state figures per MoE layer (`layer_figures`): one layer = its host
call + the GPU work up to the next call, against that layer's bound (its expert bytes / the RAM read rate of a
probe pass before every 4 traced steps: the median round's ratio, and the stricter one against the run's best
probe; this Xeon's RAM rate moves by a third within minutes), and a full-depth estimate: the step's fixed
part (embedding, dense layers, LM head, sampling, graph launch: the step minus its MoE layers, measured) + the
full model's MoE layer count x the measured layer time.
--gguf: the model as a synthesized GGUF of that quant, its blocks used by the CPU kernel as they are (Q4_K_M-like)
or relaid to int4_g32 (Q4_1: routed experts in Q4_1, everything else BF16; int4_g32 without a bf16 file, so a
full-depth Qwen3-30B-A3B fits a 64 GB disk; Q4_1-Q8_0: the other matrices Q8_0, as hybrid CPU/GPU quants of
DeepSeek keep attention and shared experts at 8 bits, held as they are by linear.marlin on the GPU). --linears
fp8: the layers' linears (attention, shared experts, dense MLPs) as FP8 E4M3 with 128 x 128 block scales on
linear.fp8, the type DeepSeek-V3's own checkpoint stores them in, quantized from the file's bf16 at load.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

# tandem sets this too, but only if it is imported before torch: libgomp reads it once, when torch loads
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import torch  # noqa: E402

DEFAULT_MODELS = "qwen3-30b-a3b:8,deepseek-v2-lite:6,deepseek-v3:4"


# ---------------------------------------------------------------------- bounds


def ram_read_gbs(gib: float = 4.0) -> float:
    """Best read bandwidth of RAM with every kernel thread, GB/s: tandem.kernels.cpu's probe over a fresh huge-page
    buffer (the pages kind the experts' weights use), the best of its read patterns (1-8 runs read side by side
    per thread, line by line or in 1-8 KB pieces, without and with a software prefetch)."""
    from tandem.kernels import cpu as K

    return K._C.bandwidth_probe(int(gib * 2**30), 4)


def gpu_matmul_tflops(n: int = 8192) -> float:
    a, b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16), torch.randn(n, n, device="cuda",
                                                                                dtype=torch.bfloat16)
    a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * n**3 / (time.perf_counter() - t0) / 1e12


def linear_formats(llm) -> dict:
    """How many tandem Linear ops hold their weight in each format (float: the checkpoint's dtype)."""
    from collections import Counter

    from tandem.ops.linear import Linear

    return dict(Counter(m.qweight.fmt if m.qweight is not None else str(m.weight.dtype).removeprefix("torch.")
                        for m in llm.model.modules() if isinstance(m, Linear)))


def model_counts(llm) -> dict:
    """Routed-expert bytes (CPU kernel), routed params per token, other active params, attention dims."""
    from tandem.ops.experts import ExpertsOp

    cfg = llm.model.args
    routed_bytes, per_expert_bytes, routed_params, n_moe, e, k = 0, 0, 0, 0, 0, 0
    for m in llm.model.modules():
        if isinstance(m, ExpertsOp):
            kern = m.backends["generate"].kernel
            routed_bytes += kern.nbytes()
            per_expert_bytes = kern.nbytes() / kern.E
            routed_params += 3 * kern.I * kern.H
            n_moe, e = n_moe + 1, kern.E
    k = getattr(cfg, "num_experts_per_tok", 0)
    other = 0
    for name, p in llm.model.named_parameters():
        if "embed_tokens" in name or "lm_head" in name:
            continue
        other += p.numel()
    for name, b in llm.model.named_buffers():
        if "weight" in name and "lm_head" not in name and "embed" not in name:  # quantized linears' blocks
            other += b.numel()
    heads = cfg.num_attention_heads
    if hasattr(cfg, "kv_lora_rank"):
        qk, v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    else:
        qk = v = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return dict(routed_bytes=routed_bytes, per_expert_bytes=per_expert_bytes, n_moe=n_moe, experts=e, top_k=k,
                routed_params_per_token=routed_params * k, other_params=other, heads=heads, qk=qk, v=v,
                layers=cfg.num_hidden_layers)


def prefill_flops(c: dict, p: int) -> float:
    return 2.0 * p * (c["other_params"] + c["routed_params_per_token"]) + 2.0 * p * p * c["heads"] * (
        c["qk"] + c["v"]) * c["layers"]  # causal: half of the 4 P^2 H d of full attention


def decode_bytes(c: dict, batch: int) -> float:
    """Routed-expert bytes one decode step reads: the distinct experts `batch` tokens touch (expected)."""
    e, k = c["experts"], c["top_k"]
    distinct = e * (1 - (1 - k / e) ** batch)
    return c["n_moe"] * distinct * c["per_expert_bytes"]


def full_depth_moe_layers(preset: str) -> int:
    """MoE layers of the full-depth model: all layers but DeepSeek's leading dense ones (first_k_dense_replace)."""
    from tandem.synth import PRESETS

    cfg = PRESETS[preset]
    return cfg["num_hidden_layers"] - (cfg.get("first_k_dense_replace") or 0)


def layer_figures(t: dict, c: dict, ram_gbs: float, full_moe: int) -> dict:
    """Steady-state decode b1 per MoE layer from one trace (`trace_decode`), its bound, and the full-depth estimate.

    Measured: layer_ms (median over steps of host call + GPU work to the next call, per layer), fixed_ms (the
    step minus its MoE layers: embedding, the dense layers at their own time, LM head, sampling, graph launch).
    Bound: the layer's routed-expert bytes (top_k experts) / the RAM read rate: with the trace's probe rounds, the
    median over rounds of (bound at the round's probe / the round's layer ms), and against the run's best probe
    (layer_ratio_run_best_probe, the stricter); without, ram_gbs. Estimated (full depth): fixed_ms +
    full_moe x layer_ms against full_moe x the layer's bytes at the RAM read rate; equal to the measurement when the
    run had every layer."""
    layer_bytes = c["top_k"] * c["per_expert_bytes"]
    rounds = [r for r in t.get("rounds", []) if r["layer_ms"]]
    if rounds:  # the probe of each round of steps, the median round's ratio; ram_gbs: the median round's probe
        ram_gbs = statistics.median(r["probe_gbs"] for r in rounds)
    bound_ms = layer_bytes / (ram_gbs * 1e9) * 1e3
    ratio = (statistics.median(layer_bytes / (r["probe_gbs"] * 1e6) / r["layer_ms"] for r in rounds) if rounds
             else bound_ms / t["layer_ms"] if t["layer_ms"] else None)
    best = max([r["probe_gbs"] for r in rounds], default=ram_gbs)
    est_step = t["fixed_ms"] + full_moe * t["layer_ms"]
    full_bound = ram_gbs * 1e9 / (full_moe * layer_bytes)
    return {"moe_layers_measured": t["host_calls_per_step"], "call_ms": t["call_ms"], "gap_ms": t["gap_ms"],
            "layer_ms": t["layer_ms"], "layer_mb": round(layer_bytes / 1e6, 2), "ram_read_gbs": round(ram_gbs, 1),
            "layer_bound_ms": round(bound_ms, 4), "layer_ratio": round(ratio, 3) if ratio else None,
            "probe_rounds": len(rounds), "layer_ratio_run_best_probe":
                round(layer_bytes / (best * 1e6) / t["layer_ms"], 3) if t["layer_ms"] else None,
            "fixed_ms": t["fixed_ms"], "step_ms": t["step_ms"], "full_moe_layers": full_moe,
            "estimated": full_moe != t["host_calls_per_step"], "full_step_ms": round(est_step, 3),
            "full_tok_s": round(1e3 / est_step, 2), "full_bound_tok_s": round(full_bound, 2),
            "full_ratio": round(1e3 / est_step / full_bound, 3)}


# ---------------------------------------------------------------------- one model (child process)


# --gguf -> the block format the file keeps every other matrix in, run as it is by linear.marlin on the GPU
GGUF_LINEARS = {"Q4_1-Q8_0": "q8_0"}
LINEAR_RULE = r"""- match:
    name: "{names}"
    class: torch.nn.Linear
  replace:
    class: tandem.ops.Linear
    kwargs:
      generate_device: "cuda:0"
      prefill_device: "cuda:0"
      generate_op: {op}
      prefill_op: {op}{fmt}
"""


def linear_rule(fmt: str) -> str:
    """A rule holding the linears in `fmt`: fp8, the layers' linears by linear.fp8 (FP8 E4M3, 128 x 128 block
    scales: DeepSeek-V3's checkpoint keeps its LM head bf16); a block format, those and the LM head by
    linear.marlin."""
    if fmt == "fp8":
        return LINEAR_RULE.format(names=r"^model\\.layers\\.", op="linear.fp8", fmt="")
    return LINEAR_RULE.format(names=r"^lm_head$|^model\\.layers\\.", op="linear.marlin",
                              fmt=f"\n      weight_format: {fmt}")


def rules_file(preset_family: str, out: Path, weight_format: str | None = "int4_g32",
               embedding: str = "gpu", linear_format: str | None = None, use_mmap: bool = True) -> Path:
    """The family's 1gpu preset with the routed experts quantized to `weight_format` on the CPU (None: as the file
    stores them), the token embedding on cuda:0 (embedding "gpu", the issue's "the rest on the GPU": a decode
    step launched ahead then takes the last step's token on the device) or the CPU, as the preset keeps it, and
    with `linear_format` every linear of the layers (and the LM head) held in that format (linear_rule); use_mmap:
    False, the CPU kernel copies the experts into its own memory on huge pages (default: it reads them in place)."""
    from tandem.rules.presets import PRESETS

    text = (PRESETS / preset_family / "1gpu.yaml").read_text()
    if linear_format:
        last = '- match:\n    name: ".*"'
        assert text.count(last) == 1, f"{preset_family}/1gpu.yaml: no single catch-all rule"
        text = text.replace(last, linear_rule(linear_format) + last)
    line = '      out_device: "cuda:0"\n'
    if weight_format:
        text = text.replace(line, line + f"      weight_format: {weight_format}\n", 1)
    if not use_mmap:
        text = text.replace(line, line + "      use_mmap: false\n", 1)
    if embedding == "gpu":
        head, sep, tail = text.partition('name: "^model\\\\.embed_tokens$"')
        assert sep, f"{preset_family}/1gpu.yaml has no embed_tokens rule"
        text = head + sep + tail.replace('"cpu"', '"cuda:0"', 2)
    out.write_text(text)
    return out


def prefill(llm, n: int) -> float:
    from tandem.models.attention import Batch

    ids = torch.randint(0, llm.model.args.vocab_size, (n,))
    batch = Batch.single(n)
    with torch.inference_mode():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        llm.model(ids, batch.positions(), batch)
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def decode(llm, batch: int, tokens: int) -> float:
    from tandem.engine import SamplingParams, Sequence

    engine = llm.engine
    seqs = [engine.add(Sequence(list(range(10 + i, 26 + i)), SamplingParams(max_new_tokens=tokens, ignore_eos=True)))
            for i in range(batch)]
    start = None
    with torch.inference_mode():
        while engine.has_work():
            engine.step()
            if start is None and all(len(s.output) >= 2 for s in seqs):  # prefill and the first graph step done
                torch.cuda.synchronize()  # a step launched ahead (engine.launched) is done too: counted as done
                ahead = len(engine.launched.seqs) if engine.launched is not None else 0
                start, done = time.perf_counter(), sum(len(s.output) for s in seqs) + ahead
    torch.cuda.synchronize()
    return (sum(len(s.output) for s in seqs) - done) / (time.perf_counter() - start)


def profile_decode(llm) -> str:
    from torch.profiler import ProfilerActivity, profile

    from tandem.engine import SamplingParams, Sequence

    engine = llm.engine
    engine.add(Sequence(list(range(10, 26)), SamplingParams(max_new_tokens=12, ignore_eos=True)))
    for _ in range(4):
        engine.step()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(4):
            engine.step()
        torch.cuda.synchronize()
    while engine.has_work():
        engine.step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


def profile_prefill(llm, n: int, chrome_trace: Path | None = None) -> str:
    """Torch profiler table of one n-token prefill, by GPU time; optionally its timeline as a Chrome trace."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        prefill(llm, n)
    if chrome_trace is not None:
        chrome_trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(chrome_trace))
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=20)


def trace_decode(llm, steps: int = 24, probe=None, per_round: int = 4) -> dict:
    """Where a decode step at batch 1 waits: the CPU experts' host-node calls (C++ trace, CLOCK_MONOTONIC) inside
    each engine step's wall time. Medians over `steps` steps, ms: step, graph replay alone (no logits/sampling),
    inside host calls, GPU side between them (end of one call -> start of the next), before the first / after the
    last; and the CPUs the driver thread ran on. With `probe` (cpu_moe.ProbeBuffer): a RAM probe pass before every
    `per_round` steps, and per round its GB/s and the round's median layer ms (`rounds`): a host whose bandwidth
    moves within seconds slows the probe and the steps of one round alike."""
    from tandem.engine import SamplingParams, Sequence
    from tandem.kernels import cpu as K

    engine = llm.engine
    overlap, engine.overlap = engine.overlap, False  # step by step: each step's calls inside its own wall time
    seq = engine.add(Sequence(list(range(10, 26)), SamplingParams(max_new_tokens=steps + 4, ignore_eos=True)))
    while len(seq.output) < 3:  # prefill, first graph capture
        engine.step()
    K.host_trace_start(1 << 16)
    ahead0 = K.read_ahead_stats()
    marks, probes = [], []
    while engine.has_work():
        if probe is not None and len(marks) % per_round == 0:
            probes.append(probe.gbs())  # between two steps: no host call is traced while it reads
        t0 = time.perf_counter_ns()
        engine.step()
        marks.append((t0, time.perf_counter_ns(), len(probes) - 1))
    calls = K.host_trace()
    K.host_trace_start(0)
    ahead = {k: v - ahead0[k] for k, v in K.read_ahead_stats().items()}
    engine.overlap = overlap
    rows, round_of = [], []
    for a, b, r in marks:
        mine = [c for c in calls if a <= c[0] <= b]
        if not mine:
            continue
        n = len(mine)
        inside = sum(c[1] - c[0] for c in mine)
        between = sum(mine[i + 1][0] - mine[i][1] for i in range(n - 1))
        layer = inside / n + (between / (n - 1) if n > 1 else 0)  # one MoE layer: its call + the GPU work to the next
        rows.append((b - a, inside, between, mine[0][0] - a, b - mine[-1][1], inside / n,
                     between / (n - 1) if n > 1 else 0, layer, b - a - n * layer, n))
        round_of.append(r)
    rounds = [{"probe_gbs": round(gbs, 1),
               "layer_ms": round(statistics.median(row[7] for row, r in zip(rows, round_of) if r == i) / 1e6, 4)}
              for i, gbs in enumerate(probes) if i in round_of]
    med = [statistics.median(r[i] for r in rows) / 1e6 for i in range(9)] if rows else [0.0] * 9
    g = next(iter(engine.graphs.graphs.values()), None) if engine.graphs else None
    replay_ms = None
    if g is not None:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            g.graph.replay()
        torch.cuda.synchronize()
        replay_ms = round((time.perf_counter() - t0) / 10 * 1e3, 3)
    return {"steps": len(rows), "host_calls_per_step": rows[0][-1] if rows else 0,
            "step_ms": round(med[0], 3), "graph_replay_ms": replay_ms, "in_host_calls_ms": round(med[1], 3),
            "between_calls_ms": round(med[2], 3), "before_first_ms": round(med[3], 3),
            "after_last_ms": round(med[4], 3), "call_ms": round(med[5], 4), "gap_ms": round(med[6], 4),
            "read_ahead": {"jobs": ahead["jobs"], "stopped": ahead["stopped"],
                           "mb_per_job": round(ahead["bytes"] / max(1, ahead["jobs"]) / 1e6, 2),
                           "used_mb_per_job": round(ahead["used"] / max(1, ahead["jobs"]) / 1e6, 2),
                           "hit_rate": round(ahead["hits"] / ahead["needed"], 3) if ahead["needed"] else None,
                           "precision": round(ahead["hits"] / ahead["predicted"], 3) if ahead["predicted"] else None},
            "layer_ms": round(med[7], 4), "fixed_ms": round(med[8], 3), "driver_cpus": sorted({c[2] for c in calls}),
            "pool_threads": K.num_threads(), "rounds": rounds}


def probe_layer(llm) -> dict:
    """Where a decode step's CPU time goes, one hybrid MoE layer at T = 1: the C++ kernel called directly, the
    same kernel as a host node on a stream, the eager hybrid block, and the block replayed in a CUDA graph (ms)."""
    from tandem.gpu.host_func import launch_host_func
    from tandem.ops.moe import HybridMoE, top_k_of

    llm.model.model.run_state.phase = "generate"
    block = next(m for m in llm.model.modules() if isinstance(m, HybridMoE) and m.cpu_kernel() is not None)
    kernel = block.cpu_kernel()
    k = top_k_of(block.gate)
    x = torch.randn(1, kernel.H, dtype=torch.bfloat16).pin_memory()
    out = torch.empty_like(x).pin_memory()
    w = torch.full((1, k), 1.0 / k).pin_memory()

    def timed(fn, reps=20) -> float:
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        return round((time.perf_counter() - t0) / reps * 1e3, 3)

    ids = torch.randperm(kernel.E)[:k].view(1, k).pin_memory()
    res = {"kernel_direct_ms": timed(lambda: kernel.forward(x, ids, w, out))}
    job = kernel.host_job(x, ids, w, out)
    res["kernel_host_node_ms"] = timed(lambda: launch_host_func(job.fn, job.arg))
    res["layer_bytes_mb"] = round(k * kernel.nbytes() / kernel.E / 1e6, 1)
    xg = torch.randn(1, kernel.H, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        res["hybrid_block_eager_ms"] = timed(lambda: block(xg))
        graph, s = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            block(xg)
            torch.cuda.synchronize()
            with torch.cuda.graph(graph, stream=s):
                block(xg)
        res["hybrid_block_graph_ms"] = timed(graph.replay)
    return res


KNOBS = (("blocking", 1, 2000, 1, 1), ("blocking", 2, 2000, 1, 1), ("spin", 1, 2000, 1, 1),
         ("blocking", 1, 2000, 0, 1), ("blocking", 1, 300, 1, 1), ("blocking", 0, 2000, 1, 1),
         ("blocking", 1, 2000, 1, 0))  # the first: the defaults; the last: no read-ahead
KNOB_SETS = {"all": KNOBS, "default": KNOBS[:1], "read-ahead": (KNOBS[0], KNOBS[-1]) * 3}


def trace_variants(llm, knobs=KNOBS) -> list[dict]:
    """trace_decode under the knobs that decide who runs where during a graphed step: how the main thread waits
    for logits (blocking event / spin), cores left to the GPU-driving threads, the pool's idle spin, whether
    CUDA's host-function thread is pinned to the free cores, whether the pool reads the next layer's predicted
    experts ahead."""
    from cpu_moe import ProbeBuffer  # bench/ is this script's directory

    from tandem.kernels import cpu as K

    out, cores, probe = [], K.physical_cores(), ProbeBuffer(1.0)
    for wait, leave, spin, pin, ahead in knobs:
        llm.engine.config.blocking_wait = wait == "blocking"
        os.environ["TANDEM_CPU_SPIN_US"], os.environ["TANDEM_PIN_DRIVER"] = str(spin), str(pin)
        K.set_num_threads(cores - leave)  # recreates the pool, which reads both
        K.set_read_ahead(bool(ahead))
        out.append({"wait": wait, "cores_left": leave, "spin_us": spin, "pin_driver": pin, "read_ahead_on": ahead,
                    **trace_decode(llm, probe=probe)})
        print(f"  trace {out[-1]}", file=sys.stderr, flush=True)
    K.set_read_ahead(True)
    return out


def run_one(spec: str, root: Path, prefills: list[int], batches: list[int], tokens: int, prof: bool,
            trace: bool = False, gguf: str | None = None, profile_dir: str | None = None,
            trace_knobs: str = "all", embedding: str = "gpu", linears: str | None = None,
            use_mmap: bool = True) -> dict:
    import tandem
    from tandem.gpu.transfer import measure_h2d
    from tandem.rules.presets import FAMILY_PRESETS
    from tandem.synth import PRESETS, synthesize

    preset, layers = spec.split(":") if ":" in spec else (spec, None)
    layers = int(layers) if layers else None
    probe_free = ram_read_gbs()  # before the model takes RAM: huge pages still to be had
    t0 = time.perf_counter()
    if gguf:  # the GGUF's blocks on the CPU kernel (Q4_K_M-like: 4.5-6.6 bits; Q4_1: int4_g32), the 1gpu preset
        from tandem.synth_gguf import synthesize_gguf

        out = root / f"{preset}-{layers}-{gguf}.gguf"
        if not out.exists():
            synthesize_gguf(preset, out, layers, quant=gguf, progress=False)
        rules = str(rules_file(FAMILY_PRESETS[PRESETS[preset]["model_type"]], root / f"{preset}-{gguf}.yaml", None,
                               embedding, linears or GGUF_LINEARS.get(gguf), use_mmap))
    else:
        out = root / f"{preset}-{layers}"
        if not (out / "config.json").exists():
            synthesize(preset, out, layers, progress=False)
        rules = str(rules_file(FAMILY_PRESETS[PRESETS[preset]["model_type"]], root / f"{preset}.yaml",
                               embedding=embedding, linear_format=linears, use_mmap=use_mmap))
    synth_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    llm = tandem.load(out, rules=rules, dtype="bfloat16", progress=False)
    load_s = time.perf_counter() - t0
    c = model_counts(llm)
    weights = {"Q4_1": "GGUF Q4_1 experts -> int4_g32, rest BF16",
               "Q4_1-Q8_0": "GGUF Q4_1 experts -> int4_g32, other matrices Q8_0 (linear.marlin)"}.get(gguf, gguf)
    if linears == "fp8":
        weights = (weights or "safetensors bf16 -> int4_g32") + "; layers' linears FP8 E4M3 (linear.fp8)"
    res = {"model": preset, "layers": layers, "weights": weights or "safetensors bf16 -> int4_g32",
           "embedding": "cuda:0" if embedding == "gpu" else "cpu", "synth_s": round(synth_s, 1),
           "load_s": round(load_s, 1), "experts_memory": "in place" if use_mmap else "kernel copy",
           "routed_expert_gb": round(c["routed_bytes"] / 1e9, 2), "gpu_linears": linear_formats(llm)}
    # the bound's RAM rate: the better of a probe before the load and one with the model in RAM (on a loaded host
    # the second can come out below what the decode call itself reads: fresh huge pages are then scarce)
    res["ram_read_gbs_before_load"], res["ram_read_gbs_loaded"] = round(probe_free, 1), round(ram_read_gbs(), 1)
    res["ram_read_gbs"] = max(res["ram_read_gbs_before_load"], res["ram_read_gbs_loaded"])
    res["h2d_gbs"] = round(measure_h2d(torch.device("cuda"), 1 << 30) / 1e9, 1)
    res["gpu_bf16_tflops"] = round(gpu_matmul_tflops(), 1)
    prefill(llm, 512)  # warm-up: Triton/graph compiles, the layer-wise threshold measured once
    res["layerwise_threshold"] = llm.model.model._threshold
    for p in prefills:
        first = prefill(llm, p)  # a length not seen before: plan caches (cuDNN attention) cold; the next is warm
        tps = prefill(llm, p)
        bound_s = max(c["routed_bytes"] / (res["h2d_gbs"] * 1e9), prefill_flops(c, p) / (res["gpu_bf16_tflops"] * 1e12))
        res[f"prefill_{p}"] = {"tok_s": round(tps, 1), "first_call_tok_s": round(first, 1),
                               "bound_tok_s": round(p / bound_s, 1),
                               "ratio": round(tps * bound_s / p, 3),
                               "layerwise": p >= (res["layerwise_threshold"] or 1 << 30)}
        print(f"  {preset} prefill {p}: {tps:.0f} tok/s (bound {p / bound_s:.0f})", file=sys.stderr, flush=True)
    for b in batches:
        tps = decode(llm, b, tokens)
        bound = b * res["ram_read_gbs"] * 1e9 / decode_bytes(c, b)
        res[f"decode_b{b}"] = {"tok_s": round(tps, 2), "bound_tok_s": round(bound, 2), "ratio": round(tps / bound, 3),
                               "gb_per_step": round(decode_bytes(c, b) / 1e9, 3)}
        print(f"  {preset} decode b{b}: {tps:.1f} tok/s (bound {bound:.1f})", file=sys.stderr, flush=True)
    res["graphs"] = None if llm.engine.graphs is None else {"replays": llm.engine.graphs.replays,
                                                             "disabled": llm.engine.graphs.disabled}
    res["peak_vram_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    res["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)
    if trace:
        res["trace"] = trace_variants(llm, KNOB_SETS[trace_knobs])
        if res["trace"][0]["host_calls_per_step"] > 1:  # the defaults' trace; one call has no GPU gap to measure
            res["decode_b1_layers"] = layer_figures(res["trace"][0], c, res["ram_read_gbs"],
                                                    full_depth_moe_layers(preset))
    if prof:
        res["profile"] = profile_decode(llm)
        if prefills:
            res["profile"] += f"\n\nprefill of {max(prefills)} tokens:\n" + profile_prefill(
                llm, max(prefills), profile_dir and Path(profile_dir) / f"prefill-{preset}-{max(prefills)}.json.gz")
        res["probe_one_layer"] = probe_layer(llm)
    return res


# ---------------------------------------------------------------------- driver


def table(results: list[dict]) -> str:
    lines = ["| model (layers) | prefill 512 | prefill 2048 | prefill 8192 | decode b1 | decode b8 | VRAM GB | "
             "RSS GB |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['model']} | error: {r['error'][:80]} |")
            continue

        def cell(key, r=r):
            v = r.get(key)
            return f"{v['tok_s']:.0f} ({100 * v['ratio']:.0f}%)" if v else "-"

        lines.append(f"| {r['model']} ({r['layers']}) | {cell('prefill_512')} | {cell('prefill_2048')} | "
                     f"{cell('prefill_8192')} | {cell('decode_b1')} | {cell('decode_b8')} | {r['peak_vram_gb']} | "
                     f"{r['peak_rss_gb']} |")
    rows = [r for r in results if "decode_b1_layers" in r]
    if rows:
        lines += ["", "Decode b1 per MoE layer (trace, default knobs; ms). Measured: host call, GPU between, layer, "
                  "fixed part, step. Bound: layer MB / RAM read rate (a probe before every 4 steps; % of bound: "
                  "the median round's, then against the run's best probe). Full depth: measured when the run had "
                  "every layer, else estimated = fixed + full MoE layers x layer ms.", "",
                  "| model (layers) | MoE layers | host call | GPU between | layer | RAM GB/s | layer bound (MB) | "
                  "layer % of bound | fixed | step | full depth (MoE layers) | full step | full tok/s (% of bound) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            f = r["decode_b1_layers"]
            kind = "estimated" if f["estimated"] else "measured"
            lines.append(f"| {r['model']} ({r['layers']}) | {f['moe_layers_measured']} | {f['call_ms']:.3f} | "
                         f"{f['gap_ms']:.3f} | {f['layer_ms']:.3f} | {f['ram_read_gbs']:.1f} | "
                         f"{f['layer_bound_ms']:.3f} ({f['layer_mb']:.1f}) | {100 * f['layer_ratio']:.0f}% / "
                         f"{100 * f['layer_ratio_run_best_probe']:.0f}% | {f['fixed_ms']:.2f} | {f['step_ms']:.2f} | "
                         f"{kind} ({f['full_moe_layers']}) | {f['full_step_ms']:.2f} | {f['full_tok_s']:.1f} "
                         f"({100 * f['full_ratio']:.0f}% of {f['full_bound_tok_s']:.0f}) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=DEFAULT_MODELS, help="preset:layers, comma separated")
    ap.add_argument("--dir", default="/tmp/tandem-e2e")
    ap.add_argument("--prefill", default="512,2048,8192")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--keep", action="store_true", help="keep the synthesized models (default: delete each)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--trace", action="store_true", help="where a batch-1 decode step waits, under several knobs")
    ap.add_argument("--trace-knobs", choices=tuple(KNOB_SETS), default="all",
                    help="with --trace: every knob variant, the default knobs only, or the defaults with and "
                         "without read-ahead")
    ap.add_argument("--gguf", help="synthesize a GGUF of this quant (Q4_K_M-like; Q4_1: experts Q4_1, rest BF16; "
                                   "Q4_1-Q8_0: experts Q4_1, other matrices Q8_0 run by linear.marlin) instead of "
                                   "bf16 safetensors quantized to int4_g32 at load")
    ap.add_argument("--linears", choices=("fp8",), help="fp8: every linear of the layers held as FP8 E4M3 with "
                    "128 x 128 block scales (linear.fp8), as DeepSeek-V3's checkpoint stores them, quantized at load")
    ap.add_argument("--embedding", choices=("gpu", "cpu"), default="gpu",
                    help="the token embedding on cuda:0 (default: everything but the routed experts on the GPU) or "
                         "on the CPU, as the 1gpu presets keep it")
    ap.add_argument("--experts-copy", action="store_true",
                    help="routed experts copied into the kernel's memory on huge pages (use_mmap: false), not read "
                         "in place")
    ap.add_argument("--profile-dir", help="with --profile: write the largest prefill's timeline (Chrome trace) here")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child: run this model, print its JSON
    args = ap.parse_args()
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    prefills = [int(x) for x in args.prefill.split(",") if x]
    batches = [int(x) for x in args.batches.split(",") if x]
    if args.one:
        print(json.dumps(run_one(args.one, root, prefills, batches, args.decode_tokens, args.profile, args.trace,
                                 args.gguf, args.profile_dir, args.trace_knobs, args.embedding, args.linears,
                                 not args.experts_copy)))
        return
    results = []
    for spec in args.models.split(","):
        cmd = [sys.executable, __file__, "--one", spec, "--dir", str(root), "--prefill", args.prefill,
               "--batches", args.batches, "--decode-tokens", str(args.decode_tokens), "--embedding", args.embedding]
        cmd += ["--profile"] if args.profile else []
        cmd += ["--trace", "--trace-knobs", args.trace_knobs] if args.trace else []
        cmd += ["--gguf", args.gguf] if args.gguf else []
        cmd += ["--linears", args.linears] if args.linears else []
        cmd += ["--experts-copy"] if args.experts_copy else []
        cmd += ["--profile-dir", args.profile_dir] if args.profile_dir else []
        print(f"== {spec}", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=dict(os.environ))
        last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
        try:
            r = json.loads(last)
        except json.JSONDecodeError:
            r = {"model": spec, "error": f"exit {proc.returncode}: {last[-200:]}"}
        if "profile" in r:
            print(r.pop("profile"), file=sys.stderr)
        print(json.dumps(r), file=sys.stderr, flush=True)  # kept if a later model runs out of time
        results.append(r)
        if not args.keep:
            shutil.rmtree(root / spec.replace(":", "-"), ignore_errors=True)
            (root / f"{spec.replace(':', '-')}-{args.gguf}.gguf").unlink(missing_ok=True)
    machine = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
               "cpu_cores": os.cpu_count(), "torch": torch.__version__}
    print(table(results))
    if args.json:
        print(json.dumps({"machine": machine, "command": " ".join(sys.argv), "results": results}))


if __name__ == "__main__":
    main()
