"""CPU MoE layer benchmark: tandem's C++ kernels vs stock torch paths, against memory bandwidth measured in
the same run.

    python bench/cpu_moe.py [--quick] [--json] [--threads N] [--mem-gb 8]

Shapes are the routed experts of DeepSeek-V3 (H 7168, I 2048, 256 experts, top 8) and Qwen3-30B-A3B
(H 2048, I 768, 128 experts, top 8). Expert weights are one quantized random expert tiled E times (the
kernels' speed does not depend on the values); E is the model's expert count unless --mem-gb caps it, and it
is reported. Decode (T = 1, 4): random distinct experts per call, cycling through all E, so weights stream
from RAM (they are far larger than the caches); GB/s counts the bytes of the experts a call touches.
The probe and the decode calls share the machine the same way: each decode row runs 9 rounds (--quick 5) of
one probe (the best of 12 passes over 1 GiB, one per read pattern of bandwidth_probe: 1-8 runs read side by side
per thread, line by line or in 1-8 KB pieces, without and with a prefetch) then >= 0.1 s of calls submitted back to
back (the next is queued before the last is synced: the pool runs a decode step's layers so, with no Python in
between; sync_ms times one Python call at a time, wake-up included); ms is the median round's, pct_bw the median
of the rounds' ratios (calls' GB/s / the round's probe GB/s), pct_bw_best / _worst the extremes, probe_gbs the
median probe, pct_of_run_bw the GB/s against the run's best probe (bandwidth_gbs: bandwidth_probe over 2 GiB).
/proc/loadavg is recorded at the start and end.
Prefill (T = 512, 2048): each token picks K random experts among E; TFLOP/s counts 2*3*H*I per (token, expert);
bw_bound_tflops is the memory roofline (each touched expert's weights read once at the measured bandwidth).
Experts with >= gemm_min_tokens tokens take tandem's GEMM path (AMX / AVX512-BF16) where the CPU has one;
int8_row layers an int8 GEMM (AMX-INT8 / VNNI) with activations quantized per token.
torch_ms: stock torch in the same run, looping over active experts as an unfused MoE does, on its own copy of
min(E, 16) experts: decode times the format family's path (torch._weight_int8pack_mm for int8,
aten._weight_int4pack_mm_for_cpu for int4, F.linear for bf16) and scales it to the number of distinct experts
tandem's call touched (torch's copy holds fewer); prefill times every family (--quick: bf16 F.linear only)
(int8 only up to T = 512: it has no many-token kernel) and reports the fastest. speedup = torch_ms / ms.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import platform
import tempfile
import time

import torch
import torch.nn.functional as F

from tandem.kernels import cpu as K

SHAPES = {"deepseek-v3": (7168, 2048, 256, 8), "qwen3-30b-a3b": (2048, 768, 128, 8)}
TORCH_FAMILY = {"bf16": "bf16", "int8": "int8", "int8_row": "int8", "q8_0": "int8", "int4_g32": "int4",
                "int4_g128": "int4", "q4_0": "int4", "q4_k": "int4", "q5_k": "int4", "q6_k": "int8"}


def machine() -> str:
    name = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {K.physical_cores()} cores"


def bandwidth_gbs(gib: float = 2.0, reps: int = 8) -> float:
    """Best read bandwidth over reps passes of a huge-page buffer far larger than the caches (every pool thread
    sums its slice; the same pages kind and threads the kernels use)."""
    return K._C.bandwidth_probe(int(gib * 2**30), reps)


class ProbeBuffer:
    """The bandwidth probe's buffer kept for the whole run, so a decode row can time probe passes between its
    own calls (bandwidth_probe maps, faults and reads a fresh buffer): anonymous memory with MADV_HUGEPAGE
    (the pages kind the kernel's weights and bandwidth_probe use), read by the pool's threads (read_buffer)."""

    def __init__(self, gib: float = 1.0):
        self.n = int(gib * 2**30)
        self.mm = mmap.mmap(-1, self.n + (2 << 20))
        if hasattr(mmap, "MADV_HUGEPAGE"):
            self.mm.madvise(mmap.MADV_HUGEPAGE)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.mm))
        self.p = (base + (2 << 20) - 1) // (2 << 20) * (2 << 20)  # 2 MiB aligned: huge pages can back it
        ctypes.memset(self.p, 1, self.n)  # fault the pages in before timing

    def gbs(self) -> float:
        """The best of one timed pass over the buffer in each of bandwidth_probe's read patterns (1-8 runs read
        side by side per thread, line by line or in 1-8 KB pieces, without and with a prefetch), GB/s."""
        best = 0.0
        for streams, prefetch, chunk in K._C.read_patterns():
            t0 = time.perf_counter()
            K._C.read_buffer(self.p, self.n, streams, prefetch, chunk)
            best = max(best, self.n / (time.perf_counter() - t0) / 1e9)
        return best


def interleaved(fn, probe: ProbeBuffer, rounds: int, min_s: float) -> list[tuple[float, float]]:
    """rounds x (one probe pass, then calls of fn for >= min_s): [(probe GB/s, seconds per call)] per round. A
    core taken by another process slows the probe and the kernel of the same round alike, so the ratio of a
    round is steadier than the ratio of separately timed runs. fn(i) submits call i and returns its handle; call
    i - 1 is synced after call i is submitted, so the pool runs the calls back to back as a decode step's layers
    reach it (the last thread of one starts the next; Python's work and wake-up fall between, not inside)."""
    out, i = [], 0
    fn(0).sync()
    for _ in range(rounds):
        bw = probe.gbs()
        n, t0, last = 0, time.perf_counter(), None
        while n < 2 or time.perf_counter() - t0 < min_s:
            h = fn(i)
            if last is not None:
                last.sync()
            last, i, n = h, i + 1, n + 1
        last.sync()
        out.append((bw, (time.perf_counter() - t0) / n))
    return out


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return f.read().strip()
    except OSError:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())


