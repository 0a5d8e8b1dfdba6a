"""Tiny models of the families users fine-tune in 2026, from transformers' own config classes (no download).

Every family keeps what makes it different: GQA, sliding windows shorter than the samples (Mistral, Gemma 2/3,
gpt-oss), attention sinks (gpt-oss), soft-capping (Gemma 2), MLA (DeepSeek-V3), experts with a router loss
(Qwen3-MoE, Mixtral, gpt-oss, Qwen3-Next, Granite 4), Gated DeltaNet (Qwen3-Next), short convolutions (LFM2)
and Mamba2 (Granite 4 hybrid). Experts run transformers' eager loop (``experts_implementation="eager"``) so the
models run in float64; the grouped kernel refuses float64.
"""

from __future__ import annotations

COMMON = dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, pad_token_id=0, eos_token_id=1, bos_token_id=2, use_cache=False,
              max_position_embeddings=256, tie_word_embeddings=False)
MOE = dict(num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=10.0)

FAMILIES: dict[str, dict] = {
    "llama": {},
    "qwen2": {},
    "qwen3": {},
    "mistral": {"sliding_window": 6},
    "phi3": {},
    "gemma2": {"sliding_window": 6},
    "gemma3_text": {"sliding_window": 6, "layer_types": ["sliding_attention"] * 3 + ["full_attention"]},
    "olmo2": {},
    "glm4": {},
    "smollm3": {},
    "qwen3_moe": {"num_experts": 4, "moe_intermediate_size": 16, **MOE},
    "mixtral": {"num_local_experts": 4, **MOE},
    "gpt_oss": {"num_local_experts": 4, "sliding_window": 6, **MOE},
    "deepseek_v3": {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "kv_lora_rank": 16,
                    "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8, "n_group": 1,
                    "topk_group": 1, "first_k_dense_replace": 1, "num_key_value_heads": 4},
    "qwen3_next": {"num_experts": 4, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16,
                   "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8,
                   "linear_value_head_dim": 8, **MOE},
    "lfm2": {"layer_types": ["conv", "full_attention", "conv", "full_attention"]},
    "granitemoehybrid": {"layer_types": ["mamba", "attention", "mamba", "attention"], "num_local_experts": 4,
                         "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 8, "mamba_n_groups": 1,
                         "mamba_chunk_size": 8, "shared_intermediate_size": 32, **MOE},
}

# Relative tolerance of packed against unpacked gradients, float64. 1e-10 where every kernel runs in float64; these
# families compute parts in float32 by design, whatever the model's dtype: Gemma's RMSNorm (x.float()), Gemma 2's
# eager softmax (dtype=float32), DeepSeek-V3's router (float32 logits), Qwen3-Next's gated delta rule (float32 decay
# g). Their float32 roundings differ between a packed row and a sample alone, so 1e-6 relative (float32's ~1e-7
# per operation, a few layers deep) is the bar there. The same holds for the router loss and its share of the
# gradients in every MoE family: the model's own load_balancing_loss_func softmaxes and sums in float32.
FLOAT32_INSIDE = {"gemma2": 1e-6, "gemma3_text": 1e-6, "deepseek_v3": 1e-6, "qwen3_next": 1e-6}
ROUTER_TOLERANCE = 1e-6


def config(family: str, **overrides):
    from transformers import AutoConfig

    return AutoConfig.for_model(family, **{**COMMON, **FAMILIES[family], **overrides})
