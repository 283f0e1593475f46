"""GGUF models of every family, written as llama.cpp's converter writes them, against transformers' logits.

`write_gguf` is an independent re-statement of llama.cpp's naming (blk.N.ffn_gate_exps, ...), its q/k permute
for llama-architecture files and its attn_k_b / attn_v_b split of DeepSeek's kv_b_proj.
"""

from __future__ import annotations

import re
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from tiny import BASE, FAMILIES, make_hf

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf.quants import dequantize as ref_dequantize  # noqa: E402
from gguf.quants import quantize as ref_quantize  # noqa: E402

import tandem  # noqa: E402
from tandem.checkpoint import open_checkpoint  # noqa: E402

RTOL = 1e-4
ARCH = {"llama": "llama", "mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe",
        "deepseek_v2": "deepseek2", "deepseek_v3": "deepseek2"}
LAYER = {  # HF suffix under model.layers.N -> GGUF name under blk.N
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "self_attn.q_a_proj": "attn_q_a", "self_attn.q_a_layernorm": "attn_q_a_norm", "self_attn.q_b_proj": "attn_q_b",
    "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa", "self_attn.kv_a_layernorm": "attn_kv_a_norm",
    "self_attn.kv_b_proj": "attn_kv_b",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp", "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp", "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
    "mlp.shared_experts.gate_proj": "ffn_gate_shexp", "mlp.shared_experts.up_proj": "ffn_up_shexp",
    "mlp.shared_experts.down_proj": "ffn_down_shexp",
}


