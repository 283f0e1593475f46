"""Tiny random-weight Hugging Face models, one per family, exercising the non-default paths (shared by tests)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

BASE = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)
_DS = dict(BASE, num_key_value_heads=4, moe_intermediate_size=32, kv_lora_rank=16, qk_nope_head_dim=16,
           qk_rope_head_dim=8, v_head_dim=16, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=3,
           first_k_dense_replace=1)
_YARN = dict(type="yarn", factor=4.0, original_max_position_embeddings=128, beta_fast=32, beta_slow=1,
             mscale=0.707, mscale_all_dim=0.707)

# name -> (config class, model class, kwargs)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(BASE, attention_bias=True, tie_word_embeddings=True,
                   rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=64))),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(BASE, num_local_experts=6, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(BASE, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=48, norm_topk_prob=False, mlp_only_layers=[1])),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(BASE, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16,
                       norm_topk_prob=True, decoder_sparse_step=2)),
    # V2: no q_lora, group-limited routing, YaRN with mscale, one dense layer first
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                    dict(_DS, q_lora_rank=None, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                         routed_scaling_factor=1.5, norm_topk_prob=False, rope_scaling=_YARN)),
    "deepseek_v2_greedy": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                           dict(_DS, q_lora_rank=24, topk_method="greedy", routed_scaling_factor=1.0,
                                n_shared_experts=2, first_k_dense_replace=0)),
    # V3: q_lora, noaux_tc with a correction bias, normalised and not
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(_DS, q_lora_rank=24, n_group=4, topk_group=2, norm_topk_prob=True,
                         routed_scaling_factor=2.5, rope_scaling=dict(_YARN, mscale=1.0, mscale_all_dim=1.0))),
    "deepseek_v3_unnormed": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                             dict(_DS, q_lora_rank=24, n_group=2, topk_group=1, norm_topk_prob=False,
                                  routed_scaling_factor=1.0, first_k_dense_replace=2)),
}


# every linear of a layer in whole 128 x 128 FP8 blocks along K (DeepSeek-V3's and Qwen3's FP8 checkpoints)
WIDE = dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=128, head_dim=32, kv_lora_rank=128,
            q_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=64)


def make_hf(name: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A float32 random model of family `name` with weights of O(1) activations (not the tiny default init);
    `overrides` change its config (e.g. **WIDE)."""
    cfg_cls, model_cls, kw = FAMILIES[name]
    kw = {**kw, **{k: v for k, v in overrides.items() if k in kw or k not in WIDE}}
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**kw)).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.uniform_(0.8, 1.2)
            elif p.dim() >= 2:
                p.normal_(0, 1.0 / p.shape[-1] ** 0.5 * (1.0 if "embed" not in pname else 8.0))
            else:
                p.normal_(0, 0.1)
        for bname, b in model.named_buffers():
            if "e_score_correction_bias" in bname:
                b.normal_(0, 0.05)
    return model


def save_hf(model, path: Path, hub_style: bool = False) -> Path:
    """save_pretrained; hub_style rewrites rope_parameters as the Hub's rope_theta + rope_scaling."""
    model.save_pretrained(path)
    if hub_style:
        cfg = json.loads((path / "config.json").read_text())
        rope = dict(cfg.pop("rope_parameters"))
        cfg["rope_theta"] = rope.pop("rope_theta")
        if rope.get("rope_type", "default") != "default":
            rope["type"] = rope.pop("rope_type")
            cfg["rope_scaling"] = rope
        (path / "config.json").write_text(json.dumps(cfg))
    return path


def to_fp8_checkpoint(path: Path) -> Path:
    """Rewrite a saved model as an FP8 checkpoint of DeepSeek-V3's kind: every linear of a layer with whole
    128-value blocks along K stored as float8_e4m3fn plus `<name>_scale_inv` (128 x 128 block scales, w = q s),
    and the config's quantization_config saying so. Returns path."""
    from safetensors.torch import load_file, save_file

    from tandem.gpu.blocks import fp8_quantize
    from tandem.synth import FP8_CONFIG, FP8_LINEAR

    for f in sorted(path.glob("*.safetensors")):
        tensors = load_file(f)
        for name in [n for n, t in tensors.items() if FP8_LINEAR.match(n) and t.dim() == 2 and t.shape[1] % 128 == 0]:
            tensors[name], tensors[name + "_scale_inv"] = fp8_quantize(tensors[name].float())
        save_file(tensors, f, metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = FP8_CONFIG
    (path / "config.json").write_text(json.dumps(cfg))
    return path
