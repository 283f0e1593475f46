"""`tandem synth PRESET --gguf`: random weights in the exact shapes of a named model, as a GGUF file llama.cpp loads.

The file is what llama.cpp's converter (convert_hf_to_gguf.py) and llama-quantize would write for that model:
its tensor names (blk.N.ffn_gate_exps, stacked experts [E, out, in], DeepSeek's kv_b split into attn_k_b /
attn_v_b), its metadata keys and value types per architecture, the tokenizer (tandem/assets/tokenizer.json as
tokenizer.ggml.*, padded with [PADn] tokens to the model's vocabulary) and the chat template. Types follow a
recipe: F32 / F16 / BF16 / Q8_0 everywhere, Q4_K_M-like, llama-quantize's Q4_K_M choices restated (see
`tensor_type`), or Q4_1: routed experts (ffn_*_exps) in Q4_1 and every other matrix BF16, the file a CPU-expert
benchmark wants (tandem runs Q4_1 experts as int4_g32, the same layout), or Q4_1-Q8_0: the same experts, every
other matrix Q8_0 (hybrid CPU/GPU quants of DeepSeek keep attention and shared experts at 8 bits). Norms, biases
and routers stay F32, as llama.cpp keeps them.

Tensors stream to disk in constant memory: each (type, scale) gets a pool of valid random blocks, sampled once,
and a tensor is written as windows of whole blocks of its pool. Quantized blocks are made directly (random quants,
scale fields chosen so the weights have the intended standard deviation and zero mean) rather than by quantizing
floats: the weights are random anyway, and every block is a valid one of its type, so kernels, dequantizers and
llama.cpp read them as they would a real file; only the value distribution is uniform rather than normal. Q4_1
pools are the exception: normal floats quantized with ggml's reference rounding (`quantize_q4_1`).
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tandem.models import build_model
from tandem.synth import CHAT_TEMPLATE, init_scale, preset_config
from tandem.weights.gguf import GLOBAL, LAYER, MIXTRAL_EXPERT
from tandem.weights.gguf_file import ARRAY as ARR
from tandem.weights.gguf_file import BOOL, SCALARS
from tandem.weights.gguf_file import STRING as STR
from tandem.weights.gguf_quants import NAMES, TYPES
from tandem.weights.loader import tensors_of

ALIGN = 32
POOL_VALUES = 1 << 22  # values per pool; tensors copy windows of it
ARCH = {"llama": "llama", "mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe",
        "deepseek_v2": "deepseek2", "deepseek_v3": "deepseek2", "kimi_k2": "deepseek2"}
# ggml type: (id, values per block, bytes per block)
GGML = {name: (NAMES[name], TYPES[NAMES[name]].block, TYPES[NAMES[name]].bytes)
        for name in ("F32", "F16", "Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "BF16")}
# --quant -> (llama_ftype of general.file_type, type of the weight matrices)
QUANTS = {"F32": (0, "F32"), "F16": (1, "F16"), "BF16": (32, "BF16"), "Q8_0": (7, "Q8_0"),
          "Q4_K_M-like": (15, "Q4_K"), "Q4_1": (3, "BF16"), "Q4_1-Q8_0": (3, "Q8_0")}
# --quant -> type of the routed experts (ffn_*_exps) where it differs
EXPERT_QUANTS = {"Q4_1": "Q4_1", "Q4_1-Q8_0": "Q4_1"}
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}  # llama-quantize, for rows not of whole 256-blocks
U32, I32, F32 = 4, 5, 6  # GGUF metadata value types this writer uses besides BOOL, STR, ARR (the reader's table)
CONTROL, NORMAL, UNUSED = 3, 1, 5


@dataclass(frozen=True, slots=True)
class Spec:
    """One GGUF tensor to write: name, shape (outermost first), ggml type name, weight std (0: constant 1)."""

    name: str
    shape: tuple[int, ...]
    type: str
    scale: float

    @property
    def nbytes(self) -> int:
        _, block, size = GGML[self.type]
        return math.prod(self.shape) // block * size


# ---------------------------------------------------------------------------------------- tensor names and types


def _gguf_layer_names(model_type: str) -> dict[str, str]:
    """HF suffix under model.layers.N -> GGUF kind, the inverse of tandem.weights.gguf.LAYER for one family."""
    mlp = "block_sparse_moe" if model_type == "mixtral" else "mlp"
    shared = "shared_expert" if model_type == "qwen2_moe" else "shared_experts"
    return {hf.format(mlp=mlp, shared=shared): kind for kind, hf in LAYER.items()}


def _hf_tensors(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    return [(name, tuple(t.shape)) for name, _, _, t in tensors_of(build_model(config))]


def gguf_tensors(config: dict, quant: str) -> list[Spec]:
    """The tensors of `config`'s model as llama.cpp names and shapes them, each with its type under `quant`."""
    if quant not in QUANTS:
        raise ValueError(f"--quant must be one of {', '.join(QUANTS)}, got {quant!r}")
    model_type = config["model_type"]
    layer_kind = _gguf_layer_names(model_type)
    glob = {hf: g for g, hf in GLOBAL.items()}
    experts: dict[str, list] = {}  # blk.N.ffn_gate_exps -> [shape of one expert, count, scale]
    order: list[tuple[str, tuple[int, ...], float]] = []
    for name, shape in _hf_tensors(config):
        scale = init_scale(name, shape)
        if name in glob:
            order.append((glob[name], shape, scale))
            continue
        m = re.match(r"model\.layers\.(\d+)\.(.+)\.(weight|bias|e_score_correction_bias)$", name)
        if m is None:
            raise ValueError(f"synth --gguf: no GGUF name for tensor {name}")
        i, rest, what = m[1], m[2], m[3]
        e = re.match(r".+\.experts\.\d+\.(\w+)$", rest)
        if e:
            proj = {v: k for k, v in MIXTRAL_EXPERT.items()}.get(e[1], "ffn_" + e[1].removesuffix("_proj"))
            key = f"blk.{i}.{proj}_exps.weight"
            if key not in experts:
                experts[key] = [shape, 0, scale]
                order.append((key, (), scale))  # shape filled in below, once the experts are counted
            experts[key][1] += 1
        elif what == "e_score_correction_bias":
            order.append((f"blk.{i}.exp_probs_b.bias", shape, scale))
        elif rest.endswith("kv_b_proj"):  # convert_hf_to_gguf.py's MLA split: k_b [H, r, nope], v_b [H, v, r]
            h, nope, v = config["num_attention_heads"], config["qk_nope_head_dim"], config["v_head_dim"]
            r = shape[1]
            order.append((f"blk.{i}.attn_k_b.weight", (h, r, nope), scale))
            order.append((f"blk.{i}.attn_v_b.weight", (h, v, r), scale))
        elif rest.endswith("shared_expert_gate"):  # Qwen2-MoE: llama.cpp's ffn_gate_inp_shexp is a vector
            order.append((f"blk.{i}.ffn_gate_inp_shexp.weight", (shape[1],), scale))
        else:
            order.append((f"blk.{i}.{layer_kind[rest]}.{what}", shape, scale))
    n_layer, n_expert = config["num_hidden_layers"], _n_experts(config)
    specs = []
    for name, shape, scale in order:
        if name in experts:
            one, count, _ = experts[name]
            shape = (count, *one)
        specs.append(Spec(name, shape, tensor_type(name, shape, quant, n_layer, n_expert), scale))
    return specs


