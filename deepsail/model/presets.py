"""Named model presets. Each real architecture has a `-debug` flavour: same wiring, tiny numbers, for tests."""

from __future__ import annotations

from typing import Any

_V3: dict[str, Any] = dict(  # DeepSeek-V3 / R1 (671B total, 37B active)
    model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432, num_hidden_layers=61,
    num_attention_heads=128, max_position_embeddings=163840, q_lora_rank=1536, kv_lora_rank=512,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, rope_theta=10000.0,
    rope_scaling=dict(rope_type="yarn", factor=40.0, original_max_position_embeddings=4096, beta_fast=32,
                      beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
    n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, moe_intermediate_size=2048, n_group=8,
    topk_group=4, topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5,
    first_k_dense_replace=3, num_nextn_predict_layers=1, bos_token_id=0, eos_token_id=1,
)
_V2_LITE: dict[str, Any] = dict(  # DeepSeek-V2-Lite (16B total, 2.4B active)
    model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944, num_hidden_layers=27,
    num_attention_heads=16, max_position_embeddings=163840, q_lora_rank=0, kv_lora_rank=512, qk_nope_head_dim=128,
    qk_rope_head_dim=64, v_head_dim=128,
    rope_scaling=dict(rope_type="yarn", factor=40.0, original_max_position_embeddings=4096, beta_fast=32,
                      beta_slow=1, mscale=0.707, mscale_all_dim=0.707),
    n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, moe_intermediate_size=1408, n_group=1,
    topk_group=1, topk_method="greedy", scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0,
    first_k_dense_replace=1, aux_loss_alpha=0.001, bos_token_id=100000, eos_token_id=100001,
)
_QWEN2_1_5B: dict[str, Any] = dict(  # Qwen2.5-1.5B / DeepSeek-R1-Distill-Qwen-1.5B
    model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
    num_attention_heads=12, num_key_value_heads=2, attention_type="gqa", attention_bias=True, rope_interleave=False,
    rope_theta=10000.0, max_position_embeddings=131072, rms_norm_eps=1e-6, tie_word_embeddings=False,
)
_LLAMA_8B: dict[str, Any] = dict(  # Llama-3.1-8B / DeepSeek-R1-Distill-Llama-8B
    model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, attention_type="gqa", rope_interleave=False, rope_theta=500000.0,
    rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192),
    max_position_embeddings=131072, rms_norm_eps=1e-5,
)

PRESETS: dict[str, dict[str, Any]] = {
    "deepseek-v3": _V3,
    "deepseek-v3-debug": {
        **_V3, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
        "num_attention_heads": 4, "max_position_embeddings": 512, "q_lora_rank": 32, "kv_lora_rank": 32,
        "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
        "rope_scaling": dict(_V3["rope_scaling"], factor=4.0, original_max_position_embeddings=128),
        "n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "n_group": 4, "topk_group": 2,
        "first_k_dense_replace": 1,
    },
    # The ~35M-parameter model of the speed benchmark and the default `deepsail run` size class.
    "deepseek-v3-small": {
        **_V3, "vocab_size": 8192, "hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8,
        "num_attention_heads": 8, "max_position_embeddings": 2048, "q_lora_rank": 128, "kv_lora_rank": 64,
        "qk_nope_head_dim": 64, "qk_rope_head_dim": 32, "v_head_dim": 64, "rope_scaling": None,
        "n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 256, "n_group": 1,
        "topk_group": 1, "routed_scaling_factor": 1.0, "first_k_dense_replace": 1,
    },
    # `deepsail run`'s default: the V3 design (MLA + fine-grained MoE + shared expert + MTP) at a size 2 CPU cores
    # train in minutes (9.9M params, 5.4M active, MTP aside). The dense MLP is as wide as the active experts, so
    # `deepseek-v3-mini-dense` (every layer dense) has the same active parameters.
    "deepseek-v3-mini": {
        **_V3, "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 576, "num_hidden_layers": 6,
        "num_attention_heads": 4, "max_position_embeddings": 1024, "q_lora_rank": 96, "kv_lora_rank": 64,
        "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32, "rope_scaling": None,
        "n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 192, "n_group": 1,
        "topk_group": 1, "routed_scaling_factor": 1.0, "first_k_dense_replace": 1,
    },
    "deepseek-v2-lite": _V2_LITE,
    "deepseek-v2-lite-debug": {
        **_V2_LITE, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "max_position_embeddings": 512, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8, "v_head_dim": 16,
        "rope_scaling": dict(_V2_LITE["rope_scaling"], factor=4.0, original_max_position_embeddings=128),
        "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
    },
    "qwen2-1.5b": _QWEN2_1_5B,
    "qwen2-1.5b-debug": {
        **_QWEN2_1_5B, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512, "head_dim": 0,
        "tie_word_embeddings": True,
    },
    "llama-3-8b": _LLAMA_8B,
    "llama-3-8b-debug": {
        **_LLAMA_8B, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "rope_scaling": dict(_LLAMA_8B["rope_scaling"], original_max_position_embeddings=64),
    },
}
PRESETS["deepseek-v3-mini-dense"] = {**PRESETS["deepseek-v3-mini"], "n_routed_experts": 0, "n_shared_experts": 0}
