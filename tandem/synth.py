"""`tandem synth PRESET --out DIR`: random weights in the exact shapes of a named model, written at disk speed.

Tensors stream to disk in safetensors format from a pool of random values (sampled once, scaled per tensor), so
a DeepSeek-V3 layer (~23 GB) never sits in RAM. Scales keep activations O(1): linear weights ~ N(0, 1/fan_in).
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tandem.models import build_model
from tandem.weights.loader import tensors_of
from tandem.weights.safetensors import DTYPE_NAMES

_YARN_V3 = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
_DEEPSEEK_V3 = dict(
    model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], vocab_size=129280, hidden_size=7168,
    intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
    num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256, routed_scaling_factor=2.5,
    kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128,
    topk_method="noaux_tc", scoring_func="sigmoid", n_group=8, topk_group=4, num_experts_per_tok=8,
    first_k_dense_replace=3, norm_topk_prob=True, max_position_embeddings=163840, rope_theta=10000.0,
    rope_scaling=_YARN_V3, rms_norm_eps=1e-6, tie_word_embeddings=False,
)
_QWEN3_MOE = dict(
    model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], vocab_size=151936, head_dim=128,
    num_key_value_heads=4, num_experts_per_tok=8, norm_topk_prob=True, rope_theta=1000000.0,
    max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False, decoder_sparse_step=1,
    mlp_only_layers=[],
)

PRESETS: dict[str, dict] = {
    "deepseek-v3": _DEEPSEEK_V3,
    "kimi-k2": {**_DEEPSEEK_V3, "model_type": "kimi_k2", "vocab_size": 163840, "n_routed_experts": 384,
                "num_attention_heads": 64, "num_key_value_heads": 64, "first_k_dense_replace": 1, "n_group": 1,
                "topk_group": 1, "routed_scaling_factor": 2.827, "rope_theta": 50000.0,
                "max_position_embeddings": 131072, "rope_scaling": {**_YARN_V3, "factor": 32.0}},
    "deepseek-v2-lite": dict(
        model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"], vocab_size=102400, hidden_size=2048,
        intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16,
        num_key_value_heads=16, n_shared_experts=2, n_routed_experts=64, routed_scaling_factor=1.0,
        kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128,
        topk_method="greedy", n_group=1, topk_group=1, num_experts_per_tok=6, first_k_dense_replace=1,
        norm_topk_prob=False, max_position_embeddings=163840, rope_theta=10000.0, rms_norm_eps=1e-6,
        rope_scaling={**_YARN_V3, "mscale": 0.707, "mscale_all_dim": 0.707}, tie_word_embeddings=False,
    ),
    "qwen3-30b-a3b": {**_QWEN3_MOE, "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
                      "num_hidden_layers": 48, "num_attention_heads": 32, "num_experts": 128},
    "qwen3-235b-a22b": {**_QWEN3_MOE, "hidden_size": 4096, "intermediate_size": 12288,
                        "moe_intermediate_size": 1536, "num_hidden_layers": 94, "num_attention_heads": 64,
                        "num_experts": 128},
    "qwen2-57b-a14b": dict(
        model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"], vocab_size=151936, hidden_size=3584,
        intermediate_size=18944, moe_intermediate_size=2560, shared_expert_intermediate_size=20480,
        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, num_experts=64,
        num_experts_per_tok=8, norm_topk_prob=False, rope_theta=1000000.0, max_position_embeddings=32768,
        rms_norm_eps=1e-6, tie_word_embeddings=False, decoder_sparse_step=1,
    ),
    "mixtral-8x7b": dict(
        model_type="mixtral", architectures=["MixtralForCausalLM"], vocab_size=32000, hidden_size=4096,
        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        num_local_experts=8, num_experts_per_tok=2, rope_theta=1000000.0, max_position_embeddings=32768,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
    ),
}

_TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False)
PRESETS |= {
    "tiny-llama": {**_TINY, "model_type": "llama", "architectures": ["LlamaForCausalLM"], "rope_theta": 10000.0},
    "tiny-mixtral": {**_TINY, "model_type": "mixtral", "architectures": ["MixtralForCausalLM"],
                     "num_local_experts": 4, "num_experts_per_tok": 2, "rope_theta": 1e6},
    "tiny-qwen2-moe": {**_TINY, "model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"],
                       "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64, "num_experts": 8,
                       "num_experts_per_tok": 2, "rope_theta": 1e6},
    "tiny-qwen3-moe": {**_TINY, "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"],
                       "head_dim": 16, "moe_intermediate_size": 32, "num_experts": 8, "num_experts_per_tok": 2,
                       "norm_topk_prob": True, "rope_theta": 1e6},
    "tiny-deepseek-v2": {**PRESETS["deepseek-v2-lite"], **_TINY, "num_key_value_heads": 4,
                         "moe_intermediate_size": 32, "n_routed_experts": 8, "num_experts_per_tok": 2,
                         "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16,
                         "rope_scaling": {**PRESETS["deepseek-v2-lite"]["rope_scaling"],
                                          "original_max_position_embeddings": 256}},
    "tiny-deepseek-v3": {**_DEEPSEEK_V3, **_TINY, "num_key_value_heads": 4, "moe_intermediate_size": 32,
                         "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1,
                         "kv_lora_rank": 16, "q_lora_rank": 24, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16,
                         "v_head_dim": 16, "first_k_dense_replace": 1,
                         "rope_scaling": {**_YARN_V3, "original_max_position_embeddings": 256}},
}

SHARD_BYTES = 4 << 30
POOL = 1 << 22  # random values sampled once per scale; tensors copy windows of it
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def preset_config(name: str, layers: int | None = None, dtype: str = "bfloat16") -> dict:
    """config.json of preset `name`; `layers` keeps the per-layer shapes and cuts the depth."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    config = dict(PRESETS[name], dtype=dtype, torch_dtype=dtype, bos_token_id=None, eos_token_id=0)
    if layers is not None:
        if layers <= 0:
            raise ValueError(f"--layers must be positive, got {layers}")
        config["num_hidden_layers"] = layers
        if "first_k_dense_replace" in config:  # keep at least one MoE layer
            config["first_k_dense_replace"] = min(config["first_k_dense_replace"], layers - 1)
    return config


