"""Causal prefill attention on one GPU: tandem's `attend` (what a long prompt's layer runs) against the SDPA
backends forced one by one, at the attention shapes of Qwen3-30B-A3B (GQA 32/4, d 128) and DeepSeek-V2-Lite
(MLA without absorption: 16 heads, qk 192, v 128), to show which kernel the prefill gets and what it costs.

    python bench/attention_prefill.py [--tokens 512,2048,8192] [--json]

Rate = causal FLOPs (4 T^2 H d / 2) / time; the bound is the GPU's measured bf16 matmul rate (same run).
Each path also runs once at a length nothing ran before ("first call"): cuDNN builds a plan per shape, and a
server sees a new prompt length with most requests.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from tandem.models.attention import attend

SHAPES = {"qwen3-30b-a3b": (32, 4, 128, 128), "deepseek-v2-lite": (16, 16, 192, 128)}  # H, Hkv, d_qk, d_v


def timed(fn, reps: int = 10) -> tuple[float, float]:
    """(first call, mean of the next `reps`) in ms: the first call at a new shape may build a kernel plan."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return first, (time.perf_counter() - t0) / reps * 1e3


def variants(q, k, v, scale):
    """name -> callable; q [T, H, d], k/v [T, Hkv, d] as tandem holds them."""
    g = q.shape[1] // k.shape[1]
    qt, kt, vt = (x.transpose(0, 1)[None] for x in (q, k, v))  # [1, H, T, d]
    ke, ve = kt.repeat_interleave(g, 1), vt.repeat_interleave(g, 1)
    out = {"tandem attend": lambda: attend(q, k, v, 0, scale)}
    for name, b in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                    ("cudnn", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH)):
        def run(b=b, kk=kt, vv=vt, gqa=g > 1):
            with sdpa_kernel(b):
                return F.scaled_dot_product_attention(qt, kk, vv, is_causal=True, scale=scale, enable_gqa=gqa)

        def run_expanded(b=b):
            with sdpa_kernel(b):
                return F.scaled_dot_product_attention(qt, ke, ve, is_causal=True, scale=scale)

        out[f"{name} (enable_gqa)" if g > 1 else name] = run
        if g > 1:
            out[f"{name} (K/V repeated)"] = run_expanded
    return out


def inputs(t: int, h: int, hkv: int, dqk: int, dv: int) -> tuple[torch.Tensor, ...]:
    return (torch.randn(t, h, dqk, device="cuda", dtype=torch.bfloat16),
            torch.randn(t, hkv, dqk, device="cuda", dtype=torch.bfloat16),
            torch.randn(t, hkv, dv, device="cuda", dtype=torch.bfloat16))


def measure(model: str, name: str, fn, ref: torch.Tensor, t: int, h: int, dqk: int, dv: int, peak: float) -> dict:
    flops = 2 * t * t * h * (dqk + dv) / 2
    try:
        first, ms = timed(fn)
        o = fn()
    except RuntimeError as e:
        return {"model": model, "tokens": t, "path": name, "error": str(e).splitlines()[0][:120]}
    o = o[0].transpose(0, 1) if o.dim() == 4 else o
    return {"model": model, "tokens": t, "path": name, "ms": round(ms, 3), "first_ms": round(first, 2),
            "tflops": round(flops / ms / 1e9, 1), "pct_peak": round(100 * flops / ms / 1e9 / peak, 1),
            "rel_err": round(((o.float() - ref).norm() / ref.norm()).item(), 5)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="512,2048,8192")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    peak = 2 * 8192**3 / timed(lambda: a @ a)[1] / 1e9
    results = []
    fresh = iter(range(1, 1 << 20))  # each (path, size) at a length nothing ran before: its first call is cold
    for model, (h, hkv, dqk, dv) in SHAPES.items():
        for size in (int(x) for x in args.tokens.split(",")):
            for name in variants(*inputs(8, h, hkv, dqk, dv), 1.0):
                t = size + next(fresh)
                q, k, v = inputs(t, h, hkv, dqk, dv)
                with sdpa_kernel(SDPBackend.MATH):  # the reference; leaves the fused kernels' plan caches cold
                    ref = attend(q, k, v, 0, dqk**-0.5).float()
                results.append(measure(model, name, variants(q, k, v, dqk**-0.5)[name], ref, t, h, dqk, dv, peak))
                print(results[-1], file=sys.stderr, flush=True)
    print("| model | tokens | path | ms | first call ms | TFLOP/s | % of matmul |\n|---|---|---|---|---|---|---|")
    for r in results:
        cells = f"{r['ms']} | {r['first_ms']} | {r['tflops']} | {r['pct_peak']}" if "ms" in r else f"{r['error']} | | |"
        print(f"| {r['model']} | {r['tokens']} | {r['path']} | {cells} |")
    if args.json:
        print(json.dumps({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                          "matmul_tflops": round(peak, 1), "results": results}))


if __name__ == "__main__":
    main()
