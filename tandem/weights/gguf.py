"""GGUF checkpoints as a weight source with Hugging Face names, and their config in config.json spelling.

llama.cpp's converter renames tensors (blk.3.ffn_down_exps), stacks experts into 3D tensors [E, out, in],
permutes Llama/Mixtral q_proj and k_proj rows for its rope layout, and may split DeepSeek's kv_b_proj into
attn_k_b / attn_v_b. This module undoes each of these on read, so a model built from the config computes what
the original checkpoint computed. Quantized tensors are dequantized on `get`; `raw` hands out their blocks.
"""

from __future__ import annotations

import logging
import mmap
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from tandem.models.base import ConfigError
from tandem.weights.gguf_file import GGUFFile, GGUFTensor, open_gguf
from tandem.weights.gguf_quants import TYPES, dequantize
from tandem.weights.safetensors import MissingTensorError, WeightError

log = logging.getLogger(__name__)

# GGUF general.architecture -> config.json model_type (llama with experts is Mixtral, DeepSeek is decided below)
ARCHES = {"llama": "llama", "mistral": "llama", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe",
          "deepseek2": "deepseek_v2"}
# per-layer GGUF name -> HF name under model.layers.N; {mlp} is "mlp" or Mixtral's "block_sparse_moe"
LAYER = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "attn_q_a": "self_attn.q_a_proj", "attn_q_a_norm": "self_attn.q_a_layernorm", "attn_q_b": "self_attn.q_b_proj",
    "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa", "attn_kv_a_norm": "self_attn.kv_a_layernorm",
    "attn_kv_b": "self_attn.kv_b_proj",
    "ffn_gate": "{mlp}.gate_proj", "ffn_up": "{mlp}.up_proj", "ffn_down": "{mlp}.down_proj",
    "ffn_gate_inp": "{mlp}.gate", "exp_probs_b": "{mlp}.gate.e_score_correction_bias",
    "ffn_gate_shexp": "{mlp}.{shared}.gate_proj", "ffn_up_shexp": "{mlp}.{shared}.up_proj",
    "ffn_down_shexp": "{mlp}.{shared}.down_proj", "ffn_gate_inp_shexp": "{mlp}.shared_expert_gate",
}
# stacked experts [E, out, in] -> the fused names weights/loader.py splits per expert
STACKED = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
MIXTRAL_EXPERT = {"ffn_gate": "w1", "ffn_down": "w2", "ffn_up": "w3"}
GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
          "output.weight": "lm_head.weight"}
BLOCK = re.compile(r"^blk\.(?P<i>\d+)\.(?P<kind>[a-z_]+?)(?:\.(?P<e>\d+))?\.(?P<what>weight|bias)$")


@dataclass(frozen=True, slots=True)
class Entry:
    """One HF-named tensor: its GGUF tensor(s), its HF shape, and how to turn the stored data into it."""

    name: str
    shape: tuple[int, ...]
    parts: tuple[GGUFTensor, ...]
    transform: str | None = None  # "permute_q" / "permute_k" (llama rope layout), "kv_b" (from k_b + v_b)

    @property
    def file(self) -> Path:
        return self.parts[0].file

    @property
    def ggml_type(self) -> str:
        return TYPES[self.parts[0].ggml_type].name

    @property
    def dtype(self) -> torch.dtype:
        return TYPES[self.parts[0].ggml_type].float_dtype or torch.float32

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)


