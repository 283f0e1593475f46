"""Published config.json shapes of the models the KTransformers rule files were written for (no weights)."""

DEEPSEEK_V2_CHAT = {
    "model_type": "deepseek_v2", "architectures": ["DeepseekV2ForCausalLM"], "hidden_size": 5120,
    "num_hidden_layers": 60, "num_attention_heads": 128, "num_key_value_heads": 128, "kv_lora_rank": 512,
    "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "n_routed_experts": 160, "n_shared_experts": 2, "num_experts_per_tok": 6, "moe_intermediate_size": 1536,
    "intermediate_size": 12288, "first_k_dense_replace": 1, "moe_layer_freq": 1, "vocab_size": 102400,
    "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "mscale": 0.707,
                     "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1},
    "topk_method": "group_limited_greedy", "n_group": 8, "topk_group": 3, "scoring_func": "softmax",
    "norm_topk_prob": False, "routed_scaling_factor": 16.0, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
}
MIXTRAL_8X7B = {
    "model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2,
    "vocab_size": 32000, "rope_theta": 1e6, "max_position_embeddings": 32768, "torch_dtype": "bfloat16",
}
QWEN2_57B_A14B = {
    "model_type": "qwen2_moe", "hidden_size": 3584, "intermediate_size": 18944, "moe_intermediate_size": 2560,
    "shared_expert_intermediate_size": 20480, "num_hidden_layers": 28, "num_attention_heads": 28,
    "num_key_value_heads": 4, "num_experts": 64, "num_experts_per_tok": 8, "vocab_size": 151936,
    "rope_theta": 1e6, "max_position_embeddings": 32768, "torch_dtype": "bfloat16",
}
QWEN3_30B_A3B = {
    "model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
    "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
    "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True, "vocab_size": 151936,
    "rope_theta": 1e6, "max_position_embeddings": 40960, "torch_dtype": "bfloat16",
}
# small dims, many layers: for rule files that name layer 30 (bad-rule table); builds in a blink
SMALL_DEEPSEEK = dict(DEEPSEEK_V2_CHAT, hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                      kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                      n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=32,
                      intermediate_size=96, vocab_size=256, n_group=4, topk_group=2, num_hidden_layers=40)

# which config each KTransformers file in data/ is explained against
FOR_FILE = {"Mixtral.yaml": MIXTRAL_8X7B, "Qwen2-57B-A14B-Instruct.yaml": QWEN2_57B_A14B,
            "Qwen3Moe-serve.yaml": QWEN3_30B_A3B}
