"""Test helpers: tiny Hugging Face models and synthetic GGUF files written the way llama.cpp writes them."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import gguf
import numpy as np
import torch

from clusterfuse.models.config import ModelConfig


def smollm2_gguf() -> Path:
    from clusterfuse.models.embedded import embedded_gguf_path

    return embedded_gguf_path()


@lru_cache(maxsize=1)
def smollm2_loaded():
    """Our load of the embedded SmolLM2 GGUF (float32), shared by the test modules."""
    from clusterfuse.models.loader import load_model

    return load_model(None, dtype=None, progress=False)


@lru_cache(maxsize=1)
def smollm2_hf_tokenizer():
    """``transformers``' own tokenizer for the same GGUF: the reference."""
    from transformers import AutoTokenizer

    path = smollm2_gguf()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@lru_cache(maxsize=1)
def smollm2_hf_state_dict() -> dict[str, torch.Tensor]:
    """``transformers``' ``LlamaForCausalLM`` loaded from the same GGUF (its own dequantisation and un-permute)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    path = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.state_dict()


SP_PIECES = ["▁", "t", "h", "e", "a", "n", "d", "o", "r", "l", "w", "i", "s", "c", "▁t", "th", "he", "▁th", "▁the",
             "an", "▁an", "▁and", "or", "▁w", "▁wor", "ld", "▁world", "▁he", "ll", "llo", "▁hello", "▁a", "is",
             "▁is", "▁i", "at", "▁c", "▁cat", "▁s", "▁sat", "<tag>"]


def write_sentencepiece_metadata(w: gguf.GGUFWriter) -> None:
    """A tiny SentencePiece-style ``llama`` vocabulary: specials, 256 byte tokens, scored pieces,
    one user-defined token, and a chat template."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SP_PIECES
    types = [2, 3, 3] + [6] * 256 + [1] * (len(SP_PIECES) - 1) + [4]
    scores = [0.0] * 259 + [-float(i) for i in range(len(SP_PIECES))]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_chat_template("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}"
                        "{% endfor %}")


# ------------------------------------------------------------------------------------- tiny HF models
def tiny_llama(tie: bool = False):
    import transformers as T

    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        tie_word_embeddings=tie)
    return T.LlamaForCausalLM(cfg).eval()


def tiny_qwen2():
    import transformers as T

    torch.manual_seed(1)
    cfg = T.Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        tie_word_embeddings=False)
    model = T.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # HF inits biases to zero: make them non-zero so the test sees them
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_()
    return model


def tiny_deepseek_v2(q_lora_rank: int | None = None):
    import transformers as T

    torch.manual_seed(2)
    cfg = T.DeepseekV2Config(vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
                             num_experts_per_tok=2, n_shared_experts=2, first_k_dense_replace=1, kv_lora_rank=32,
                             q_lora_rank=q_lora_rank, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                             max_position_embeddings=128)
    model = T.DeepseekV2ForCausalLM(cfg).eval()
    with torch.no_grad():  # HF leaves some tensors at 0 / 1: randomise everything
        for p in model.parameters():
            p.normal_()
    return model


# --------------------------------------------------------------------------------------- GGUF writing
def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp ``convert_hf_to_gguf.py``'s ``LlamaModel.permute`` (HF rotate-half → interleaved rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
_LAYER = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "self_attn.q_a_proj": "attn_q_a", "self_attn.q_a_layernorm": "attn_q_a_norm",
    "self_attn.q_b_proj": "attn_q_b", "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa",
    "self_attn.kv_a_layernorm": "attn_kv_a_norm", "self_attn.kv_b_proj": "attn_kv_b", "mlp.gate": "ffn_gate_inp",
    "mlp.shared_experts.gate_proj": "ffn_gate_shexp", "mlp.shared_experts.up_proj": "ffn_up_shexp",
    "mlp.shared_experts.down_proj": "ffn_down_shexp", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
}


