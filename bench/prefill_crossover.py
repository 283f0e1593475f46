"""One streamed MoE layer on the GPU at prefill sizes: the grouped quantized GEMM (tandem.gpu.quant_matmul,
dequantizing per tile) against dequantize-once + dense bf16 GEMMs (tandem.gpu.prefill_gemm), to place
prefill_gemm.DENSE_TOKENS.

    python bench/prefill_crossover.py [--experts 128 --inter 768 --hidden 2048 --top-k 8 --format int4_g32]
                                      [--tokens 256,512,1024,2048,4096,8192] [--json]

Default shape: a Qwen3-30B-A3B layer. Times are CUDA-event medians of 5 runs after a warm-up (ms per layer).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from tandem.gpu import blocks as B
from tandem.gpu.dequant import dequantize_into
from tandem.gpu.prefill_gemm import Workspace, dense_experts
from tandem.gpu.quant_matmul import fused_experts


def timed(fn, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--inter", type=int, default=768)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--format", default="int4_g32")
    ap.add_argument("--tokens", default="256,512,1024,2048,4096,8192")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    e, i, d, k = args.experts, args.inter, args.hidden, args.top_k
    w13 = B.from_float(torch.randn(e, 2 * i, d, device="cuda") * 0.05, args.format)
    w2 = B.from_float(torch.randn(e, d, i, device="cuda") * 0.05, args.format)
    ws = Workspace()
    g13 = torch.empty(w13.shape, dtype=torch.bfloat16, device="cuda")
    rows = [{"dequant_layer_ms": round(timed(lambda: dequantize_into(w13, g13)), 3), "tokens": 0}]
    for t in [int(x) for x in args.tokens.split(",")]:
        inputs = (torch.randn(t, d, device="cuda", dtype=torch.bfloat16),
                  torch.rand(t, e, device="cuda").topk(k, -1).indices, torch.rand(t, k, device="cuda"))
        row = {"tokens": t,
               "grouped_quant_ms": timed(lambda a=inputs: fused_experts(*a, w13, w2, F.silu)),
               "dense_grouped_mm_ms": timed(lambda a=inputs: dense_experts(*a, w13, w2, F.silu, ws, grouped=True)),
               "dense_loop_ms": timed(lambda a=inputs: dense_experts(*a, w13, w2, F.silu, ws, grouped=False))}
        rows.append({key: round(v, 3) if isinstance(v, float) else v for key, v in row.items()})
        print(rows[-1], flush=True)
    print(f"dequantize w13 of one layer to bf16: {rows[0]['dequant_layer_ms']} ms "
          f"({w13.nbytes() / 2**20:.0f} MiB of {args.format})")
    if args.json:
        print(json.dumps({"shape": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
