"""Decode step time on one GPU, CUDA graphs against eager, and both against the HBM bound of the same run.

Models: the attention shapes of Qwen3-30B-A3B (GQA 32/4 heads, head_dim 128, q/k norm) and DeepSeek-V2-Lite
(MLA, kv_lora_rank 512, absorbed decode), with dense MLPs (the preset's intermediate_size) in every layer, so
the whole step is on the GPU and the figure is attention + KV + the decode loop (routed experts on the CPU are
bench/e2e.py's). Random weights (tandem synth), bf16, the paged KV cache, greedy sampling of the real engine.

Bound: one decode step reads every weight once plus each sequence's K/V (or latent) of every layer; bytes /
copy bandwidth measured here. Usage: python bench/decode_graphs.py [--layers 16] [--steps 32] [--json]

`--moe`: instead, Qwen3-30B-A3B layers with their routed experts on the GPU too (experts.marlin in each
`--formats` entry: int4_g32 Triton blocks, bf16), the RoPE and router operators on the GPU: the all-GPU MoE
placement whose decode the graphs capture. Its bound reads the non-expert weights, the experts a step routes to
(expected distinct experts of B tokens under uniform routing) and the K/V.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import tandem
from tandem.engine import Engine, EngineConfig, SamplingParams, Sequence
from tandem.synth import PRESETS, synthesize


def dense_presets(layers: int) -> dict[str, dict]:
    q = {**PRESETS["qwen3-30b-a3b"], "num_hidden_layers": layers, "mlp_only_layers": list(range(layers))}
    ds = {**PRESETS["deepseek-v2-lite"], "num_hidden_layers": layers, "first_k_dense_replace": layers}
    return {"qwen3-30b-a3b-attn": q, "deepseek-v2-lite-attn": ds}


MOE_RULES = """
- match: {{name: "\\\\.experts$"}}
  replace:
    class: tandem.ops.Experts
    kwargs: {{generate_device: "cuda:0", prefill_device: "cuda:0", out_device: "cuda:0", generate_op: "experts.marlin",
             prefill_op: "experts.marlin", weight_format: "{fmt}"}}
  recursive: false
- match: {{name: "rotary_emb$"}}
  replace: {{class: rope, kwargs: {{generate_device: "cuda:0", prefill_device: "cuda:0"}}}}
- match: {{name: "\\\\.gate$"}}
  replace: {{class: gate, kwargs: {{generate_device: "cuda:0", prefill_device: "cuda:0"}}}}
- match: {{name: ".*"}}
  replace: {{class: default, kwargs: {{generate_device: "cuda:0", prefill_device: "cuda:0"}}}}
"""


def moe_models(layers: int, formats: list[str], tmp: Path):
    """(name, loaded LLM, expert bytes read per step for batch B) per format, one synthesized checkpoint."""
    from tandem.ops.experts import ExpertsOp

    path = synthesize("qwen3-30b-a3b", Path(tmp) / "qwen3-moe", layers=layers, progress=False)
    for fmt in formats:
        rules = Path(tmp) / f"rules-{fmt}.yaml"
        rules.write_text(MOE_RULES.format(fmt=fmt))
        llm = tandem.load(path, rules=str(rules), dtype="bfloat16", progress=False)
        ops = [m for m in llm.model.modules() if isinstance(m, ExpertsOp)]
        per_expert = sum(o.backends["generate"].w13.nbytes() + o.backends["generate"].w2.nbytes() for o in ops)
        a = llm.model.args
        e, k = a.num_experts, a.num_experts_per_tok

        def expert_bytes(batch: int, per_expert=per_expert / e, e=e, k=k) -> float:
            return per_expert * e * (1 - (1 - k / e) ** batch)  # expected distinct experts, every layer

        yield f"qwen3-30b-a3b-moe-{fmt}", llm, expert_bytes
        del llm, ops
        torch.cuda.empty_cache()


def copy_bandwidth(gib: float = 4.0) -> float:
    """HBM bytes/s of a device-to-device copy (read + write counted)."""
    x = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 5 / (time.perf_counter() - t)


def kv_bytes_per_token(llm) -> int:
    a = llm.model.args
    per_layer = (a.kv_lora_rank + a.qk_rope_head_dim) if hasattr(a, "kv_lora_rank") else (
        2 * a.num_key_value_heads * (a.head_dim or a.hidden_size // a.num_attention_heads))
    return per_layer * a.num_hidden_layers * 2  # bf16


def step_time(llm, batch: int, context: int, steps: int, graphs: bool) -> float:
    """Seconds per decode step (whole engine step: graph or layers, logits, sampling) at `context` tokens."""
    cfg = EngineConfig(max_batch=batch, kv_tokens=batch * (context + steps + 32), block_size=16,
                       prefill_chunk=context, cuda_graphs=graphs)
    engine = Engine(llm.model, [], None, cfg)
    g = torch.Generator().manual_seed(0)
    for _ in range(batch):
        prompt = torch.randint(0, llm.model.args.vocab_size, (context,), generator=g).tolist()
        engine.add(Sequence(prompt, SamplingParams(max_new_tokens=steps + 8, ignore_eos=True)))
    for _ in range(4):  # prefill, then decode steps that capture the graphs
        engine.step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / steps
    if graphs and engine.graphs.disabled:
        raise RuntimeError(f"graphs were expected: {engine.graphs.disabled}")
    return dt


def dense_models(layers: int, tmp: Path):
    for name, config in dense_presets(layers).items():
        PRESETS[name] = config  # a bench-only preset: synth writes any config in PRESETS
        path = synthesize(name, Path(tmp) / name, progress=False)
        yield name, tandem.load(path, dtype="bfloat16", device="cuda", progress=False), lambda batch: 0.0
        torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--moe", action="store_true", help="Qwen3-30B-A3B MoE layers, routed experts on the GPU")
    p.add_argument("--formats", default="int4_g32,bf16", help="experts.marlin weight formats for --moe")
    p.add_argument("--shapes", default="1x512,8x512,1x4096,8x4096", help="batch x context of each row")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    bw = copy_bandwidth()
    rows = []
    print(f"{torch.cuda.get_device_name()}, copy bandwidth {bw / 1e9:.0f} GB/s, {args.layers} layers, bf16")
    print("| model | batch | context | eager ms/step | graph ms/step | speed-up | graph tok/s | bound ms | "
          "graph / bound |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        models = moe_models(args.layers, args.formats.split(","), tmp) if args.moe else dense_models(args.layers,
                                                                                                     tmp)
        for name, llm, expert_bytes in models:
            embed = llm.model.model.embed_tokens.weight  # decode reads B rows of it, not all
            weights = sum(t.numel() * t.element_size() for t in llm.model.parameters()) - embed.nbytes
            for batch, context in shapes:
                eager = step_time(llm, batch, context, args.steps, graphs=False)
                graph = step_time(llm, batch, context, args.steps, graphs=True)
                read = weights + expert_bytes(batch) + batch * (context + args.steps) * kv_bytes_per_token(llm)
                bound = read / bw
                rows.append(dict(model=name, batch=batch, context=context, eager_ms=eager * 1e3,
                                 graph_ms=graph * 1e3, bound_ms=bound * 1e3, graph_tok_s=batch / graph,
                                 eager_tok_s=batch / eager))
                print(f"| {name} | {batch} | {context} | {eager * 1e3:.2f} | {graph * 1e3:.2f} | "
                      f"{eager / graph:.2f}x | {batch / graph:.0f} | {bound * 1e3:.2f} | {bound / graph:.0%} |",
                      flush=True)
            del llm
    if args.json:
        print(json.dumps({"device": torch.cuda.get_device_name(), "copy_gbs": bw / 1e9, "layers": args.layers,
                          "rows": rows}))


if __name__ == "__main__":
    main()