def rel_err(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def hf_tensors(model) -> dict[str, torch.Tensor]:
    """Per-projection tensors in checkpoint names; transformers 5 keeps experts fused in memory."""
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach().float()
        m = re.match(r"(.*)\.experts\.gate_up_proj$", name)
        if m:  # [E, 2I, D] -> stacked gate [E, I, D] and up [E, I, D]
            g, u = t.chunk(2, dim=1)
            out[f"{m[1]}.experts.gate"], out[f"{m[1]}.experts.up"] = g, u
        elif name.endswith(".experts.down_proj"):
            out[name[: -len("_proj")]] = t
        else:
            out[name.removesuffix(".weight") if name.endswith(".weight") else name] = t
    return out


def gguf_name(name: str, deepseek: bool) -> str | None:
    glob = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    if name in glob:
        return glob[name] + ".weight"
    m = re.match(r"model\.layers\.(\d+)\.(.*)$", name)
    rest = m[2].replace("block_sparse_moe", "mlp")
    if rest.endswith("e_score_correction_bias"):
        return f"blk.{m[1]}.exp_probs_b.bias"
    if rest in ("mlp.experts.gate", "mlp.experts.up", "mlp.experts.down"):
        return f"blk.{m[1]}.ffn_{rest.rsplit('.', 1)[1]}_exps.weight"
    kind = "bias" if rest.endswith(".bias") else "weight"
    return f"blk.{m[1]}.{LAYER[rest.removesuffix('.bias')]}.{kind}"


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, path: Path, family: str, quant=None, split_kv_b: bool = False, split: int = 0,
               per_expert: bool = False) -> Path:
    """The model as llama.cpp writes it; `quant(name, array) -> (bytes, type) | None` picks a tensor's type.
    per_expert: experts one tensor each (blk.N.ffn_gate.E.weight, older Mixtral files), not stacked."""
    c = model.config
    arch = ARCH[family]
    w = gguf.GGUFWriter(path, arch, split_max_tensors=split)
    w.add_uint32(f"{arch}.block_count", c.num_hidden_layers)
    w.add_uint32(f"{arch}.context_length", c.max_position_embeddings)
    w.add_uint32(f"{arch}.embedding_length", c.hidden_size)
    w.add_uint32(f"{arch}.feed_forward_length", c.intermediate_size)
    w.add_uint32(f"{arch}.attention.head_count", c.num_attention_heads)
    w.add_uint32(f"{arch}.attention.head_count_kv", c.num_key_value_heads)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    w.add_float32(f"{arch}.rope.freq_base", c.rope_parameters["rope_theta"])
    w.add_uint32(f"{arch}.vocab_size", c.vocab_size)
    if getattr(c, "head_dim", None) and arch != "deepseek2":
        w.add_uint32(f"{arch}.attention.key_length", c.head_dim)
    if family == "mixtral":
        w.add_uint32(f"{arch}.expert_count", c.num_local_experts)
        w.add_uint32(f"{arch}.expert_used_count", c.num_experts_per_tok)
    if family.startswith("qwen"):
        w.add_uint32(f"{arch}.expert_count", c.num_experts)
        w.add_uint32(f"{arch}.expert_used_count", c.num_experts_per_tok)
        w.add_uint32(f"{arch}.expert_feed_forward_length", c.moe_intermediate_size)
        if family == "qwen2_moe":
            w.add_uint32(f"{arch}.expert_shared_feed_forward_length", c.shared_expert_intermediate_size)
    if family.startswith("deepseek"):
        rope = c.rope_parameters
        w.add_uint32(f"{arch}.expert_count", c.n_routed_experts)
        w.add_uint32(f"{arch}.expert_used_count", c.num_experts_per_tok)
        w.add_uint32(f"{arch}.expert_feed_forward_length", c.moe_intermediate_size)
        w.add_uint32(f"{arch}.expert_shared_count", c.n_shared_experts)
        w.add_uint32(f"{arch}.leading_dense_block_count", c.first_k_dense_replace)
        w.add_float32(f"{arch}.expert_weights_scale", c.routed_scaling_factor)
        w.add_bool(f"{arch}.expert_weights_norm", c.norm_topk_prob)
        w.add_uint32(f"{arch}.expert_gating_func", 2 if family == "deepseek_v3" else 1)
        w.add_uint32(f"{arch}.expert_group_count", c.n_group or 1)
        w.add_uint32(f"{arch}.expert_group_used_count", c.topk_group or 1)
        if c.q_lora_rank:
            w.add_uint32(f"{arch}.attention.q_lora_rank", c.q_lora_rank)
        w.add_uint32(f"{arch}.attention.kv_lora_rank", c.kv_lora_rank)
        w.add_uint32(f"{arch}.attention.key_length", c.qk_nope_head_dim + c.qk_rope_head_dim)
        w.add_uint32(f"{arch}.attention.value_length", c.v_head_dim)
        w.add_uint32(f"{arch}.rope.dimension_count", c.qk_rope_head_dim)
        if rope.get("rope_type") == "yarn":
            w.add_string(f"{arch}.rope.scaling.type", "yarn")
            w.add_float32(f"{arch}.rope.scaling.factor", rope["factor"])
            w.add_uint32(f"{arch}.rope.scaling.original_context_length", rope["original_max_position_embeddings"])
            w.add_float32(f"{arch}.rope.scaling.yarn_log_multiplier", 0.1 * rope["mscale_all_dim"])
    tensors = hf_tensors(model)
    for name, t in tensors.items():
        a = t.numpy()
        if family in ("llama", "mixtral") and re.search(r"self_attn\.[qk]_proj", name):
            a = permute(a, c.num_attention_heads if ".q_proj" in name else c.num_key_value_heads)
        gname = gguf_name(name, family.startswith("deepseek"))
        if split_kv_b and gname.endswith("attn_kv_b.weight"):  # convert_hf_to_gguf.py's DeepseekV2 MLA split
            kv = a.reshape(c.num_attention_heads, c.qk_nope_head_dim + c.v_head_dim, -1)
            k_b, v_b = kv[:, : c.qk_nope_head_dim], kv[:, c.qk_nope_head_dim :]
            w.add_tensor(gname.replace("kv_b", "k_b"), np.ascontiguousarray(k_b.transpose(0, 2, 1)))
            w.add_tensor(gname.replace("kv_b", "v_b"), np.ascontiguousarray(v_b))
            continue
        if per_expert and gname.endswith("_exps.weight"):
            for e in range(a.shape[0]):
                _add(w, gname.replace("_exps.weight", f".{e}.weight"), f"{name}.{e}", a[e], quant)
            continue
        _add(w, gname, name, a, quant)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _add(w, gname: str, name: str, a: np.ndarray, quant) -> None:
    q = quant(name, a) if quant else None
    if q is None:
        w.add_tensor(gname, np.ascontiguousarray(a))
    else:
        w.add_tensor(gname, q[0], raw_dtype=q[1])


# ---------------------------------------------------------------------------------------- float files

