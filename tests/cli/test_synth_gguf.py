"""`tandem synth PRESET --gguf`: files the gguf package reads back, with the preset's config, the requested types,
valid random blocks of the intended deviation, the tokenizer, and a model tandem loads and runs.

llama.cpp itself is not in CI; bench/results/llamacpp-parity-epyc.md records these files loading and generating
there, with greedy tokens equal to tandem's.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer

import tandem
from tandem.checkpoint import open_checkpoint
from tandem.synth import PRESETS, preset_config
from tandem.synth_gguf import GGML, gguf_tensors, random_blocks, tensor_type, write_gguf
from tandem.weights.gguf_quants import NAMES, dequantize

gguf = pytest.importorskip("gguf")

TINY = ["tiny-llama", "tiny-mixtral", "tiny-qwen2-moe", "tiny-qwen3-moe", "tiny-deepseek-v2", "tiny-deepseek-v3"]
# config keys tandem reads back from GGUF metadata and tensor shapes, per family
KEYS = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "rms_norm_eps", "rope_theta",
        "max_position_embeddings", "tie_word_embeddings"]
FAMILY_KEYS = {
    "llama": ["intermediate_size", "num_key_value_heads"],
    "mixtral": ["intermediate_size", "num_key_value_heads", "num_local_experts", "num_experts_per_tok"],
    "qwen2_moe": ["num_key_value_heads", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
                  "shared_expert_intermediate_size", "norm_topk_prob"],
    "qwen3_moe": ["num_key_value_heads", "head_dim", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
                  "norm_topk_prob"],
    "deepseek_v2": ["intermediate_size", "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok",
                    "n_shared_experts", "first_k_dense_replace", "routed_scaling_factor", "kv_lora_rank",
                    "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "topk_method", "n_group",
                    "topk_group", "norm_topk_prob"],
}
FAMILY_KEYS["deepseek_v3"] = FAMILY_KEYS["deepseek_v2"] + ["scoring_func"]
TEXT = "Hello world! Ça va? Привет мир. 你好，世界！ numbers 1234567 and code: print(i**2)\n\n<|im_end|>"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tandem", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Every tiny family in F32 and Q4_K_M-like, written through the CLI."""
    d = tmp_path_factory.mktemp("gguf")
    out = {}
    for preset in TINY:
        for quant in ("F32", "Q4_K_M-like"):
            path = d / f"{preset}-{quant}.gguf"
            r = _cli("synth", preset, "--gguf", "--quant", quant, "--out", str(path))
            assert r.returncode == 0, r.stderr
            out[preset, quant] = path
    return out


@pytest.mark.parametrize("preset", TINY)
def test_gguf_package_reads_names_types_and_metadata(files, preset):
    config = preset_config(preset)
    for quant in ("F32", "Q4_K_M-like"):
        r = gguf.GGUFReader(files[preset, quant])
        specs = {s.name: s for s in gguf_tensors(config, quant)}
        assert {t.name: t.tensor_type.name for t in r.tensors} == {n: s.type for n, s in specs.items()}
        assert {t.name: tuple(int(x) for x in t.shape[::-1]) for t in r.tensors} == {
            n: s.shape for n, s in specs.items()}
        arch = r.fields["general.architecture"].contents()
        assert r.fields[f"{arch}.block_count"].contents() == config["num_hidden_layers"]
        assert r.fields["tokenizer.ggml.model"].contents() == "gpt2"
        assert len(r.fields["tokenizer.ggml.tokens"].contents()) == config["vocab_size"]
    if preset.startswith("tiny-deepseek"):  # MLA form, as convert_hf_to_gguf.py writes it
        assert "blk.0.attn_k_b.weight" in specs and "blk.0.attn_kv_b.weight" not in specs


@pytest.mark.parametrize("preset", TINY)
def test_tandem_config_from_metadata_equals_the_presets(files, preset):
    want = preset_config(preset)
    got = open_checkpoint(files[preset, "Q4_K_M-like"]).config
    mt = want["model_type"]
    assert got["model_type"] == mt
    for key in KEYS + FAMILY_KEYS[mt]:
        w = want.get(key, False if key == "norm_topk_prob" else None)  # transformers' default when absent
        if key == "topk_method" and w == "greedy" and want.get("n_group", 1) > 1:
            w = "group_limited_greedy"
        assert got.get(key) == pytest.approx(w) if isinstance(w, float) else got.get(key) == w, key


@pytest.mark.parametrize("preset", TINY)
def test_tandem_loads_and_generates(files, preset):
    for quant in ("F32", "Q4_K_M-like"):
        llm = tandem.load(files[preset, quant], progress=False, dtype="float32")
        out = llm.generate("<|im_start|>user\nhi<|im_end|>\n", max_new_tokens=6, ignore_eos=True)
        assert len(out.token_ids) == 6
        logits = llm.logits(out.token_ids)
        assert torch.isfinite(logits).all() and logits.std() > 0.1  # random weights at O(1) activations


