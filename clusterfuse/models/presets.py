"""Architecture presets: the shapes of well-known models, for random-weight runs and benchmarks.

A preset holds no weights; ``clusterfuse.models.random_init`` fills them, seeded.
"""

from __future__ import annotations

from clusterfuse.models.config import ConfigError, MLAConfig, ModelConfig, MoEConfig, RopeConfig


def _llama_3_2(name: str, *, hidden: int, layers: int, heads: int, head_dim: int) -> ModelConfig:
    """Llama-3.2 1B / 3B: 8 KV heads, intermediate 8192, tied embeddings, Llama-3 rope scaling by 32."""
    return ModelConfig(
        family="llama", architecture="LlamaForCausalLM", name=name,
        vocab_size=128256, hidden_size=hidden, intermediate_size=8192, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=8, head_dim=head_dim, rms_norm_eps=1e-5,
        rope=RopeConfig(theta=500000.0, kind="llama3", factor=32.0, low_freq_factor=1.0,
                        high_freq_factor=4.0, original_max_position_embeddings=8192),
        max_position_embeddings=131072, tie_word_embeddings=True,
        bos_token_id=128000, eos_token_ids=(128001, 128008, 128009))


def _qwen3(name: str, *, hidden: int, intermediate: int, layers: int, heads: int, tied: bool) -> ModelConfig:
    """Qwen3 dense: QK-norm, head_dim 128 whatever the width (0.6B: 16 x 128 heads on hidden 1024), 8 KV heads."""
    return ModelConfig(
        family="llama", architecture="Qwen3ForCausalLM", name=name,
        vocab_size=151936, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
        rope=RopeConfig(theta=1000000.0), max_position_embeddings=40960, tie_word_embeddings=tied,
        qk_norm=True, bos_token_id=151643, eos_token_ids=(151645,))


PRESETS: dict[str, ModelConfig] = {
    "llama-2-7b": ModelConfig(
        family="llama", architecture="LlamaForCausalLM", name="llama-2-7b",
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, head_dim=128, rms_norm_eps=1e-5,
        rope=RopeConfig(theta=10000.0), max_position_embeddings=4096,
        bos_token_id=1, eos_token_ids=(2,)),
    "llama-3-8b": ModelConfig(
        family="llama", architecture="LlamaForCausalLM", name="llama-3-8b",
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
        rope=RopeConfig(theta=500000.0), max_position_embeddings=8192,
        bos_token_id=128000, eos_token_ids=(128001, 128009)),
    "llama-3.1-8b": ModelConfig(
        family="llama", architecture="LlamaForCausalLM", name="llama-3.1-8b",
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
        rope=RopeConfig(theta=500000.0, kind="llama3", factor=8.0, low_freq_factor=1.0,
                        high_freq_factor=4.0, original_max_position_embeddings=8192),
        max_position_embeddings=131072, bos_token_id=128000, eos_token_ids=(128001, 128008, 128009)),
    "mistral-7b": ModelConfig(
        family="llama", architecture="MistralForCausalLM", name="mistral-7b",
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
        rope=RopeConfig(theta=10000.0), max_position_embeddings=32768,
        bos_token_id=1, eos_token_ids=(2,)),
    "qwen2-7b": ModelConfig(
        family="llama", architecture="Qwen2ForCausalLM", name="qwen2-7b",
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, head_dim=128, rms_norm_eps=1e-6,
        rope=RopeConfig(theta=1000000.0), max_position_embeddings=32768, attention_bias=True,
        bos_token_id=151643, eos_token_ids=(151643, 151645)),
    "llama-3.2-1b": _llama_3_2("llama-3.2-1b", hidden=2048, layers=16, heads=32, head_dim=64),
    "llama-3.2-3b": _llama_3_2("llama-3.2-3b", hidden=3072, layers=28, heads=24, head_dim=128),
    "qwen3-0.6b": _qwen3("qwen3-0.6b", hidden=1024, intermediate=3072, layers=28, heads=16, tied=True),
    "qwen3-8b": _qwen3("qwen3-8b", hidden=4096, intermediate=12288, layers=36, heads=32, tied=False),
    "smollm2-135m": ModelConfig(
        family="llama", architecture="LlamaForCausalLM", name="smollm2-135m",
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
        rope=RopeConfig(theta=100000.0), max_position_embeddings=8192, tie_word_embeddings=True,
        bos_token_id=1, eos_token_ids=(2,)),
    "deepseek-v2-lite": ModelConfig(
        family="deepseek_v2", architecture="DeepseekV2ForCausalLM", name="deepseek-v2-lite",
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, num_hidden_layers=27,
        num_attention_heads=16, num_key_value_heads=16, head_dim=128, rms_norm_eps=1e-6,
        rope=RopeConfig(theta=10000.0, kind="yarn", factor=40.0, original_max_position_embeddings=4096,
                        beta_fast=32.0, beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707),
        max_position_embeddings=163840, bos_token_id=100000, eos_token_ids=(100001,),
        mla=MLAConfig(kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                      q_lora_rank=None),
        moe=MoEConfig(n_routed_experts=64, num_experts_per_tok=6, moe_intermediate_size=1408,
                      n_shared_experts=2, first_k_dense_replace=1, routed_scaling_factor=1.0,
                      norm_topk_prob=False, topk_method="greedy")),
}


def preset(name: str) -> ModelConfig:
    """The config of preset ``name``; a clear error listing the presets otherwise."""
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise ConfigError(f"model: unknown preset {name!r}; presets: {', '.join(PRESETS)}") from None