CASES = ["llama_plain", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"]


# llama.cpp stores llama3 rope as a rope_freqs tensor, which tandem does not read: a plain-rope Llama here
EXTRA = {"llama_plain": ("LlamaConfig", "LlamaForCausalLM", dict(BASE, attention_bias=True, tie_word_embeddings=True)),
         "mixtral_256": ("MixtralConfig", "MixtralForCausalLM",  # K-quant blocks need rows of 256
                         dict(BASE, hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_local_experts=4,
                              num_experts_per_tok=2))}


def _model(case: str):
    with mock.patch.dict(FAMILIES, EXTRA):
        return make_hf(case), "llama" if case == "llama_plain" else case.removesuffix("_256")


@pytest.mark.parametrize("case", CASES)
def test_float_gguf_logits_match_transformers(case, tmp_path):
    hf, family = _model(case)
    path = write_gguf(hf, tmp_path / "m.gguf", family, split_kv_b=case == "deepseek_v3")
    ckpt = open_checkpoint(path)
    assert ckpt.config["model_type"] == family
    llm = tandem.load(path, dtype="float32", progress=False)
    ids = torch.randint(0, hf.config.vocab_size, (24,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    assert rel_err(llm.logits(ids.tolist()), ref) <= RTOL


def test_f16_and_split_files(tmp_path):
    hf, family = _model("mixtral")

    def f16(name, a):
        return (a.astype(np.float16), T.F16) if a.ndim >= 2 else None

    write_gguf(hf, tmp_path / "m.gguf", family, quant=f16, split=7)
    parts = sorted(tmp_path.glob("m-*-of-*.gguf"))
    assert len(parts) > 2
    with torch.no_grad():  # the reference holds the same float16-rounded weights
        for p in hf.parameters():
            if p.dim() >= 2:
                p.copy_(p.half().float())
    ids = list(range(5, 30))
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    llm = tandem.load(parts[0], dtype="float32", progress=False)
    assert rel_err(llm.logits(ids), ref) <= RTOL


# ---------------------------------------------------------------------------------------- quantized files

BLOCK_TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_XS, T.BF16]
F16_FIELDS = {T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,), T.IQ4_XS: (0,)}


def random_blocks(rows: int, cols: int, qtype, rng) -> np.ndarray:
    """Random blocks of `qtype` whose values have the spread of a weight of `cols` inputs.

    gguf has no K-quant quantizer; random bytes exercise every bit of the layout, and the super-block scales
    (float16 fields) are then set so that the dequantized weights have std 1/sqrt(cols).
    """
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows * cols // block, nbytes), dtype=np.uint8)
    for at in F16_FIELDS[qtype]:
        raw[:, at : at + 2] = np.frombuffer(np.ones(len(raw), np.float16).tobytes(), np.uint8).reshape(-1, 2)
    std = ref_dequantize(raw.reshape(-1), qtype).std()
    for at in F16_FIELDS[qtype]:
        scale = (rng.uniform(0.5, 1.5, len(raw)) / (std * cols**0.5)).astype(np.float16)
        raw[:, at : at + 2] = np.frombuffer(scale.tobytes(), np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


def test_quantized_gguf_matches_its_dequantized_weights(tmp_path):
    """Every block type in one Mixtral (expert stacks, attention, embeddings), against gguf's dequantizer."""
    hf, _ = _model("mixtral_256")
    rng = np.random.default_rng(0)
    chosen, counter = {}, iter(range(1000))

    def quant(name, a):
        if a.ndim < 2:
            return None
        qtype = BLOCK_TYPES[next(counter) % len(BLOCK_TYPES)]
        flat = a.reshape(-1, a.shape[-1])
        if qtype in F16_FIELDS:
            raw = random_blocks(flat.shape[0], flat.shape[1], qtype, rng)
        else:
            raw = ref_quantize(flat, qtype)
        chosen[name] = qtype
        deq = ref_dequantize(raw, qtype).reshape(a.shape)
        dequantized[name] = torch.from_numpy(deq.copy())
        return raw.reshape(*a.shape[:-1], -1), qtype

    dequantized: dict[str, torch.Tensor] = {}
    path = write_gguf(hf, tmp_path / "q.gguf", "mixtral", quant=quant)
    assert set(chosen.values()) == set(BLOCK_TYPES)
    # the reference model holds gguf's dequantized weights, permuted back for q/k as transformers expects
    c = hf.config
    with torch.no_grad():
        for name, t in dequantized.items():
            if re.search(r"self_attn\.[qk]_proj", name):
                heads = c.num_attention_heads if ".q_proj" in name else c.num_key_value_heads
                t = t.reshape(heads, t.shape[0] // heads // 2, 2, -1).transpose(1, 2).reshape(t.shape)
            if name.endswith(".experts.gate") or name.endswith(".experts.up"):
                fused = hf.get_parameter(name.rsplit(".", 1)[0] + ".gate_up_proj")
                half = fused.shape[1] // 2
                (fused[:, :half] if name.endswith("gate") else fused[:, half:]).copy_(t)
            elif name.endswith(".experts.down"):
                hf.get_parameter(name + "_proj").copy_(t)
            else:
                hf.get_parameter(name + ".weight").copy_(t)
    ids = list(range(3, 40))
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    llm = tandem.load(path, rules="none", dtype="float32", progress=False)  # the loader's dequantize, in torch
    assert rel_err(llm.logits(ids), ref) <= RTOL


def test_raw_expert_blocks(tmp_path):
    hf, family = _model("mixtral")
    blocks = {}

    def q8(name, a):
        if ".experts." not in name:
            return None
        raw = ref_quantize(a.reshape(-1, a.shape[-1]), T.Q8_0)
        blocks[name] = raw
        return raw.reshape(*a.shape[:-1], -1), T.Q8_0

    path = write_gguf(hf, tmp_path / "m.gguf", family, quant=q8)
    src = open_checkpoint(path).source
    gtype, data, shape = src.raw("model.layers.1.block_sparse_moe.experts.down_proj")
    assert gtype == int(T.Q8_0) and shape == (6, 64, 96)
    written = next(v for k, v in blocks.items() if k.startswith("model.layers.1.") and k.endswith("experts.down"))
    assert bytes(data.numpy()) == written.tobytes()