def timeit(fn, n_calls: int, min_s: float = 0.3) -> float:
    """Median-free simple timing: warm up once, then mean seconds per call over >= n_calls and >= min_s."""
    fn(0)
    i, t0 = 0, time.perf_counter()
    while i < n_calls or time.perf_counter() - t0 < min_s:
        fn(i)
        i += 1
    return (time.perf_counter() - t0) / i


def file_pages(t: torch.Tensor) -> torch.Tensor:
    """t's bytes written to an unlinked temporary file and mapped: the page cache's 4 KB pages, which the kernel
    reads in place under experts.cpu's `use_mmap: true`."""
    with tempfile.TemporaryFile() as f:
        f.write(t.numpy().tobytes())
        f.flush()
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    return torch.frombuffer(mm, dtype=torch.uint8)


def make_experts(fmt: str, H: int, I: int, E: int, layers: int = 1,  # noqa: E741
                 pages: str = "kernel") -> list[K.MoEExperts]:
    g = torch.Generator().manual_seed(0)
    one = [torch.randn(I, H, generator=g) / H**0.5, torch.randn(I, H, generator=g) / H**0.5,
           torch.randn(H, I, generator=g) / I**0.5]
    if fmt in ("q4_0", "q4_k", "q5_k", "q6_k"):  # GGUF formats have no tandem quantizer: random valid blocks
        import numpy as np

        rng = np.random.default_rng(0)
        blocks = []
        for rows, cols in ((I, H), (I, H), (H, I)):
            qk, nb = K.BLOCKS[K.FORMATS[fmt]]
            b = rng.integers(0, 256, size=(rows * cols // qk, nb), dtype=np.uint8)
            d = 208 if fmt == "q6_k" else 0  # the fp16 scale(s): q6_k's d is last, the others' d (and dmin) first
            b[:, d:d + 2] = np.full(len(b), 0.001, np.float16).view(np.uint8).reshape(-1, 2)
            if fmt in ("q4_k", "q5_k"):
                b[:, 2:4] = b[:, 0:2]
            blocks.append(torch.from_numpy(b.reshape(-1)))
    else:
        blocks = [K.quantize(w, fmt).reshape(-1) for w in one]
    tiled = [b.reshape(1, -1).expand(E, -1).contiguous().reshape(-1) for b in blocks]
    # several layers when one layer's experts would fit in the caches
    if pages == "file":  # each layer its own mapped file, read in place
        return [K.MoEExperts.from_blocks(*(file_pages(b) for b in tiled), fmt, E, I, H) for _ in range(layers)]
    return [K.MoEExperts.from_blocks(*tiled, fmt, E, I, H, copy=True) for _ in range(layers)]  # huge pages


def route(T: int, E: int, k: int, g: torch.Generator) -> torch.Tensor:
    return torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])