def init_scale(name: str, shape: tuple[int, ...]) -> float:
    """Standard deviation of a synthesized tensor: norms are 1, the correction bias 0, linears 1/sqrt(fan_in)."""
    if name.endswith(("norm.weight", "layernorm.weight")):
        return 0.0  # constant 1, see _write_tensor
    if name.endswith("e_score_correction_bias"):
        return 0.01
    if name.endswith("embed_tokens.weight"):
        return 1.0
    return 1.0 / math.sqrt(shape[-1])


class _Pools:
    def __init__(self, dtype: torch.dtype, seed: int):
        self.dtype, self.gen = dtype, torch.Generator().manual_seed(seed)
        self.rng = np.random.default_rng(seed)
        self.base = torch.randn(POOL, generator=self.gen)
        self.cache: dict[float, np.ndarray] = {}

    def bytes_of(self, scale: float) -> np.ndarray:
        if scale not in self.cache:
            t = torch.ones(POOL) if scale == 0.0 else self.base * scale
            self.cache[scale] = t.to(self.dtype).view(torch.uint8).numpy()
        return self.cache[scale]


def _write_tensor(f, pools: _Pools, nbytes: int, scale: float, bar) -> None:
    pool = pools.bytes_of(scale)
    item = pools.dtype.itemsize
    done = 0
    while done < nbytes:
        n = min(nbytes - done, len(pool) // 2)
        start = int(pools.rng.integers(0, (len(pool) - n) // item + 1)) * item
        f.write(memoryview(pool[start : start + n]))
        done += n
        bar.update(n)


def synthesize(preset: str, out: Path, layers: int | None = None, seed: int = 0, dtype: str = "bfloat16",
               progress: bool = True) -> Path:
    """Write config.json, tokenizer files and random safetensors for `preset` into `out`; returns `out`."""
    tdtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(dtype)
    if tdtype is None:
        raise ValueError(f"--dtype must be bfloat16, float16 or float32, got {dtype!r}")
    config = preset_config(preset, layers, dtype)
    model = build_model(config)
    tensors = [(name, tuple(t.shape)) for name, _, _, t in tensors_of(model)]
    out.mkdir(parents=True, exist_ok=True)
    partial = out / ".partial"
    partial.mkdir(exist_ok=True)
    shards = _plan_shards(tensors, tdtype.itemsize)
    pools = _Pools(tdtype, seed)
    total = sum(math.prod(s) for _, s in tensors) * tdtype.itemsize
    weight_map = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"synth {preset}", disable=not progress) as bar:
        for i, shard in enumerate(shards):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _write_shard(partial / fname, shard, tdtype, pools, bar)
            weight_map |= {name: fname for name, _ in shard}
    for f in partial.iterdir():
        f.replace(out / f.name)
    partial.rmdir()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _write_tokenizer(out)
    return out


def _plan_shards(tensors: list[tuple[str, tuple]], itemsize: int) -> list[list[tuple[str, tuple]]]:
    shards, size = [[]], 0
    for name, shape in tensors:
        n = math.prod(shape) * itemsize
        if shards[-1] and size + n > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    return shards


def _write_shard(path: Path, tensors: list[tuple[str, tuple]], dtype: torch.dtype, pools: _Pools, bar) -> None:
    header, offset = {}, 0
    for name, shape in tensors:
        n = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape in tensors:
            _write_tensor(f, pools, math.prod(shape) * dtype.itemsize, init_scale(name, shape), bar)


def _write_tokenizer(out: Path) -> None:
    with resources.as_file(resources.files("tandem") / "assets" / "tokenizer.json") as src:
        shutil.copy(src, out / "tokenizer.json")
    cfg = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE,
           "tokenizer_class": "PreTrainedTokenizerFast"}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}, indent=2))


def run(args) -> int:
    if args.gguf:  # one .gguf file that llama.cpp loads (tandem/synth_gguf.py)
        from tandem.synth_gguf import synthesize_gguf

        out = synthesize_gguf(args.preset, Path(args.out), args.layers, args.quant, args.seed, sys.stderr.isatty())
        print(f"wrote {args.preset} ({args.quant}) to {out}")
        return 0
    out = synthesize(args.preset, Path(args.out), args.layers, args.seed, args.dtype, progress=sys.stderr.isatty())
    print(f"wrote {args.preset} to {out}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("synth", help="write a random-weight model in the exact shapes of a named one")
    p.add_argument("preset", help=", ".join(sorted(PRESETS)))
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--layers", type=int, default=None, help="keep per-layer shapes, use this many layers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 | float16 | float32")
    p.add_argument("--gguf", action="store_true", help="write one GGUF file (--out FILE) that llama.cpp loads")
    p.add_argument("--quant", default="Q4_K_M-like",
                   help="with --gguf: Q4_K_M-like | Q4_1 (routed experts; the rest BF16) | Q8_0 | BF16 | F16 | F32")
    p.set_defaults(func=run)
