"""KTransformers names -> tandem names: the classes rules match on, the operators they replace with, the
kernels they pick (generate_op / prefill_op). A KTransformers file loads unchanged through these tables.

Match classes carry the tandem family they belong to (models/<family>.py): `Qwen2MoeSparseMoeBlock` matches
tandem's SparseMoE in a Qwen2-MoE model only, as it matches only Qwen2-MoE modules in KTransformers.
"""

from __future__ import annotations

KT = "ktransformers."
_L = "tandem.models.layers."
_T = "tandem.models.transformer."
_DS = "tandem.models.deepseek."
_ATT = "tandem.models.attention.Attention"

# match.class: KTransformers model class -> (tandem class path, family module or None for any family)
MATCH_CLASSES: dict[str, tuple[str, str | None]] = {
    "torch.nn.Linear": ("torch.nn.Linear", None),
    "torch.nn.modules.linear.Linear": ("torch.nn.Linear", None),
    "torch.nn.Embedding": ("torch.nn.Embedding", None),
}
for _mod in ("modeling_deepseek", "modeling_deepseek_v3"):
    _v = "V2" if _mod == "modeling_deepseek" else "V3"
    for _name, _target in {
        f"Deepseek{_v}MoE": _T + "SparseMoE",
        "MoEGate": _DS + "MoEGate",
        f"Deepseek{_v}Attention": _DS + "MLAttention",
        f"Deepseek{_v}MLP": _L + "GatedMLP",
        f"Deepseek{_v}RMSNorm": _L + "RMSNorm",
        f"Deepseek{_v}RotaryEmbedding": _L + "RotaryEmbedding",
        f"Deepseek{_v}YarnRotaryEmbedding": _L + "RotaryEmbedding",
        f"Deepseek{_v}Model": _T + "DecoderModel",
        f"Deepseek{_v}DecoderLayer": _T + "DecoderLayer",
    }.items():
        MATCH_CLASSES[f"{KT}models.{_mod}.{_name}"] = (_target, "deepseek")
for _mod, _p, _fam in (("modeling_qwen2_moe", "Qwen2Moe", "qwen2_moe"), ("modeling_qwen3_moe", "Qwen3Moe", "qwen3_moe"),
                       ("modeling_mixtral", "Mixtral", "mixtral"), ("modeling_llama", "Llama", "llama")):
    for _name, _target in {
        f"{_p}SparseMoeBlock": _T + "SparseMoE",
        f"{_p}Attention": _ATT,
        f"{_p}MLP": _L + "GatedMLP",
        f"{_p}BlockSparseTop2MLP": "tandem.models.mixtral.MixtralExpert",
        f"{_p}RMSNorm": _L + "RMSNorm",
        f"{_p}RotaryEmbedding": _L + "RotaryEmbedding",
        f"{_p}Model": _T + "DecoderModel",
        f"{_p}DecoderLayer": _T + "DecoderLayer",
    }.items():
        MATCH_CLASSES[f"{KT}models.{_mod}.{_name}"] = (_target, _fam)

# replace.class: KTransformers operator -> tandem operator (tandem.ops registry name)
OPERATORS: dict[str, str] = {
    f"{KT}operators.experts.KTransformersExperts": "experts",
    f"{KT}operators.experts.KTransformersExpertsV2": "experts",
    f"{KT}operators.experts.KDeepseekV2MoE": "moe",
    f"{KT}operators.experts.KDeepseekV3MoE": "moe",
    f"{KT}operators.experts.KDeepseekV3MoEV2": "moe",
    f"{KT}operators.experts.KQwen2MoeSparseMoeBlock": "moe",
    f"{KT}operators.experts.KQwen3MoeSparseMoeBlock": "moe",
    f"{KT}operators.experts.KQwen2MoeSparseMoeBlockV2": "moe",
    f"{KT}operators.experts.KQwen3MoeSparseMoeBlockV2": "moe",
    f"{KT}operators.experts.KMistralSparseMoEBlock": "moe",
    f"{KT}operators.linear.KTransformersLinear": "linear",
    f"{KT}operators.attention.KDeepseekV2Attention": "mla",
    f"{KT}operators.balance_serve_attention.KDeepseekV2Attention": "mla",
    f"{KT}operators.balance_serve_attention.KQwen2MoeAttention": "attention",
    f"{KT}operators.balance_serve_attention.KQwen3MoeAttention": "attention",
    f"{KT}operators.models.KDeepseekV2Model": "model",
    f"{KT}operators.models.KQwen2MoeModel": "model",
    f"{KT}operators.models.KQwen3MoeModel": "model",
    f"{KT}operators.models.KLlamaModel": "model",
    f"{KT}operators.RoPE.RotaryEmbedding": "rope",
    f"{KT}operators.RoPE.RotaryEmbeddingV3": "rope",
    f"{KT}operators.RoPE.YarnRotaryEmbedding": "rope",
    f"{KT}operators.RoPE.YarnRotaryEmbeddingV3": "rope",
    f"{KT}operators.RoPE.DeepSeekV3YarnRotaryEmbedding": "rope",
    f"{KT}operators.gate.KMoEGate": "gate",
    f"{KT}operators.gate.KMoEGateDeepSeekV3": "gate",
    f"{KT}operators.layernorm.RMSNorm": "norm",
    f"{KT}operators.layernorm.KQwen3MoeRMSNorm": "norm",
    f"{KT}operators.layernorm.KQwen2MoeRMSNorm": "norm",
    f"{KT}operators.layernorm.DeepseekV3RMSNorm": "norm",
    f"{KT}operators.mlp.KQwen2MoeMLP": "mlp",
    f"{KT}operators.mlp.kDeepseekV3MLP": "mlp",
}

# generate_op / prefill_op: KTransformers kernel -> tandem backend
BACKENDS: dict[str, str] = {
    "KExpertsCPU": "experts.cpu",
    "KExpertsTorch": "experts.torch",
    "KExpertsMarlin": "experts.marlin",
    "MLPCUDAExperts": "experts.marlin",  # the tutorial's older name for GPU experts
    "KLinearTorch": "linear.torch",
    "KLinearMarlin": "linear.marlin",
    "VLinearMarlin": "linear.marlin",
    "KLinearFP8": "linear.fp8",
}


def short(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def by_short_name(table: dict[str, object], name: str) -> list[str]:
    """Full paths in `table` whose last component is `name` (tutorials often write bare class names)."""
    return [k for k in table if short(k) == name]