class TorchMoE:
    """Stock torch MoE: a loop over active experts, the fastest per-format CPU path torch offers."""

    def __init__(self, family: str, H: int, I: int, E: int):  # noqa: E741
        self.family, self.E = family, E
        g = torch.Generator().manual_seed(1)
        one = []
        for rows, cols in ((I, H), (I, H), (H, I)):
            w = torch.randn(rows, cols, generator=g) / cols**0.5
            if family == "bf16":
                one.append(w.bfloat16())
            elif family == "int8":
                s = w.abs().amax(1) / 127
                one.append((torch.round(w / s[:, None]).to(torch.int8), s.bfloat16()))
            else:  # int4, groups of 32, scale + zero as _weight_int4pack_mm_for_cpu expects
                q = torch.randint(0, 16, (rows, cols), dtype=torch.int32, generator=g)
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
                sz = torch.stack([torch.full((cols // 32, rows), 0.01), torch.zeros(cols // 32, rows)], -1)
                one.append((packed, sz.bfloat16()))
        clone = lambda m: m.clone() if isinstance(m, torch.Tensor) else tuple(t.clone() for t in m)  # noqa: E731
        self.w = [[clone(m) for m in one] for _ in range(E)]  # distinct copies: no cache reuse across experts

    def linear(self, x, m):
        if self.family == "bf16":
            return F.linear(x, m)
        if self.family == "int8":
            return torch._weight_int8pack_mm(x, m[0], m[1])
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, m[0], 32, m[1])

    def __call__(self, x, ids, tw):
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32)
        for e in ids.unique().tolist():
            tok, kk = (ids == e).nonzero(as_tuple=True)
            g, u, d = self.w[e % self.E]
            xe = x[tok]
            h = F.silu(self.linear(xe, g)) * self.linear(xe, u)
            out.index_add_(0, tok, (self.linear(h, d).float() * tw[tok, kk, None]))
        return out


def median(v: list[float]) -> float:
    v = sorted(v)
    return (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2


def bench_case(layers, torch_moes, shape, fmt, T, E, k, H, I, expert_bytes, bw, g, quick, probe):  # noqa: E741
    """Time tandem and stock torch on the same routing statistics; one result row. Decode calls cycle through
    the layers (as a model's forward does), so no layer's experts stay in the caches between its calls; they
    run in interleaved rounds with probe passes, and pct_bw is the median of the rounds' ratios (GB/s of the
    round's calls / GB/s of its probe pass), pct_bw_best the best round's."""
    decode = T <= 4
    L = len(layers) if decode else 1
    n_sets = 16 if decode else 2
    ids_sets = [route(T, E, k, g) for _ in range(n_sets)]
    x = torch.randn(T, H).bfloat16()
    tw = torch.rand(T, k)
    calls = (10 if quick else 30) if decode else 1
    call = lambda i: layers[i % L].forward(x, ids_sets[i % n_sets], tw)  # noqa: E731
    outs = [torch.empty(T, H).bfloat16() for _ in range(2)]  # two calls in flight: one output each
    submit = lambda i: layers[i % L].submit(x, ids_sets[i % n_sets], tw, outs[i % 2])  # noqa: E731
    touched = sum(s.unique().numel() for s in ids_sets) / n_sets
    if decode:
        rounds = interleaved(submit, probe, 5 if quick else 9, 0.06 if quick else 0.1)
        ms = median([s for _, s in rounds]) * 1e3
        sync_ms = timeit(call, calls, 0.1 if quick else 0.2) * 1e3  # one Python call at a time, as eager code does
        ratios = [touched * expert_bytes / s / 1e9 / pbw for pbw, s in rounds]
    else:
        ms = timeit(call, calls, 0) * 1e3
    best = None
    for tm in torch_moes:
        tids_sets = [route(T, tm.E if decode else E, k, g) for _ in range(n_sets)]
        tms = timeit(lambda i, tm=tm, ts=tids_sets: tm(x, ts[i % n_sets], tw), min(calls, 5),
                     0.2 if decode else 0) * 1e3
        if decode:  # per distinct expert streamed, scaled to tandem's count
            tms *= touched / (sum(s.unique().numel() for s in tids_sets) / n_sets)
        if best is None or tms < best[1]:
            best = (tm.family, tms)
    row = {"shape": shape, "format": fmt, "tokens": T, "experts": E, "layers": L, "ms": round(ms, 3), "pct_bw": None,
           "gbs": None, "tflops": None, "torch_path": best[0], "torch_ms": round(best[1], 3),
           "speedup": round(best[1] / ms, 2)}
    if decode:
        gbs = touched * expert_bytes / (ms / 1e3) / 1e9
        row.update(sync_ms=round(sync_ms, 3))
        row.update(gbs=round(gbs, 2), pct_bw=round(100 * median(ratios), 1), pct_bw_best=round(100 * max(ratios), 1),
                   pct_bw_worst=round(100 * min(ratios), 1), probe_gbs=round(median([b for b, _ in rounds]), 2),
                   pct_of_run_bw=round(100 * gbs / bw, 1), rounds=len(rounds))
    else:
        row["tflops"] = round(2 * 3 * H * I * T * k / (ms / 1e3) / 1e12, 4)
        row["torch_tflops"] = round(2 * 3 * H * I * T * k / (best[1] / 1e3) / 1e12, 4)
        # the memory roofline: no faster than reading each touched expert's weights once at the probe's speed
        row["bw_bound_tflops"] = round(2 * 3 * H * I * T * k / (touched * expert_bytes / (bw * 1e9)) / 1e12, 2)
    return row


def run(args) -> dict:
    if args.threads:
        K.set_num_threads(args.threads)
    torch.set_num_threads(K.num_threads())
    load0 = loadavg()
    bw = bandwidth_gbs()
    probe = ProbeBuffer()
    res = {"loadavg_start": load0, "machine": machine(), "threads": K.num_threads(), "isa": K.current_isa(),
           "bandwidth_gbs": round(bw, 2),
           "gemm_min_tokens": K.gemm_min_tokens(), "has_gemm": K.has_gemm(), "numa_nodes": K.numa_nodes(),
           "results": []}
    mem_gb = args.mem_gb or (1.5 if args.quick else 6.0)
    for shape in args.shapes.split(","):
        H, I, E_model, k = SHAPES[shape]  # noqa: E741
        torch_moe: dict = {}

        def torch_paths(fams, E, H=H, I=I, torch_moe=torch_moe):  # noqa: E741
            for fam in fams:
                if fam not in torch_moe:
                    torch_moe[fam] = TorchMoE(fam, H, I, min(E, 16))
            return [torch_moe[f] for f in fams]

        sweep = [None]
        if args.sweep:
            name, values = args.sweep.split("=", 1)
            sweep = [(name, v) for v in values.split(",")]
        for fmt, pages in [(f, p) for f in args.formats.split(",") for p in args.pages.split(",")]:
            expert_bytes = 2 * I * K.row_bytes(fmt, H) + H * K.row_bytes(fmt, I)
            E = max(k, min(E_model, int(mem_gb * 1e9 // expert_bytes)))
            w = make_experts(fmt, H, I, E, layers=max(1, int(mem_gb * 1e9 // (E * expert_bytes))), pages=pages)
            prefill = [] if args.no_prefill else [512] if args.quick else [512, 2048]
            if args.quick and (shape != "qwen3-30b-a3b" or fmt != "int4_g32"):
                prefill = []
            tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else [1, 4] + prefill
            g = torch.Generator().manual_seed(2)
            for T, knob in [(t, kn) for t in tokens for kn in (sweep if t <= 4 else [None])]:
                # int8pack_mm takes tens of seconds per call at T=2048 (no many-token kernel): T=512 only
                fams = ([TORCH_FAMILY[fmt]] if T <= 4 else args.torch.split(",") if args.torch
                        else ["bf16"] if args.quick else ["bf16", "int8", "int4"] if T <= 512 else ["bf16", "int4"])
                if knob is not None:  # the kernel reads it at each call
                    os.environ[knob[0]] = knob[1]
                row = bench_case(w, torch_paths(fams, E), shape, fmt, T, E, k, H, I, expert_bytes, bw, g,
                                 args.quick, probe)
                row["pages"] = pages
                if knob is not None:
                    row["knob"] = "=".join(knob)
                    os.environ.pop(knob[0])
                res["results"].append(row)
                perf = (f"{row['gbs']:6.1f} GB/s {row['pct_bw']:5.1f}% bw (rounds: best {row['pct_bw_best']:5.1f}%, "
                        f"probe {row['probe_gbs']:5.1f} GB/s)" if T <= 4
                        else f"{row['tflops']:7.3f} TFLOP/s (bw bound {row['bw_bound_tflops']:5.1f})")
                print(f"{shape:14s} {fmt:9s} {pages:6s} {row.get('knob', '')} T={T:<5d} E={E:<4d}x{row['layers']} "
                      f"{row['ms']:9.2f} ms  {perf}  "
                      f"torch({row['torch_path']}) {row['torch_ms']:9.2f} ms  x{row['speedup']:.2f}", flush=True)
            del w
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="decode + Qwen3 prefill at T=512 only (< 1 min)")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--threads", type=int, default=0, help="kernel threads (default: physical cores)")
    ap.add_argument("--mem-gb", type=float, default=0, help="cap on one format's expert weights (6, --quick 1.5)")
    ap.add_argument("--formats", default="")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--no-prefill", action="store_true")
    ap.add_argument("--pages", default="kernel", help="where the experts live, comma separated, each run in turn: "
                    "kernel (the kernel's copy on huge pages: use_mmap false), file (a mapped file read in place: "
                    "experts.cpu's default for a GGUF file's blocks)")
    ap.add_argument("--tokens", default="", help="token counts to run instead of the default (e.g. 512,2048)")
    ap.add_argument("--torch", default="", help="stock-torch families timed for prefill (bf16,int8,int4)")
    ap.add_argument("--sweep", default="", help="decode rows once per value of a knob the kernel reads at each call, "
                    "e.g. TANDEM_CPU_STREAMS=1,2,4 (TANDEM_CPU_DECODE_DOWN_ITEMS, TANDEM_CPU_TAIL)")
    ap.add_argument("--profile", action="store_true", help="the kernel prints per-phase times of each call (stderr)")
    args = ap.parse_args()
    if args.profile:
        os.environ["TANDEM_CPU_PROFILE"] = "1"  # read by the kernel at its first call
    args.formats = args.formats or ("int4_g32,int8" if args.quick else "int4_g32,int4_g128,int8,q4_k,bf16")
    t0 = time.perf_counter()
    res = run(args)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    res["loadavg_1m"] = os.getloadavg()[0]
    res["loadavg_end"] = loadavg()
    if args.json:
        print(json.dumps(res))
    else:
        print(f"bandwidth {res['bandwidth_gbs']} GB/s, threads {res['threads']}, isa {res['isa']}, "
              f"{res['seconds']} s")


if __name__ == "__main__":
    main()
