"""`tandem upcycle SRC --experts N --top-k K --out DIR`: a dense Llama-family model -> a Mixtral-architecture MoE.

Every expert is a copy of the layer's dense MLP and the router is random; Mixtral renormalises its top-k
weights to sum to 1, so the MoE computes exactly the dense model's function (up to rounding) while every token
goes through routing and the expert path. The output is a Hugging Face directory (config.json, safetensors,
tokenizer files) that tandem and transformers both load.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from tandem.checkpoint import open_checkpoint
from tandem.llm import DTYPES
from tandem.models import parse_args

MLP = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight$")
EXPERT_PROJ = {"gate": "w1", "down": "w2", "up": "w3"}
SHARD_BYTES = 4 << 30


def upcycled_config(config: dict, experts: int, top_k: int, dtype: torch.dtype) -> dict:
    """The Mixtral config.json of dense Llama `config` with `experts` copies of its MLP, `top_k` per token."""
    if config.get("model_type") not in ("llama", "mistral"):
        kind = config.get("model_type")
        raise ValueError(f"upcycle takes a dense Llama-family model; this one is model_type={kind!r}")
    if not 1 <= top_k <= experts:
        raise ValueError(f"--top-k {top_k} must be between 1 and --experts {experts}")
    a = parse_args(config)
    if a.attention_bias or a.mlp_bias:
        raise ValueError("upcycle: Mixtral has no attention or MLP biases, and this model has them")
    keep = ("rope_theta", "rope_scaling", "rope_parameters", "bos_token_id", "eos_token_id", "pad_token_id")
    return {
        "model_type": "mixtral", "architectures": ["MixtralForCausalLM"],
        "vocab_size": a.vocab_size, "hidden_size": a.hidden_size, "intermediate_size": a.intermediate_size,
        "num_hidden_layers": a.num_hidden_layers, "num_attention_heads": a.num_attention_heads,
        "num_key_value_heads": a.num_key_value_heads, "head_dim": a.head_dim, "rms_norm_eps": a.rms_norm_eps,
        "max_position_embeddings": a.max_position_embeddings, "hidden_act": a.hidden_act,
        "tie_word_embeddings": a.tie_word_embeddings, "num_local_experts": experts, "num_experts_per_tok": top_k,
        "router_aux_loss_coef": 0.0, "dtype": str(dtype).removeprefix("torch."),
        **{k: config[k] for k in keep if config.get(k) is not None},
    }


def upcycle(src: str | Path, out: str | Path, experts: int, top_k: int, dtype: str | None = None,
            seed: int = 0) -> Path:
    """Write the upcycled MoE of dense model `src` (HF directory or GGUF) to directory `out`."""
    ckpt = open_checkpoint(src)
    name = dtype or ckpt.config.get("dtype") or ckpt.config.get("torch_dtype") or "bfloat16"
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r} is not one of {', '.join(DTYPES)}")
    dt = DTYPES[name]
    config = upcycled_config(ckpt.config, experts, top_k, dt)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0

    def put(key: str, t: torch.Tensor) -> None:
        nonlocal size
        if size + t.nbytes > SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += t.nbytes

    for key in ckpt.source.names():
        t = ckpt.source.get(key, dtype=dt)
        m = MLP.match(key)
        if m is None:
            put(key, t)
            continue
        base = f"model.layers.{m[1]}.block_sparse_moe"
        for e in range(experts):  # copies: safetensors refuses tensors that share memory
            put(f"{base}.experts.{e}.{EXPERT_PROJ[m[2]]}.weight", t if e == 0 else t.clone())
        if m[2] == "gate":  # a random router: which experts a token picks varies, the output does not
            router = torch.randn(experts, config["hidden_size"], generator=gen) * config["hidden_size"] ** -0.5
            put(f"{base}.gate.weight", router.to(dt))
    _write_shards(out, shards)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if ckpt.tokenizer is not None:
        _write_tokenizer(out, ckpt.tokenizer)
    return out


def _write_shards(out: Path, shards: list[dict[str, torch.Tensor]]) -> None:
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}, indent=1))


def _write_tokenizer(out: Path, tok) -> None:
    tok.tok.save(str(out / "tokenizer.json"))
    cfg = dict(tok.special)
    if tok.chat_template:
        cfg["chat_template"] = tok.chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    if tok.eos_ids:
        (out / "generation_config.json").write_text(json.dumps({"eos_token_id": tok.eos_ids}) + "\n")


def run(args) -> int:
    out = upcycle(args.src, args.out, args.experts, args.top_k, args.dtype, args.seed)
    print(f"wrote {out}: Mixtral with {args.experts} experts ({args.top_k} per token), copies of {args.src}'s MLP",
          file=sys.stderr)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("upcycle", help="turn a dense Llama-family model into a Mixtral MoE with equal outputs")
    p.add_argument("src", help="dense model: a Hugging Face directory or a .gguf file")
    p.add_argument("--experts", type=int, required=True, help="experts per layer (copies of the dense MLP)")
    p.add_argument("--top-k", type=int, required=True, help="experts each token is routed to")
    p.add_argument("--out", required=True, help="output directory (Hugging Face layout)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the source's, else bf16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random router")
    p.set_defaults(func=run)