def gguf_tensors(config: ModelConfig, weights: dict[str, torch.Tensor], arch: str,
                 split_kv_b: bool = False) -> dict[str, np.ndarray]:
    """Our HF-named weights → llama.cpp tensor names and layouts (float32 numpy, HF row-major shapes)."""
    out: dict[str, np.ndarray] = {}
    experts: dict[tuple[int, str], dict[int, np.ndarray]] = {}
    for name, t in weights.items():
        a = t.detach().float().cpu().numpy()
        if name in _GLOBAL:
            out[_GLOBAL[name]] = a
            continue
        parts = name.split(".")
        layer, rest, kind = int(parts[2]), ".".join(parts[3:-1]), parts[-1]
        if rest.startswith("mlp.experts."):
            e, proj = int(parts[5]), parts[6]
            experts.setdefault((layer, proj), {})[e] = a
            continue
        if arch == "llama" and rest == "self_attn.q_proj":
            a = llama_cpp_permute(a, config.num_attention_heads)
        if arch == "llama" and rest == "self_attn.k_proj":
            a = llama_cpp_permute(a, config.num_key_value_heads)
        if split_kv_b and rest == "self_attn.kv_b_proj":  # newer llama.cpp: attn_k_b + attn_v_b
            mla, n = config.mla, config.num_attention_heads
            kv_b = a.reshape(n, mla.qk_nope_head_dim + mla.v_head_dim, mla.kv_lora_rank)
            out[f"blk.{layer}.attn_k_b.weight"] = np.ascontiguousarray(
                kv_b[:, : mla.qk_nope_head_dim].transpose(0, 2, 1))
            out[f"blk.{layer}.attn_v_b.weight"] = np.ascontiguousarray(kv_b[:, mla.qk_nope_head_dim:])
            continue
        out[f"blk.{layer}.{_LAYER[rest]}.{kind}"] = a
    for (layer, proj), by_e in experts.items():
        gname = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}[proj]
        out[f"blk.{layer}.{gname}.weight"] = np.stack([by_e[e] for e in sorted(by_e)])
    return out


def write_gguf(path: Path, config: ModelConfig, weights: dict[str, torch.Tensor], *, arch: str = "llama",
               qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32, split_kv_b: bool = False,
               metadata: Callable[[gguf.GGUFWriter], None] | None = None,
               extra_tensors: dict[str, np.ndarray] | None = None,
               rope_yarn: dict | None = None) -> dict[str, np.ndarray]:
    """Write a GGUF of ``weights`` with matrices stored as ``qtype`` (norms and biases stay F32, like llama.cpp).
    Returns the float32 arrays actually stored (after quantisation round-trip) by GGUF name."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_rope_freq_base(config.rope.theta)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    if arch == "qwen3":
        w.add_key_length(config.head_dim)
        w.add_value_length(config.head_dim)
    if arch == "deepseek2":
        mla, moe = config.mla, config.moe
        w.add_kv_lora_rank(mla.kv_lora_rank)
        if mla.q_lora_rank:
            w.add_q_lora_rank(mla.q_lora_rank)
        w.add_key_length(mla.qk_head_dim)
        w.add_value_length(mla.v_head_dim)
        w.add_rope_dimension_count(mla.qk_rope_head_dim)
        w.add_leading_dense_block_count(moe.first_k_dense_replace)
        w.add_expert_count(moe.n_routed_experts)
        w.add_expert_used_count(moe.num_experts_per_tok)
        w.add_expert_shared_count(moe.n_shared_experts)
        w.add_expert_feed_forward_length(moe.moe_intermediate_size)
        w.add_expert_weights_scale(moe.routed_scaling_factor)
        w.add_expert_weights_norm(moe.norm_topk_prob)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)
    if rope_yarn:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope_yarn["factor"])
        w.add_rope_scaling_orig_ctx_len(rope_yarn["original"])
        w.add_rope_scaling_yarn_log_mul(0.1 * rope_yarn["mscale_all_dim"])
    if metadata is not None:
        metadata(w)
    stored = {}
    tensors = gguf_tensors(config, weights, arch, split_kv_b)
    tensors.update(extra_tensors or {})
    for name, a in tensors.items():
        q = qtype if a.ndim >= 2 and not name.startswith("rope_freqs") else gguf.GGMLQuantizationType.F32
        data = gguf.quants.quantize(a.astype(np.float32), q)
        w.add_tensor(name, data, raw_dtype=q)
        stored[name] = gguf.quants.dequantize(data, q).reshape(a.shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored
