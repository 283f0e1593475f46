"""`tandem profile-experts MODEL --prompts FILE --out stats.json`: how often each layer's router picks each
expert, counted by the real router while the engine runs the prompts on the CPU. The planner's
`--expert-stats` puts the most picked experts on the GPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a file: a JSON list of strings, or one prompt per non-empty line."""
    path = Path(path)
    text = path.read_text()
    if text.lstrip().startswith("["):
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--prompts {path}: invalid JSON ({e})") from None
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"--prompts {path}: expected a JSON list of strings")
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {path}: no prompts in it")
    return prompts


def profile_experts(llm, prompts: list[str], max_new_tokens: int = 16, progress: bool = False) -> dict:
    """{"tokens": n, "layers": {layer: [count per expert]}} over `prompts` run through `llm`'s engine."""
    from tandem.models.transformer import SparseMoE

    counts: dict[int, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(llm.model.model.layers):
        mlp = getattr(layer, getattr(layer, "mlp_name", "mlp"))
        if not isinstance(mlp, SparseMoE):
            continue
        counts[i] = torch.zeros(len(mlp.experts) if hasattr(mlp.experts, "__len__") else mlp.experts.num_experts,
                                dtype=torch.long)

        def hook(_m, _inp, out, i=i):
            counts[i] += torch.bincount(out[0].flatten().cpu(), minlength=counts[i].numel())

        hooks.append(mlp.gate.register_forward_hook(hook))
    tokens = 0
    try:
        for n, p in enumerate(prompts):
            out = llm.generate(p, max_new_tokens=max_new_tokens)
            tokens += out.prompt_tokens + len(out.token_ids)
            if progress:
                print(f"\rprofiled {n + 1}/{len(prompts)} prompts, {tokens} tokens", end="", file=sys.stderr)
    finally:
        for h in hooks:
            h.remove()
        if progress:
            print(file=sys.stderr)
    return {"tokens": tokens, "layers": {str(i): c.tolist() for i, c in counts.items()}}


def run(args) -> int:
    import tandem

    llm = tandem.load(args.model, dtype=args.dtype, progress=sys.stderr.isatty())
    stats = profile_experts(llm, read_prompts(args.prompts), args.max_new_tokens, progress=sys.stderr.isatty())
    if not stats["layers"]:
        raise ValueError(f"{args.model}: has no MoE layers to profile")
    stats["model"] = str(args.model)
    Path(args.out).write_text(json.dumps(stats))
    print(f"wrote routing counts of {len(stats['layers'])} layers over {stats['tokens']} tokens to {args.out}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("profile-experts", help="count how often each expert is routed to (for plan --expert-stats)")
    p.add_argument("model", help="model directory or .gguf file")
    p.add_argument("--prompts", required=True, help="prompts: a JSON list of strings or one per line")
    p.add_argument("--out", required=True, help="statistics file to write (JSON)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens generated per prompt (default 16)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the checkpoint's)")
    p.set_defaults(func=run)