def _n_experts(config: dict) -> int:
    return int(config.get("num_experts") or config.get("n_routed_experts") or config.get("num_local_experts") or 0)


def _more_bits(i: int, n: int) -> bool:
    """llama-quantize's use_more_bits: the first and last eighth of the layers and every third one between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_type(name: str, shape: tuple[int, ...], quant: str, n_layer: int, n_expert: int) -> str:
    """The ggml type of tensor `name` under `quant`: llama-quantize's choice for the same tensor (llama-quant.cpp).

    Vectors, norms, biases and routers (ffn_gate_inp) stay F32. Q4_1: routed experts Q4_1 (F16 where a row is
    not whole blocks of 32), the rest BF16 (Q4_1-Q8_0: Q8_0). Q4_K_M: output Q6_K; attn_v / attn_kv_b and every
    ffn_down* (experts, shared, dense) Q6_K in the "more bits" layers, else Q4_K; 8-expert models (Mixtral)
    attn_v and attn_k Q8_0 and attn_output Q5_K; everything else Q4_K. A row that is not whole blocks of the type
    falls back as llama-quantize does (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, then F16).
    """
    if len(shape) < 2 or "_norm." in name or "ffn_gate_inp" in name or not name.endswith("weight"):
        return "F32"
    if quant in EXPERT_QUANTS and "_exps." in name:
        return _fit(EXPERT_QUANTS[quant], shape[-1])
    ftype_type = QUANTS[quant][1]
    if quant != "Q4_K_M-like":
        return _fit(ftype_type, shape[-1])
    m = re.match(r"blk\.(\d+)\.", name)
    layer = int(m[1]) if m else 0
    t = "Q4_K"
    if name == "output.weight":
        t = "Q6_K" if shape[-1] % 256 == 0 else "Q8_0"
    elif ".attn_v." in name or ".attn_kv_b." in name:
        t = "Q8_0" if n_expert == 8 else "Q6_K" if _more_bits(layer, n_layer) else "Q4_K"
    elif ".attn_k." in name and n_expert == 8:
        t = "Q8_0"
    elif ".attn_output." in name and n_expert == 8:
        t = "Q5_K"
    elif ".ffn_down" in name and _more_bits(layer, n_layer):
        t = "Q6_K"
    return _fit(t, shape[-1])


def _fit(t: str, row: int) -> str:
    if row % GGML[t][1] == 0:
        return t
    t = FALLBACK.get(t, "F16")
    if t == "Q5_1":  # tandem's writer has no Q5_1 blocks; Q5_0 is the same size class
        t = "Q5_0"
    return t if t in GGML and row % GGML[t][1] == 0 else "F16"


# ---------------------------------------------------------------------------------------- random blocks


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16).view(np.uint8).reshape(-1, 2)


def _nibble_pack(q: np.ndarray) -> np.ndarray:
    """[n, 2k] values 0..15 -> [n, k] bytes: value j in the low nibble of byte j, value j + k in the high one."""
    k = q.shape[1] // 2
    return (q[:, :k] | (q[:, k:] << 4)).astype(np.uint8)


def _k_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins -> ggml's 12 packed bytes (get_scale_min_k4 reads them back)."""
    out = np.empty((sc.shape[0], 12), np.int32)
    out[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    return out.astype(np.uint8)


# per block type: where its f16 super-block scale sits, and the scale that gives values of deviation 1
# (the deviation of its uniform quants times the rms of its sub-block scales); K-quants' min is d times the mid
SCALE = {"Q8_0": (0, 1 / 73.3), "Q4_0": (0, 1 / 4.32), "Q5_0": (0, 1 / 8.94),
         "Q4_K": (0, 1 / (4.61 * 48.4)), "Q5_K": (0, 1 / (9.23 * 48.4)), "Q6_K": (208, 1 / (18.47 * 97.4))}
MID = {"Q4_K": 7.5, "Q5_K": 15.5}


def quantize_q4_1(x: np.ndarray) -> np.ndarray:
    """Float rows [n, 32] -> Q4_1 blocks [n, 20] (d f16 | m f16 | 16 bytes of nibbles), ggml's reference rounding:
    m = min, d = (max - min) / 15 in fp32, q = min(15, trunc((x - m) / d + 0.5)) with 1/d taken in fp32 (0 when
    d is 0), value j in the low nibble of byte j and value j + 16 in the high one."""
    x = np.asarray(x, np.float32)
    lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
    d = (hi - lo) / np.float32(15)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    q = np.minimum(np.floor((x - lo) * inv + np.float32(0.5)), 15).astype(np.uint8)  # >= 0: trunc is floor
    return np.concatenate((_f16_bytes(d), _f16_bytes(lo), _nibble_pack(q)), axis=1)


def rescale_blocks(blocks: np.ndarray, t: str, std: float, rng: np.random.Generator) -> None:
    """Give each block of `blocks` ([n, bytes], type `t`) a fresh super-block scale around `std` (x0.75-1.25)."""
    if t == "Q4_1":  # d and m scale together: the same quants, the block's values times the factor
        f = rng.uniform(0.75, 1.25, (blocks.shape[0], 1)).astype(np.float32)
        for at in (0, 2):
            blocks[:, at : at + 2] = _f16_bytes(blocks[:, at : at + 2].copy().view(np.float16).astype(np.float32) * f)
        return
    at, unit = SCALE[t]
    d = std * unit * rng.uniform(0.75, 1.25, blocks.shape[0]).astype(np.float32)
    blocks[:, at : at + 2] = _f16_bytes(d)
    if t in MID:  # dmin m = d sc mid with m = sc: each sub-block has zero mean
        blocks[:, 2:4] = _f16_bytes(d * MID[t])


def random_blocks(t: str, n: int, std: float, rng: np.random.Generator) -> np.ndarray:
    """`n` valid ggml blocks of type `t` ([n, bytes] uint8) whose values have mean ~0 and deviation ~`std`.

    Quants are uniform; scales are set from the deviation of that uniform distribution, with a spread of scales
    between blocks and sub-blocks. Offsets are chosen so each sub-block's mean is zero (K-quants: min = 7.5 or
    15.5 scale steps; Q4_0 / Q5_0: quants drawn from 1..15 / 1..31; Q6_K: scale signs alternate at random).
    """
    if t in ("F32", "F16", "BF16"):
        x = (rng.standard_normal(n, dtype=np.float32) * std if std else np.ones(n, np.float32))
        if t == "BF16":
            bits = x.view(np.uint32)
            x = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even
        return x.astype(np.float16 if t == "F16" else x.dtype).view(np.uint8).reshape(n, -1)
    if t == "Q4_1":  # normal floats through ggml's rounding: d and m from each block's own range
        return quantize_q4_1(rng.standard_normal((n, 32), dtype=np.float32) * np.float32(std))
    if t not in SCALE:
        raise ValueError(f"synth --gguf: no random blocks for type {t}")
    d = np.zeros((n, 2), np.uint8)  # filled by rescale_blocks
    if t == "Q8_0":
        parts = [d, rng.integers(-127, 128, (n, 32), dtype=np.int8).view(np.uint8)]
    elif t == "Q4_0":  # (q - 8) d, q in 1..15
        parts = [d, _nibble_pack(rng.integers(1, 16, (n, 32)))]
    elif t == "Q5_0":  # (q - 16) d, q in 1..31; fifth bits of values 0..31 in a u32
        q = rng.integers(1, 32, (n, 32))
        qh = ((q >> 4) << np.arange(32)).sum(axis=1).astype("<u4").view(np.uint8).reshape(n, 4)
        parts = [d, qh, _nibble_pack(q & 0xF)]
    elif t in ("Q4_K", "Q5_K"):  # d sc q - dmin m, sc = m in 32..63 (rms 48.4), q uniform 0..15 or 0..31
        sc = rng.integers(32, 64, (n, 8))
        qs = rng.integers(0, 256, (n, 128 + (32 if t == "Q5_K" else 0)), dtype=np.uint8)
        parts = [d, d, _k_scales(sc, sc), qs]
    else:  # Q6_K: d sc (q - 32), q uniform 0..63, |sc| in 64..127 (rms 97.4) with a random sign
        qs = rng.integers(0, 256, (n, 192), dtype=np.uint8)
        sc = rng.integers(64, 128, (n, 16)) * rng.choice(np.array([-1, 1]), (n, 16))
        parts = [qs, sc.astype(np.int8).view(np.uint8), d]
    blocks = np.concatenate(parts, axis=1)
    rescale_blocks(blocks, t, std, rng)
    return blocks


class _Pools:
    """One pool of random blocks per (type, scale), sampled once; tensors are windows of whole blocks of it.

    Windows of a pool repeat its rows; so that no two rows of a tensor are equal (equal lm_head rows would make
    exact logit ties), float windows start at distinct offsets modulo the row length, and quantized windows get
    fresh block scales (a copy of the window, rescaled)."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.pools: dict[tuple[str, float], np.ndarray] = {}

    def write(self, f, spec: Spec, bar) -> None:
        _, block, size = GGML[spec.type]
        key = (spec.type, spec.scale)
        if key not in self.pools:
            self.pools[key] = random_blocks(spec.type, max(POOL_VALUES // block, 64), spec.scale, self.rng)
        pool = self.pools[key]
        units, left = pool.shape[0], spec.nbytes // size
        row = spec.shape[-1] // block if spec.shape else 1
        residues = self.rng.permutation(row) if row > 1 else np.zeros(1, np.int64)
        i = 0
        while left:
            n = min(left, units // 2)
            r = int(residues[i % len(residues)]) if block == 1 else 0
            start = r + row * int(self.rng.integers(0, (units - n - r) // row + 1)) if block == 1 else int(
                self.rng.integers(0, units - n + 1))
            window = pool[start : start + n]
            if block > 1 and spec.nbytes // size > n:  # the tensor takes several windows: fresh scales
                window = window.copy()
                rescale_blocks(window, spec.type, spec.scale, self.rng)
            f.write(memoryview(np.ascontiguousarray(window).reshape(-1)))
            left -= n
            i += 1
            bar.update(n * size)


# ---------------------------------------------------------------------------------------- metadata


def _tokenizer_metadata(vocab_size: int) -> list[tuple[str, int, object]]:
    """tandem/assets/tokenizer.json as tokenizer.ggml.* (byte-level BPE, GPT-2 pre-tokenizer, ChatML)."""
    with resources.as_file(resources.files("tandem") / "assets" / "tokenizer.json") as src:
        tj = json.loads(Path(src).read_text())
    vocab = tj["model"]["vocab"]
    tokens = [""] * len(vocab)
    for text, i in vocab.items():
        tokens[i] = text
    special = {t["id"] for t in tj["added_tokens"] if t.get("special")}
    types = [CONTROL if i in special else NORMAL for i in range(len(tokens))]
    if vocab_size < len(tokens):
        raise ValueError(f"synth --gguf: vocab_size {vocab_size} is smaller than the tokenizer's {len(tokens)}")
    pad = vocab_size - len(tokens)  # as the converter pads: [PADn], unused
    tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
    types += [UNUSED] * pad
    merges = [" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]]
    ids = {t["content"]: t["id"] for t in tj["added_tokens"]}
    return [
        ("tokenizer.ggml.model", STR, "gpt2"), ("tokenizer.ggml.pre", STR, "gpt-2"),
        ("tokenizer.ggml.tokens", ARR, (STR, tokens)), ("tokenizer.ggml.token_type", ARR, (I32, types)),
        ("tokenizer.ggml.merges", ARR, (STR, merges)),
        ("tokenizer.ggml.bos_token_id", U32, ids["<|endoftext|>"]),
        ("tokenizer.ggml.eos_token_id", U32, ids["<|im_end|>"]),
        ("tokenizer.ggml.padding_token_id", U32, ids["<|endoftext|>"]),
        ("tokenizer.ggml.add_bos_token", BOOL, False), ("tokenizer.chat_template", STR, CHAT_TEMPLATE),
    ]


def gguf_metadata(config: dict, quant: str, name: str) -> list[tuple[str, int, object]]:
    """The metadata llama.cpp's converter writes for `config` (keys and value types it reads back)."""
    c, mt = config, config["model_type"]
    a = ARCH[mt]
    heads = c["num_attention_heads"]
    md = [("general.architecture", STR, a), ("general.name", STR, name), ("general.alignment", U32, ALIGN),
          ("general.file_type", U32, QUANTS[quant][0])]
    if quant not in ("F32", "F16", "BF16"):
        md.append(("general.quantization_version", U32, 2))

    def put(key: str, vtype: int, value) -> None:
        md.append((f"{a}.{key}", vtype, value))

    put("block_count", U32, c["num_hidden_layers"])
    put("context_length", U32, c["max_position_embeddings"])
    put("embedding_length", U32, c["hidden_size"])
    put("feed_forward_length", U32, c["intermediate_size"])
    put("attention.head_count", U32, heads)
    put("attention.head_count_kv", U32, 1 if a == "deepseek2" else c.get("num_key_value_heads", heads))
    put("rope.freq_base", F32, float(c["rope_theta"]))
    put("attention.layer_norm_rms_epsilon", F32, float(c["rms_norm_eps"]))
    put("vocab_size", U32, c["vocab_size"])
    if n := _n_experts(c):
        put("expert_count", U32, n)
        put("expert_used_count", U32, c["num_experts_per_tok"])
    if a == "llama":
        put("rope.dimension_count", U32, c["hidden_size"] // heads)
    elif a in ("qwen2moe", "qwen3moe"):
        head_dim = c.get("head_dim") or c["hidden_size"] // heads
        put("attention.key_length", U32, head_dim)
        put("attention.value_length", U32, head_dim)
        put("expert_feed_forward_length", U32, c["moe_intermediate_size"])
        if a == "qwen2moe":
            put("expert_shared_feed_forward_length", U32, c["shared_expert_intermediate_size"])
    else:
        md += _deepseek_metadata(c, a)
    return md + _tokenizer_metadata(c["vocab_size"])


def _deepseek_metadata(c: dict, a: str) -> list[tuple[str, int, object]]:
    """deepseek2 in its MLA form (one KV head of kv_lora_rank + rope; the head sizes of the decompressed MHA)."""
    r, rope = c["kv_lora_rank"], c["qk_rope_head_dim"]
    md = [("leading_dense_block_count", U32, c["first_k_dense_replace"]),
          ("attention.kv_lora_rank", U32, r), ("attention.key_length", U32, r + rope),
          ("attention.value_length", U32, r), ("attention.key_length_mla", U32, c["qk_nope_head_dim"] + rope),
          ("attention.value_length_mla", U32, c["v_head_dim"]), ("rope.dimension_count", U32, rope),
          ("expert_feed_forward_length", U32, c["moe_intermediate_size"]),
          ("expert_shared_count", U32, c["n_shared_experts"] or 0),
          ("expert_weights_scale", F32, float(c["routed_scaling_factor"])),
          ("expert_gating_func", U32, 2 if c.get("scoring_func") == "sigmoid" else 1),
          ("expert_group_count", U32, c.get("n_group") or 1),
          ("expert_group_used_count", U32, c.get("topk_group") or 1)]
    # 0 for no q LoRA (V2-Lite): llama.cpp reads the key unless the depth is V2-Lite's own 26 or 27 layers, so a
    # truncated or tiny V2-Lite loads only with it; 0 selects the plain attn_q path, as a missing key does
    md.append(("attention.q_lora_rank", U32, c.get("q_lora_rank") or 0))
    if c.get("norm_topk_prob"):
        md.append(("expert_weights_norm", BOOL, True))
    rs = c.get("rope_scaling") or {}
    if rs.get("type", rs.get("rope_type")) == "yarn":
        md += [("rope.scaling.type", STR, "yarn"), ("rope.scaling.factor", F32, float(rs["factor"])),
               ("rope.scaling.original_context_length", U32, rs["original_max_position_embeddings"]),
               ("rope.scaling.yarn_log_multiplier", F32, 0.1 * rs.get("mscale_all_dim", 0.0))]
    return [(f"{a}.{k}", t, v) for k, t, v in md]


# ---------------------------------------------------------------------------------------- the file


def _pack_string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _pack_value(vtype: int, value) -> bytes:
    if vtype == STR:
        return _pack_string(value)
    if vtype == ARR:
        etype, items = value
        head = struct.pack("<IQ", etype, len(items))
        if etype == STR:
            return head + b"".join(_pack_string(s) for s in items)
        return head + np.asarray(items, dtype=np.dtype(SCALARS[etype][1]).newbyteorder("<")).tobytes()
    return struct.pack("<?" if vtype == BOOL else "<" + SCALARS[vtype][0], value)


def _header(metadata: list, specs: list[Spec]) -> bytes:
    out = [b"GGUF", struct.pack("<IQQ", 3, len(specs), len(metadata))]
    for key, vtype, value in metadata:
        out += [_pack_string(key), struct.pack("<I", vtype), _pack_value(vtype, value)]
    offset = 0
    for s in specs:  # dims innermost first, as ggml's ne
        out += [_pack_string(s.name), struct.pack("<I", len(s.shape)), struct.pack(f"<{len(s.shape)}Q", *s.shape[::-1]),
                struct.pack("<IQ", GGML[s.type][0], offset)]
        offset += -(-s.nbytes // ALIGN) * ALIGN
    raw = b"".join(out)
    return raw + b"\0" * (-len(raw) % ALIGN)


def write_gguf(config: dict, out: Path, quant: str = "Q4_K_M-like", seed: int = 0, name: str = "tandem-synth",
               progress: bool = True) -> Path:
    """Write the random-weight model of `config` as one GGUF file at `out`; returns `out`."""
    specs = gguf_tensors(config, quant)
    metadata = gguf_metadata(config, quant, name)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    pools = _Pools(seed)
    total = sum(s.nbytes for s in specs)
    with open(partial, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=f"synth {name} {quant}",
                                         disable=not progress) as bar:
        f.write(_header(metadata, specs))
        for s in specs:
            pools.write(f, s, bar)
            f.write(b"\0" * (-s.nbytes % ALIGN))
    partial.replace(out)
    return out


def synthesize_gguf(preset: str, out: Path, layers: int | None = None, quant: str = "Q4_K_M-like", seed: int = 0,
                    progress: bool = True) -> Path:
    """`tandem synth PRESET --gguf`: preset `preset` (cut to `layers`) as a GGUF file at `out`."""
    dtype = {"F32": "float32", "F16": "float16"}.get(quant, "bfloat16")
    return write_gguf(preset_config(preset, layers, dtype), out, quant, seed, preset, progress)


def type_counts(specs: list[Spec]) -> dict[str, int]:
    """Bytes per ggml type, for the summary line."""
    counts: dict[str, int] = {}
    for s in specs:
        counts[s.type] = counts.get(s.type, 0) + s.nbytes
    return counts