def test_q4_k_m_like_follows_llama_quantize_on_256_rows(tmp_path):
    """Rows of whole 256-blocks keep the K-quant types: Q4_K, Q6_K for ffn_down / attn_v in the 'more bits'
    layers (first and last eighth, every third between), Q6_K output, F32 norms and routers."""
    config = {**preset_config("tiny-qwen3-moe", layers=16), "hidden_size": 256, "head_dim": 64,
              "moe_intermediate_size": 256, "num_experts": 16}
    path = write_gguf(config, tmp_path / "m.gguf", "Q4_K_M-like", progress=False)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    more = [i for i in range(16) if types[f"blk.{i}.ffn_down_exps.weight"] == "Q6_K"]
    assert more == [0, 1, 4, 7, 10, 13, 14, 15]  # llama.cpp's use_more_bits(i, 16)
    assert [i for i in range(16) if types[f"blk.{i}.attn_v.weight"] == "Q6_K"] == more
    assert {types[f"blk.{i}.ffn_gate_exps.weight"] for i in range(16)} == {"Q4_K"}
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
    assert types["blk.0.ffn_gate_inp.weight"] == "F32" and types["blk.0.attn_q_norm.weight"] == "F32"
    llm = tandem.load(path, progress=False, dtype="float32")
    assert len(llm.generate([5, 6, 7], max_new_tokens=3, ignore_eos=True).token_ids) == 3


def test_fallbacks_and_mixtral_rules():
    assert tensor_type("blk.0.ffn_up_exps.weight", (8, 32, 64), "Q4_K_M-like", 3, 4) == "Q5_0"  # 64 % 256
    assert tensor_type("blk.2.ffn_down_exps.weight", (8, 64, 32), "Q4_K_M-like", 3, 4) == "Q8_0"  # Q6_K: last
    assert tensor_type("blk.0.attn_k_b.weight", (4, 16, 16), "Q4_K_M-like", 3, 4) == "F16"  # 16 % 32
    assert tensor_type("blk.5.attn_v.weight", (1024, 4096), "Q4_K_M-like", 32, 8) == "Q8_0"  # 8 experts
    assert tensor_type("blk.5.attn_output.weight", (4096, 4096), "Q4_K_M-like", 32, 8) == "Q5_K"
    assert tensor_type("blk.5.ffn_up_exps.weight", (8, 256, 512), "Q8_0", 32, 8) == "Q8_0"
    assert tensor_type("blk.5.ffn_norm.weight", (512,), "BF16", 32, 8) == "F32"


@pytest.mark.parametrize("t", ["Q4_0", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "BF16", "F16"])
def test_random_blocks_are_valid_with_the_intended_deviation(t):
    """Dequantized by tandem's dequantizer (checked against gguf's in tests/weights): finite, mean ~0 and the
    requested deviation. Tolerances: 40k values give a sampling error of the deviation well under 3%; the scale
    jitter and the K-quants' rms-of-scales constants are exact to ~2%, so 8% on the deviation, 0.05 std on the mean."""
    std = 0.02
    n = 160_000 // GGML[t][1] if GGML[t][1] > 1 else 40_000
    raw = random_blocks(t, n, std, np.random.default_rng(0))
    if t in ("BF16", "F16"):
        x = torch.from_numpy(raw.reshape(-1).copy()).view(torch.bfloat16 if t == "BF16" else torch.float16).float()
    else:
        x = dequantize(torch.from_numpy(raw.reshape(-1)), NAMES[t], (n * GGML[t][1],), torch.float32)
    assert torch.isfinite(x).all()
    assert abs(x.std().item() / std - 1) < 0.08, x.std().item()
    assert abs(x.mean().item()) < 0.05 * std


def test_tokenizer_from_the_file_gives_the_assets_ids(files):
    """tokenizer.ggml.* rebuilt by tandem splits as tandem/assets/tokenizer.json does (pads never appear)."""
    from importlib import resources

    with resources.as_file(resources.files("tandem") / "assets" / "tokenizer.json") as src:
        ref = HFTokenizer.from_file(str(src))
    llm = tandem.load(files["tiny-qwen3-moe", "F32"], progress=False)
    assert llm.tokenizer.encode(TEXT) == ref.encode(TEXT).ids
    assert llm.tokenizer.decode(llm.tokenizer.encode("Ça va? 你好")) == "Ça va? 你好"
    assert "<|im_start|>assistant" in llm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_real_shapes_header_and_bytes(tmp_path):
    """Qwen3-30B-A3B cut to 2 layers: real per-layer shapes (128 experts of 768 x 2048), the Q4_K_M-like mix and
    the file size llama.cpp's layout implies, written in constant memory."""
    path = tmp_path / "q.gguf"
    r = _cli("synth", "qwen3-30b-a3b", "--gguf", "--layers", "2", "--out", str(path))
    assert r.returncode == 0, r.stderr
    reader = gguf.GGUFReader(path)
    t = {x.name: x for x in reader.tensors}
    assert tuple(int(v) for v in t["blk.0.ffn_gate_exps.weight"].shape) == (2048, 768, 128)
    assert t["blk.0.ffn_gate_exps.weight"].tensor_type.name == "Q4_K"
    assert t["blk.1.ffn_down_exps.weight"].tensor_type.name == "Q6_K"  # use_more_bits(1, 2): last eighth
    counts = Counter(x.tensor_type.name for x in reader.tensors)
    assert set(counts) == {"F32", "Q4_K", "Q6_K"}
    assert path.stat().st_size >= sum(int(x.n_bytes) for x in reader.tensors)
    assert PRESETS["qwen3-30b-a3b"]["num_experts"] == 128
