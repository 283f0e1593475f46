"""`tandem synth PRESET --out DIR`: random weights in the exact shapes of a named model, written at disk speed.

Tensors stream to disk in safetensors format from a pool of random values (sampled once, scaled per tensor), so
a DeepSeek-V3 layer (~23 GB) never sits in RAM. Scales keep activations O(1): linear weights ~ N(0, 1/fan_in).
`--fp8` writes the layers' linears as DeepSeek-V3's release stores them: float8_e4m3fn values with
`<name>_scale_inv` (fp32, one per 128 x 128 block, w = q * scale) and the config's quantization_config.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
import sys
from dataclasses import dataclass
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


FP8 = torch.float8_e4m3fn
FP8_BLOCK = 128
FP8_SPREAD = 64.0  # FP8 values ~ N(0, 64^2), clipped to E4M3's +-448; the block scale brings them to the tensor's
FP8_LINEAR = re.compile(r"^model\.layers\.\d+\..*\.(q_proj|k_proj|v_proj|o_proj|q_a_proj|q_b_proj|"
                        r"kv_a_proj_with_mqa|kv_b_proj|gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
              "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}


class _Pools:
    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)
        self.rng = np.random.default_rng(seed)
        self.base = torch.randn(POOL, generator=self.gen)
        self.cache: dict[tuple, np.ndarray] = {}

    def bytes_of(self, scale: float, dtype: torch.dtype) -> np.ndarray:
        if (scale, dtype) not in self.cache:
            t = torch.ones(POOL) if scale == 0.0 else self.base * scale
            if dtype == FP8:
                t = t.clamp(-448, 448)  # E4M3 has no infinity: out of range would be NaN
            self.cache[scale, dtype] = t.to(dtype).view(torch.uint8).numpy()
        return self.cache[scale, dtype]


@dataclass(frozen=True, slots=True)
class _Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    scale: float  # standard deviation of the random values, or the value itself when constant
    constant: bool = False

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _tensor_list(model, dtype: torch.dtype, fp8: bool) -> list[_Tensor]:
    """Every tensor to write; with fp8, a layer's linear with whole 128-value blocks along its input is FP8 values
    (spread FP8_SPREAD) and its block scales (constant: init_scale / FP8_SPREAD)."""
    out = []
    for name, _, _, t in tensors_of(model):
        shape = tuple(t.shape)
        if fp8 and FP8_LINEAR.match(name) and len(shape) == 2 and shape[1] % FP8_BLOCK == 0:
            blocks = (-(-shape[0] // FP8_BLOCK), shape[1] // FP8_BLOCK)
            out += [_Tensor(name, shape, FP8, FP8_SPREAD),
                    _Tensor(name + "_scale_inv", blocks, torch.float32, init_scale(name, shape) / FP8_SPREAD, True)]
        else:
            out.append(_Tensor(name, shape, dtype, init_scale(name, shape)))
    return out


def _write_tensor(f, pools: _Pools, t: _Tensor, bar) -> None:
    if t.constant:
        f.write(torch.full(t.shape, t.scale, dtype=t.dtype).view(torch.uint8).numpy().tobytes())
        bar.update(t.nbytes)
        return
    pool, nbytes = pools.bytes_of(t.scale, t.dtype), t.nbytes
    item = t.dtype.itemsize
    done = 0
    while done < nbytes:
        n = min(nbytes - done, len(pool) // 2)
        start = int(pools.rng.integers(0, (len(pool) - n) // item + 1)) * item
        f.write(memoryview(pool[start : start + n]))
        done += n
        bar.update(n)


def synthesize(preset: str, out: Path, layers: int | None = None, seed: int = 0, dtype: str = "bfloat16",
               progress: bool = True, fp8: bool = False) -> Path:
    """Write config.json, tokenizer files and random safetensors for `preset` into `out`; returns `out`. fp8: the
    layers' linears as an FP8 checkpoint stores them (module docstring)."""
    tdtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(dtype)
    if tdtype is None:
        raise ValueError(f"--dtype must be bfloat16, float16 or float32, got {dtype!r}")
    config = preset_config(preset, layers, dtype)
    model = build_model(config)
    tensors = _tensor_list(model, tdtype, fp8)
    if fp8:
        config["quantization_config"] = FP8_CONFIG
    out.mkdir(parents=True, exist_ok=True)
    partial = out / ".partial"
    partial.mkdir(exist_ok=True)
    shards = _plan_shards(tensors)
    pools = _Pools(seed)
    total = sum(t.nbytes for t in tensors)
    weight_map = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"synth {preset}", disable=not progress) as bar:
        for i, shard in enumerate(shards):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _write_shard(partial / fname, shard, pools, bar)
            weight_map |= {t.name: fname for t in shard}
    for f in partial.iterdir():
        f.replace(out / f.name)
    partial.rmdir()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _write_tokenizer(out)
    return out


def _plan_shards(tensors: list[_Tensor]) -> list[list[_Tensor]]:
    shards, size = [[]], 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _write_shard(path: Path, tensors: list[_Tensor], pools: _Pools, bar) -> None:
    header, offset = {}, 0
    for t in tensors:
        header[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors:
            _write_tensor(f, pools, t, bar)


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
    out = synthesize(args.preset, Path(args.out), args.layers, args.seed, args.dtype, progress=sys.stderr.isatty(),
                     fp8=args.fp8)
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
    p.add_argument("--fp8", action="store_true", help="the layers' linears in FP8 E4M3 with 128 x 128 block scales, "
                   "as DeepSeek-V3's release stores them")
    p.add_argument("--quant", default="Q4_K_M-like",
                   help="with --gguf: Q4_K_M-like | Q4_1 (routed experts; the rest BF16) | Q8_0 | BF16 | F16 | F32")
    p.set_defaults(func=run)
