"""MLA decode attention of DeepSeek-V3 layers on one GPU: the torch path (absorbed einsums over the gathered cache)
against the Triton kernel (tandem.gpu.mla_decode), both replayed in CUDA graphs, and both against the HBM bound of
the same run.

Each layer is an MLAttention of DeepSeek-V3's shapes (128 heads, kv_lora_rank 512, rope 64, nope 128, v 128) with
random bf16 weights and its own paged latent cache (block size 16); a graph runs `--layers` consecutive layers
(distinct weights and caches: the L2 keeps neither from one layer to the next, as in a real step) and is replayed;
time per layer = replay time / layers. Scopes:
  attend  MLAttention.attend_absorbed: what the kernel replaces (q_lat, attention over the cache, W_uv)
  layer   MLAttention.forward of the plain module: projections, norms, RoPE (torch, not the fused operators a
          `default` rule gives), the cache write, attention, o_proj
Bound: bytes read once (attend: kv_b_proj + the batch's latent ‖ k_pe rows; layer: every weight of the layer +
those rows) at the device-to-device copy bandwidth measured here.
`--sweep`: the kernel alone (decode_latent) under each tile Config, checked against the default Config's output.

Usage: python bench/mla_decode.py [--batches 1 8] [--contexts 512 4096] [--layers 8] [--sweep] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch
from decode_graphs import copy_bandwidth  # bench/ is the script's folder: the same HBM copy probe

from tandem.gpu import mla_decode
from tandem.models.attention import Batch, PagedMeta
from tandem.models.deepseek import MLAttention, ModelArgs
from tandem.synth import PRESETS

BS = 16
DEV = "cuda"
SWEEP = [mla_decode.Config(*c) for c in [(16, 32, 4, 2), (16, 32, 4, 1), (16, 64, 4, 2), (16, 16, 4, 2),
                                         (16, 32, 8, 2), (16, 64, 8, 3), (32, 32, 4, 2), (32, 32, 8, 2),
                                         (32, 64, 8, 2), (64, 16, 8, 2), (64, 32, 8, 2)]]


class Pages:
    """The CacheView of one layer: its flat latent ‖ k_pe slot storage."""

    def __init__(self, buf: torch.Tensor):
        self.buf = buf

    def buffers(self, layer: int, *like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (self.buf,)


def build_layers(a: ModelArgs, n: int, slots: int) -> list[tuple[MLAttention, torch.Tensor]]:
    torch.manual_seed(0)
    out = []
    for i in range(n):
        with torch.device(DEV):
            attn = MLAttention(a, i).to(DEV).eval()  # RoPE's frequencies are made on the CPU: moved, kept fp32
        for p in attn.parameters():
            p.data = p.data.to(torch.bfloat16)
        out.append((attn, torch.randn(slots, a.kv_lora_rank + a.qk_rope_head_dim, device=DEV).bfloat16()))
    return out


def decode_meta(batch: int, context: int) -> PagedMeta:
    """Sequences of `context` tokens (the last one this step's), in disjoint blocks after block 0."""
    w = -(-context // BS)
    tables = [list(range(1 + i * w, 1 + (i + 1) * w)) for i in range(batch)]
    return PagedMeta.build(tables, [context - 1] * batch, [1] * batch, BS).to(DEV)


def graph_ms(fn, reps: int = 20, before_capture=None) -> float:
    """Milliseconds per replay of a CUDA graph of fn() (warmed up on a side stream first, as capture needs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    if before_capture is not None:
        before_capture()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def eager_ms(fn, reps: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def measure(layers, a: ModelArgs, batch: int, context: int, bw: float):
    """Yields a row per scope: µs per layer of both paths, graphed and eager, and the bound."""
    h, n = a.num_attention_heads, len(layers)
    meta = decode_meta(batch, context)
    g = torch.Generator(device=DEV).manual_seed(batch * 7 + context)
    q = torch.randn(batch, h, a.qk_nope_head_dim + a.qk_rope_head_dim, device=DEV, generator=g).bfloat16()
    q_nope, q_pe = q[..., : a.qk_nope_head_dim], q[..., a.qk_nope_head_dim :].contiguous()
    x = torch.randn(batch, a.hidden_size, device=DEV, generator=g).bfloat16()
    positions = meta.positions
    rows = batch * context * (a.kv_lora_rank + a.qk_rope_head_dim) * 2
    kv_b = layers[0][0].kv_b_proj.weight
    layer_bytes = sum(p.numel() * p.element_size() for p in layers[0][0].parameters())
    scopes = {
        "attend": (lambda: [m.attend_absorbed(q_nope, q_pe, buf, meta) for m, buf in layers],
                   kv_b.numel() * kv_b.element_size() + rows),
        "layer": (lambda: [m(x, positions, Batch([1] * batch, [context - 1] * batch, Pages(buf), meta))
                           for m, buf in layers], layer_bytes + rows),
    }
    with torch.inference_mode():
        check = {}
        for enabled in (False, True):
            mla_decode.ENABLED = enabled
            check[enabled] = layers[0][0].attend_absorbed(q_nope, q_pe, layers[0][1], meta)
        err = rel_err(check[True], check[False])
        for scope, (fn, nbytes) in scopes.items():
            row = dict(scope=scope, batch=batch, context=context, bound_us=nbytes / bw * 1e6, rel_err=err)
            for name, enabled in (("torch", False), ("triton", True)):
                mla_decode.ENABLED = enabled
                # the graph recomputes the per-step gather indices and masks, as the engine's does
                row[f"{name}_graph_us"] = graph_ms(fn, before_capture=meta.forget) / n * 1e3
                row[f"{name}_eager_us"] = eager_ms(fn) / n * 1e3
            mla_decode.ENABLED = True
            yield row


def sweep(layers, a: ModelArgs, batch: int, context: int) -> list[dict]:
    """decode_latent alone under each Config: µs per layer in a graph, and its output against the default's."""
    h, r = a.num_attention_heads, a.kv_lora_rank
    meta = decode_meta(batch, context)
    g = torch.Generator(device=DEV).manual_seed(1)
    q_lat = torch.randn(batch, h, r, device=DEV, generator=g).bfloat16()
    q_pe = torch.randn(batch, h, a.qk_rope_head_dim, device=DEV, generator=g).bfloat16()
    scale = layers[0][0].scale

    def run(cfg):
        return [mla_decode.decode_latent(q_lat, q_pe, buf, meta.block_tables, meta.context_lens, BS, scale,
                                         config=cfg) for _, buf in layers]

    base = run(mla_decode.DEFAULT)[0]
    out = []
    for cfg in SWEEP:
        try:
            err = rel_err(run(cfg)[0], base)
            us = graph_ms(lambda cfg=cfg: run(cfg)) / len(layers) * 1e3
        except Exception as e:  # a tile too big for shared memory or registers on this GPU
            out.append(dict(batch=batch, context=context, config=cfg, error=type(e).__name__))
            continue
        out.append(dict(batch=batch, context=context, config=cfg, us=us, rel_err=err))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 4096])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    a = ModelArgs.from_dict(PRESETS["deepseek-v3"])
    bw = copy_bandwidth()
    slots = (1 + max(args.batches) * -(-max(args.contexts) // BS)) * BS
    layers = build_layers(a, args.layers, slots)
    print(f"{torch.cuda.get_device_name()}, copy bandwidth {bw / 1e9:.0f} GB/s, DeepSeek-V3 MLA, bf16, "
          f"{args.layers} layers per graph", flush=True)
    print("| scope | batch | context | torch graph µs | triton graph µs | speed-up | torch eager µs | "
          "triton eager µs | bound µs | triton graph / bound | rel. diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for b in args.batches:
        for c in args.contexts:
            for row in measure(layers, a, b, c, bw):
                rows.append(row)
                print(f"| {row['scope']} | {b} | {c} | {row['torch_graph_us']:.1f} | {row['triton_graph_us']:.1f} | "
                      f"{row['torch_graph_us'] / row['triton_graph_us']:.2f}x | {row['torch_eager_us']:.1f} | "
                      f"{row['triton_eager_us']:.1f} | {row['bound_us']:.1f} | "
                      f"{row['bound_us'] / row['triton_graph_us']:.0%} | {row['rel_err']:.1e} |", flush=True)
    sweeps = []
    if args.sweep:
        print("\n| batch | context | block_h | block_n | warps | stages | kernel µs/layer | rel. diff to default |")
        print("|---|---|---|---|---|---|---|---|")
        for b in args.batches:
            for c in args.contexts:
                for row in sweep(layers, a, b, c):
                    sweeps.append({**row, "config": dataclasses.astuple(row["config"])})
                    cells = " | ".join(str(v) for v in sweeps[-1]["config"])
                    tail = f"{row['us']:.1f} | {row['rel_err']:.1e}" if "us" in row else f"{row['error']} | -"
                    print(f"| {b} | {c} | {cells} | {tail} |", flush=True)
    if args.json:
        print(json.dumps(dict(device=torch.cuda.get_device_name(), copy_gbs=bw / 1e9, rows=rows, sweep=sweeps)))


if __name__ == "__main__":
    main()
