"""Decode-step linears on one GPU: tandem.gpu.gemv against what ran them before (cuBLAS for bf16, the tensor-core
quant matmul for q8_0 and fp8_e4m3), as weight GB/s and as a share of the HBM copy rate measured in the same run.

Shapes: DeepSeek-V3's attention (q_a, q_b, kv_a, q_a + kv_a as one, o_proj), its shared expert and LM head, and
Qwen3-30B-A3B's q/k/v, o_proj and LM head. Each linear is replayed in a CUDA graph over enough distinct copies of
its weight (>= 256 MB in all) that no copy stays in the 50 MB L2 from one call to the next, as in a decode step.
`--sweep`: every tiling in SWEEP too, each checked against the default's output; the best is reported.

Usage: python bench/gemv.py [--rows 1 4] [--formats bf16 q8_0p fp8_e4m3] [--sweep] [--json]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from decode_graphs import copy_bandwidth  # bench/ is the script's folder: the same HBM copy probe
from mla_decode import graph_ms  # and the same graph timing

from tandem.gpu import blocks as B
from tandem.gpu import gemv as G
from tandem.gpu.quant_matmul import _block_m, _launch

SHAPES = {  # name -> (N, K)
    "dsv3.q_a": (1536, 7168), "dsv3.q_b": (24576, 1536), "dsv3.kv_a": (576, 7168), "dsv3.q_a+kv_a": (2112, 7168),
    "dsv3.o_proj": (7168, 16384), "dsv3.shared_gate_up": (4096, 7168), "dsv3.shared_down": (7168, 2048),
    "dsv3.lm_head": (129280, 7168), "qwen3.qkv": (5120, 2048), "qwen3.o_proj": (2048, 4096),
    "qwen3.lm_head": (151936, 2048),
}
SWEEP = [G.Config(n, k, w, p) for n in (1, 2, 4, 8) for k in (512, 1024, 2048) for w in (4, 8) for p in (True, False)]
SWEEP_FP8 = [G.Config(n, k, w, False) for n in (2, 4, 8, 16) for k in (512, 1024) for w in (4, 8)] + [
    G.Config(16, 512, 8, True)]


def weights(fmt: str, n: int, k: int) -> list[B.QuantTensor]:
    """Distinct copies of one random weight, >= 256 MB in all (one copy when it alone is larger)."""
    w = torch.randn(n, k, device="cuda") * 0.05
    one = B.QuantTensor("bf16", w.bfloat16(), (n, k)) if fmt == "bf16" else B.from_float(
        w, B.FP8 if fmt == B.FP8 else "q8_0")
    copies = max(1, -(-(256 << 20) // one.nbytes()))
    return [B.QuantTensor(one.fmt, one.data.clone(), one.shape) for _ in range(min(copies, 64))]


def graph_us(fn, ws: list) -> float:
    """us per call of fn(w) over the copies, replayed in a CUDA graph."""
    return graph_ms(lambda: [fn(w) for w in ws], reps=10) * 1e3 / len(ws)


def before(fmt: str, x: torch.Tensor):
    """The path a decode linear took before the GEMV: cuBLAS on bf16, the tensor-core quant matmul on q8_0 and
    fp8_e4m3."""
    if fmt == "bf16":
        return lambda w: F.linear(x, w.data)

    def quant(w: B.QuantTensor) -> torch.Tensor:
        out = torch.empty(x.shape[0], w.n, dtype=x.dtype, device=x.device)
        _launch(x, w, out, x.shape[0], _block_m(x.shape[0]), 1)
        return out
    return quant


def measure(name: str, fmt: str, m: int, hbm: float, sweep: bool) -> dict:
    n, k = SHAPES[name]
    ws = weights(fmt, n, k)
    gv = [B.q8_0_planar(w) for w in ws] if fmt == "q8_0p" else ws
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    nbytes = gv[0].nbytes()
    row = {"shape": name, "n": n, "k": k, "format": fmt, "rows": m, "weight_mb": round(nbytes / 1e6, 2),
           "before_us": round(graph_us(before("q8_0" if fmt == "q8_0p" else fmt, x), ws), 2),
           "gemv_us": round(graph_us(lambda w: G.gemv(x, w), gv), 2) if G.supports(x, gv[0]) else None}
    if sweep and row["gemv_us"] is not None:
        ref = G.gemv(x, gv[0]).float()
        best = None
        for c in SWEEP_FP8 if fmt == B.FP8 else SWEEP:
            if m * c.block_n * c.block_k > 65536:
                continue
            err = (G.gemv(x, gv[0], config=c).float() - ref).norm() / ref.norm()
            assert err < 1e-2, f"{name} {fmt} {c}: differs from the default tiling by {err:.2e}"
            t = graph_us(lambda w, c=c: G.gemv(x, w, config=c), gv)
            best = min(best or (t, c), (t, c), key=lambda p: p[0])
        row["best_us"], row["best_config"] = round(best[0], 2), list(vars(best[1]).values())
    row["default_config"] = list(vars(G.config_for(fmt, m, n, k, G._sm_count(x.device))).values())
    for key in ("before_us", "gemv_us", "best_us"):
        if row.get(key) is not None:
            row[key.replace("_us", "_pct_hbm")] = round(100 * nbytes / (row[key] * 1e-6) / hbm, 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--formats", nargs="+", default=["bf16", "q8_0p"], choices=["bf16", "q8_0p", B.FP8])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    hbm = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: HBM copy {hbm / 1e12:.2f} TB/s (read + write)")
    print("| shape | N x K | format | rows | MB | before us (% HBM) | gemv us (% HBM) [tiling] | best us (% HBM) |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for name in args.shapes:
        for fmt in args.formats:
            for m in args.rows:
                r = measure(name, fmt, m, hbm, args.sweep)
                rows.append(r)
                best = f"{r['best_us']} ({r['best_pct_hbm']}%) {r['best_config']}" if "best_us" in r else "-"
                gv = f"{r['gemv_us']} ({r['gemv_pct_hbm']}%) {r['default_config']}" if r["gemv_us"] else "-"
                print(f"| {name} | {r['n']} x {r['k']} | {fmt} | {m} | {r['weight_mb']} | {r['before_us']} "
                      f"({r['before_pct_hbm']}%) | {gv} | {best} |", flush=True)
    if args.json:
        print(json.dumps({"device": torch.cuda.get_device_name(), "hbm_copy_tb_s": round(hbm / 1e12, 3),
                          "rows": rows}))


if __name__ == "__main__":
    main()