def hf_name(gguf_name: str, model_type: str) -> str | None:
    """The Hugging Face name of GGUF tensor `gguf_name` in a `model_type` model; None if it has none."""
    if gguf_name in GLOBAL:
        return GLOBAL[gguf_name]
    m = BLOCK.match(gguf_name)
    if not m:
        return None
    mlp = "block_sparse_moe" if model_type == "mixtral" else "mlp"
    shared = "shared_expert" if model_type == "qwen2_moe" else "shared_experts"
    base, kind = f"model.layers.{m['i']}", m["kind"]
    if m["e"] is not None:  # old Mixtral files: one tensor per expert, blk.N.ffn_gate.E.weight
        if kind not in MIXTRAL_EXPERT:
            return None
        proj = MIXTRAL_EXPERT[kind] if model_type == "mixtral" else LAYER[kind].split(".")[-1]
        return f"{base}.{mlp}.experts.{m['e']}.{proj}.{m['what']}"
    if kind in STACKED:
        return f"{base}.{mlp}.experts.{STACKED[kind]}"
    if kind not in LAYER:
        return None
    name = f"{base}.{LAYER[kind].format(mlp=mlp, shared=shared)}"
    return name if kind == "exp_probs_b" else f"{name}.{m['what']}"  # exp_probs_b.bias: a parameter itself


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permute: rows (head, pair, 2) back to Hugging Face's (head, 2, pair)."""
    shape = w.shape
    return w.reshape(heads, shape[0] // heads // 2, 2, *shape[1:]).transpose(1, 2).reshape(shape)


@dataclass(frozen=True, slots=True)
class StoredExperts:
    """One projection of a layer's routed experts as the file stores it: the blocks of [E, out, in], back to back.

    `data` is a zero-copy view of the mapping for a stacked tensor (blk.N.ffn_gate_exps), or one copy of the
    per-expert tensors (blk.N.ffn_gate.E) joined; either way the blocks are the file's, never requantized.
    """

    ggml_type: int
    data: torch.Tensor  # uint8 [E * out * in / block * block bytes]
    shape: tuple[int, int, int]  # [E, out, in]
    file: Path
    unmap: Callable[[], None] | None = None  # drops the process's pages of a mapped `data` (None: a copy)

    def release(self) -> None:
        """Give back the pages of `data` this process has touched, once a kernel holds its own copy; `data` stays
        valid (a mapped view reads the file again if touched)."""
        if self.unmap is not None:
            self.unmap()

    @property
    def type_name(self) -> str:
        return TYPES[self.ggml_type].name

    @property
    def bits_per_weight(self) -> float:
        qt = TYPES[self.ggml_type]
        return qt.bytes * 8 / qt.block

    def expert(self, e: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Expert e's weight [out, in], dequantized to `dtype`."""
        per = self.data.numel() // self.shape[0]
        return dequantize(self.data[e * per : (e + 1) * per], self.ggml_type, self.shape[1:], dtype)


class _StackedExperts:
    """A quantized [E, out, in] tensor that dequantizes one expert at a time when indexed."""

    def __init__(self, source: GGUFSource, entry: Entry):
        self.source, self.entry = source, entry

    def __getitem__(self, e: int) -> torch.Tensor:
        t = self.entry.parts[0]
        per = t.nbytes // t.shape[0]
        data = self.source.bytes_of(t)[e * per : (e + 1) * per]
        return dequantize(data, t.ggml_type, t.shape[1:])


class GGUFSource:
    """name -> tensor over one GGUF model (single or split files), in Hugging Face names."""

    def __init__(self, files: list[GGUFFile], model_type: str, n_heads: int, n_kv_heads: int):
        self.files = files
        self.path = files[0].path  # the first part of a split model
        self.metadata = files[0].metadata
        self._maps: dict[Path, mmap.mmap] = {f.path: f.map for f in files}
        stored: dict[str, GGUFTensor] = {}
        for f in files:
            stored.update(f.tensors)
        self.stored = stored
        self.entries: dict[str, Entry] = {}
        permute = model_type in ("llama", "mixtral") and self.metadata.get("general.architecture") != "deepseek2"
        for gname, t in stored.items():
            name = hf_name(gname, model_type)
            if name is None:
                continue
            shape, transform = t.shape, None
            if permute and name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
                transform = "permute_q"
            elif permute and name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
                transform = "permute_k"
            if name.endswith("shared_expert_gate.weight") and len(shape) == 1:
                shape = (1, shape[0])
            self.entries[name] = Entry(name, shape, (t,), transform)
        self.heads = {"permute_q": n_heads, "permute_k": n_kv_heads}
        self._join_kv_b()
        self._logged: set[str] = set()

    def _join_kv_b(self) -> None:
        """DeepSeek files converted for MLA hold attn_k_b [H, r, nope] and attn_v_b [H, v, r], not attn_kv_b."""
        for gname, kb in self.stored.items():
            m = re.match(r"^blk\.(\d+)\.attn_k_b\.weight$", gname)
            vb = self.stored.get(gname.replace("attn_k_b", "attn_v_b"))
            name = f"model.layers.{m[1]}.self_attn.kv_b_proj.weight" if m else None
            if m and vb is not None and name not in self.entries:
                (h, r, nope), v = kb.shape, vb.shape[1]
                self.entries[name] = Entry(name, (h * (nope + v), r), (kb, vb), "kv_b")

    # ------------------------------------------------------------------ the source interface

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)

    def info(self, name: str) -> Entry:
        return self.entries[name]

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.stored.values())

    def bytes_of(self, t: GGUFTensor) -> torch.Tensor:
        """The stored bytes of `t` as a zero-copy uint8 view into the mapping."""
        if t.nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(self._maps[t.file], dtype=torch.uint8, count=t.nbytes, offset=t.offset)

    def raw(self, name: str) -> tuple[int, torch.Tensor, tuple[int, ...]]:
        """(ggml type id, the stored blocks as a uint8 view, stored shape) of `name`, for kernels that take them.

        The shape is the stored one ([E, out, in] for stacked experts); only untransformed tensors have one.
        """
        e = self._entry(name)
        if e.transform is not None:
            raise WeightError(f"{e.file}: tensor {name} is stored transformed ({e.transform}); it has no raw form")
        t = e.parts[0]
        return t.ggml_type, self.bytes_of(t), t.shape

    def expert_blocks(self, prefix: str, proj_names: tuple[str, str, str], n_experts: int
                      ) -> tuple[StoredExperts, StoredExperts, StoredExperts] | None:
        """The stored blocks of the routed experts under `prefix` (model.layers.3.mlp.experts), per projection
        (gate, up, down), for kernels that run them as they are; None if they are not all stored plainly.

        Takes llama.cpp's stacked tensors (ffn_gate_exps [E, I, H], named `{prefix}.gate_proj` here) and the
        older per-expert ones (`{prefix}.{e}.{proj}.weight`, proj_names being the family's spelling).
        """
        out = []
        for role, proj in zip(STACKED.values(), proj_names):
            stacked = self.entries.get(f"{prefix}.{role}")
            if stacked is not None and stacked.transform is None and stacked.shape[0] == n_experts:
                t = stacked.parts[0]
                out.append(StoredExperts(t.ggml_type, self.bytes_of(t), t.shape, t.file, partial(self._release, t)))
                continue
            parts = [self.entries.get(f"{prefix}.{e}.{proj}.weight") for e in range(n_experts)]
            if any(p is None or p.transform is not None or len(p.shape) != 2 for p in parts):
                return None
            tensors = [p.parts[0] for p in parts]
            if len({(t.ggml_type, t.shape) for t in tensors}) != 1:
                return None
            data = torch.cat([self.bytes_of(t) for t in tensors])  # one copy of the blocks, as they are
            for t in tensors:
                self._release(t)
            out.append(StoredExperts(tensors[0].ggml_type, data, (n_experts, *tensors[0].shape), tensors[0].file))
        return tuple(out)

    def get(self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        """Tensor `name` as a fresh tensor in `dtype` (default: float32 for quantized ones) on `device`."""
        e = self._entry(name)
        dtype = dtype or e.dtype
        parts = [self._read(t, torch.float32 if e.transform else dtype, device) for t in e.parts]
        for t in e.parts:
            self._release(t)
        if e.transform is None:
            return parts[0].view(e.shape)
        if e.transform == "kv_b":
            kb, vb = parts  # [H, r, nope], [H, v, r] -> [H, nope + v, r] -> [H (nope + v), r]
            return torch.cat((kb.transpose(1, 2), vb), dim=1).reshape(e.shape).to(dtype).contiguous()
        return _unpermute(parts[0], self.heads[e.transform]).to(dtype).contiguous()

    def view(self, name: str):
        """Zero-copy view of a float tensor; a stacked quantized one dequantizes per expert when indexed."""
        e = self._entry(name)
        t = e.parts[0]
        qt = TYPES[t.ggml_type]
        if e.transform is None and qt.float_dtype is not None:
            return self.bytes_of(t).view(qt.float_dtype).view(e.shape)
        if e.transform is None and len(e.shape) == 3:
            self._note(t, torch.float32)
            return _StackedExperts(self, e)
        return self.get(name)

    def release(self, name: str) -> None:
        for t in self._entry(name).parts:
            self._release(t)

    def close(self) -> None:
        for f in self.files:
            f.map.close()

    # ------------------------------------------------------------------ internals

    def _entry(self, name: str) -> Entry:
        if name not in self.entries:
            raise MissingTensorError(self.path, name)
        return self.entries[name]

    def _read(self, t: GGUFTensor, dtype: torch.dtype, device) -> torch.Tensor:
        self._note(t, dtype)
        return dequantize(self.bytes_of(t), t.ggml_type, t.shape, dtype, device)

    def _note(self, t: GGUFTensor, dtype: torch.dtype) -> None:
        qt = TYPES[t.ggml_type]
        if qt.float_dtype is None and qt.name not in self._logged:
            self._logged.add(qt.name)
            log.info("GGUF %s tensors are dequantized to %s on load", qt.name, str(dtype).removeprefix("torch."))

    def _release(self, t: GGUFTensor) -> None:
        mm = self._maps[t.file]
        page = mmap.PAGESIZE
        start = t.offset // page * page
        end = min(len(mm), (t.offset + t.nbytes + page - 1) // page * page)
        if end > start and hasattr(mm, "madvise"):
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)


# ---------------------------------------------------------------------- config from metadata


def _rope(md: dict, arch: str) -> dict:
    out = {"rope_theta": float(md.get(f"{arch}.rope.freq_base", 10000.0))}
    kind = md.get(f"{arch}.rope.scaling.type")
    if kind in ("linear", "yarn"):
        s = {"rope_type": kind, "factor": float(md.get(f"{arch}.rope.scaling.factor", 1.0))}
        if kind == "yarn":
            s["original_max_position_embeddings"] = md.get(f"{arch}.rope.scaling.original_context_length")
            mult = md.get(f"{arch}.rope.scaling.yarn_log_multiplier")
            if mult:  # the converter writes 0.1 * mscale_all_dim
                s["mscale"] = s["mscale_all_dim"] = float(mult) / 0.1
        out["rope_scaling"] = s
    return out


def _first(v):
    """Some files give per-layer arrays (head_count_kv); tandem's families take one value."""
    return max(v) if isinstance(v, list) else v


def gguf_config(files: list[GGUFFile]) -> dict:
    """config.json (Hugging Face spelling) of a GGUF model, from its metadata and tensor shapes."""
    md = files[0].metadata
    path = files[0].path
    arch = md.get("general.architecture")
    if arch not in ARCHES:
        raise ConfigError(f"{path}: GGUF architecture {arch!r} is not supported ({', '.join(sorted(ARCHES))})")
    tensors = {k: v for f in files for k, v in f.tensors.items()}

    def need(key: str):
        if f"{arch}.{key}" not in md:
            raise ConfigError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return _first(md[f"{arch}.{key}"])

    def opt(key: str, default=None):
        return _first(md.get(f"{arch}.{key}", default))

    if "token_embd.weight" not in tensors:
        raise WeightError(f"{path}: tensor token_embd.weight (model.embed_tokens.weight) is missing")
    heads = need("attention.head_count")
    cfg = {
        "vocab_size": opt("vocab_size") or tensors["token_embd.weight"].shape[0],
        "hidden_size": need("embedding_length"),
        "num_hidden_layers": need("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": opt("attention.head_count_kv", heads),
        "rms_norm_eps": float(opt("attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": opt("context_length", 4096),
        "tie_word_embeddings": "output.weight" not in tensors,
        "intermediate_size": opt("feed_forward_length", 0),
        **_rope(md, arch),
    }
    for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
        if f"tokenizer.ggml.{key}" in md:
            cfg[key.replace("padding", "pad")] = md[f"tokenizer.ggml.{key}"]
    if opt("attention.key_length") and arch != "deepseek2":
        cfg["head_dim"] = opt("attention.key_length")
    experts, used = opt("expert_count", 0), opt("expert_used_count", 0)
    model_type = ARCHES[arch]
    if model_type == "llama" and experts:
        model_type = "mixtral"
        cfg.update(num_local_experts=experts, num_experts_per_tok=used)
    elif model_type == "llama":
        cfg["attention_bias"] = "blk.0.attn_q.bias" in tensors
    elif model_type in ("qwen2_moe", "qwen3_moe"):
        n = cfg["num_hidden_layers"]
        cfg.update(num_experts=experts, num_experts_per_tok=used, moe_intermediate_size=need(
            "expert_feed_forward_length"), shared_expert_intermediate_size=opt("expert_shared_feed_forward_length", 0),
            norm_topk_prob=model_type == "qwen3_moe",  # llama.cpp's builds: Qwen3 renormalises, Qwen2 does not
            mlp_only_layers=[i for i in range(n) if f"blk.{i}.ffn_gate_inp.weight" not in tensors],
            attention_bias="blk.0.attn_q.bias" in tensors and model_type == "qwen3_moe")
    else:
        model_type = _deepseek(cfg, md, arch, tensors, opt, need)
    cfg["model_type"] = model_type
    cfg["architectures"] = [f"gguf:{arch}"]
    return cfg


def _deepseek(cfg: dict, md: dict, arch: str, tensors: dict, opt, need) -> str:
    rope = need("rope.dimension_count")
    k_b = tensors.get("blk.0.attn_k_b.weight")
    if k_b is not None and "blk.0.attn_kv_b.weight" not in tensors:  # MLA form: shapes tell the head dims
        nope, v = k_b.shape[2], tensors["blk.0.attn_v_b.weight"].shape[1]
    else:
        nope = (opt("attention.key_length_mla") or need("attention.key_length")) - rope
        v = opt("attention.value_length_mla") or need("attention.value_length")
    gating = opt("expert_gating_func", 1)  # llama.cpp: 1 softmax, 2 sigmoid
    v3 = gating == 2 or any(k.endswith(".exp_probs_b.bias") for k in tensors)
    groups = opt("expert_group_count", 1) or 1
    cfg.update(
        moe_intermediate_size=need("expert_feed_forward_length"), n_routed_experts=need("expert_count"),
        num_experts_per_tok=need("expert_used_count"), n_shared_experts=opt("expert_shared_count", 0) or None,
        first_k_dense_replace=opt("leading_dense_block_count", 0), routed_scaling_factor=float(
            opt("expert_weights_scale", 1.0)), norm_topk_prob=bool(opt("expert_weights_norm", False)),
        q_lora_rank=opt("attention.q_lora_rank") or None, kv_lora_rank=need("attention.kv_lora_rank"),
        qk_rope_head_dim=rope, qk_nope_head_dim=nope, v_head_dim=v,
        scoring_func="sigmoid" if gating == 2 else "softmax", n_group=groups,
        topk_group=opt("expert_group_used_count", 1) or 1,
        topk_method="noaux_tc" if v3 else "group_limited_greedy" if groups > 1 else "greedy",
    )
    return "deepseek_v3" if v3 else "deepseek_v2"


def open_gguf_source(path: str | Path) -> tuple[dict, GGUFSource, GGUFFile]:
    """(config, weight source, first file) of a .gguf model, or of a split one given any part."""
    files = open_gguf(path)
    config = gguf_config(files)
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    return config, GGUFSource(files, config["model_type"], heads, kv), files[0]
