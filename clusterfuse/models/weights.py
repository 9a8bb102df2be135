"""The weight contract: which tensors an architecture needs, with which shapes.

Every loader (safetensors, GGUF, random init) produces a ``dict[str, torch.Tensor]``
keyed by **Hugging Face parameter names**, and every consumer (reference, ops,
engine) reads that dict.  This module is the single place that spells the names
out, so that a loader cannot hand over a half-complete or mis-shaped model.

Llama family (Llama, Mistral, Qwen2, Qwen3, Phi-3: its fused ``qkv_proj`` / ``gate_up_proj`` are split
at load, `clusterfuse.models.fused_checkpoint`)::

    model.embed_tokens.weight                          (vocab, hidden)
    model.layers.{i}.input_layernorm.weight            (hidden,)
    model.layers.{i}.self_attn.q_proj.weight           (heads * head_dim, hidden)   (+ .bias if attention_bias)
    model.layers.{i}.self_attn.k_proj.weight           (kv_heads * head_dim, hidden) (+ .bias if attention_bias)
    model.layers.{i}.self_attn.v_proj.weight           (kv_heads * head_dim, hidden) (+ .bias if attention_bias)
    model.layers.{i}.self_attn.{q,k}_norm.weight       (head_dim,)   only with qk_norm (Qwen3)
    model.layers.{i}.self_attn.o_proj.weight           (hidden, heads * head_dim)
    model.layers.{i}.post_attention_layernorm.weight   (hidden,)
    model.layers.{i}.mlp.{gate,up}_proj.weight         (intermediate, hidden)
    model.layers.{i}.mlp.down_proj.weight              (hidden, intermediate)
    model.norm.weight                                  (hidden,)
    lm_head.weight                                     (vocab, hidden)   absent when tie_word_embeddings

DeepSeek-V2 (MLA attention, MoE MLP) uses the names of the *checkpoint files*
(per-expert tensors), which is also what ``transformers`` 5.x writes with
``save_pretrained``.  Note: inside ``transformers`` 5.x's ``DeepseekV2ForCausalLM``
the routed experts live fused in two 3-D parameters; to build its state dict from ours::

    mlp.experts.gate_up_proj[e] = cat([experts.{e}.gate_proj.weight, experts.{e}.up_proj.weight], dim=0)
    mlp.experts.down_proj[e]    = experts.{e}.down_proj.weight

(``fuse_experts_for_transformers`` below does exactly that.)  Shared experts are one MLP of
width ``moe_intermediate_size * n_shared_experts``.  Attention biases (``attention_bias``)
exist on ``q_a_proj``, ``kv_a_proj_with_mqa`` and ``o_proj`` as in HF.
"""

from __future__ import annotations

import torch

from clusterfuse.models.config import ModelConfig


class WeightsError(ValueError):
    """Weights that do not fit the architecture: a missing, unexpected or mis-shaped tensor, or an unreadable file."""


Shapes = dict[str, tuple[int, ...]]


def expected_shapes(config: ModelConfig) -> Shapes:
    """Every tensor the architecture of ``config`` needs, with its shape, in a stable order."""
    h = config.hidden_size
    shapes: Shapes = {"model.embed_tokens.weight": (config.vocab_size, h)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        if config.family == "deepseek_v2":
            shapes.update(_mla_attention_shapes(config, p + "self_attn."))
        else:
            shapes.update(_gqa_attention_shapes(config, p + "self_attn."))
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        if config.moe is not None and config.moe.is_moe_layer(i):
            shapes.update(_moe_shapes(config, p + "mlp."))
        else:
            shapes.update(_mlp_shapes(p + "mlp.", h, config.intermediate_size))
    shapes["model.norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    return shapes


def _gqa_attention_shapes(config: ModelConfig, p: str) -> Shapes:
    h, d = config.hidden_size, config.head_dim
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    shapes: Shapes = {
        p + "q_proj.weight": (q, h),
        p + "k_proj.weight": (kv, h),
        p + "v_proj.weight": (kv, h),
        p + "o_proj.weight": (h, q),
    }
    if config.qk_norm:  # Qwen3
        shapes.update({p + "q_norm.weight": (d,), p + "k_norm.weight": (d,)})
    if config.attention_bias:  # Qwen2: bias on q, k, v only
        shapes.update({p + "q_proj.bias": (q,), p + "k_proj.bias": (kv,), p + "v_proj.bias": (kv,)})
    return shapes


def _mla_attention_shapes(config: ModelConfig, p: str) -> Shapes:
    assert config.mla is not None
    mla, h, n = config.mla, config.hidden_size, config.num_attention_heads
    bias = config.attention_bias
    shapes: Shapes = {}
    if mla.q_lora_rank:
        shapes[p + "q_a_proj.weight"] = (mla.q_lora_rank, h)
        if bias:
            shapes[p + "q_a_proj.bias"] = (mla.q_lora_rank,)
        shapes[p + "q_a_layernorm.weight"] = (mla.q_lora_rank,)
        shapes[p + "q_b_proj.weight"] = (n * mla.qk_head_dim, mla.q_lora_rank)
    else:
        shapes[p + "q_proj.weight"] = (n * mla.qk_head_dim, h)
    shapes[p + "kv_a_proj_with_mqa.weight"] = (mla.kv_lora_rank + mla.qk_rope_head_dim, h)
    if bias:
        shapes[p + "kv_a_proj_with_mqa.bias"] = (mla.kv_lora_rank + mla.qk_rope_head_dim,)
    shapes[p + "kv_a_layernorm.weight"] = (mla.kv_lora_rank,)
    shapes[p + "kv_b_proj.weight"] = (n * (mla.qk_nope_head_dim + mla.v_head_dim), mla.kv_lora_rank)
    shapes[p + "o_proj.weight"] = (h, n * mla.v_head_dim)
    if bias:
        shapes[p + "o_proj.bias"] = (h,)
    return shapes


def _mlp_shapes(p: str, hidden: int, inter: int) -> Shapes:
    return {
        p + "gate_proj.weight": (inter, hidden),
        p + "up_proj.weight": (inter, hidden),
        p + "down_proj.weight": (hidden, inter),
    }


def _moe_shapes(config: ModelConfig, p: str) -> Shapes:
    assert config.moe is not None
    moe, h = config.moe, config.hidden_size
    shapes: Shapes = {p + "gate.weight": (moe.n_routed_experts, h)}
    for e in range(moe.n_routed_experts):
        shapes.update(_mlp_shapes(f"{p}experts.{e}.", h, moe.moe_intermediate_size))
    if moe.n_shared_experts:
        shapes.update(_mlp_shapes(p + "shared_experts.", h, moe.moe_intermediate_size * moe.n_shared_experts))
    return shapes


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def validate_weights(config: ModelConfig, weights: dict[str, torch.Tensor]) -> None:
    """Raise ``WeightsError`` unless ``weights`` holds exactly the tensors of ``expected_shapes(config)``.

    The message names the first offending tensors, and for a wrong shape says expected vs got,
    so a user can tell a wrong config from a wrong file.
    """
    expected = expected_shapes(config)
    missing = [n for n in expected if n not in weights]
    if missing:
        raise WeightsError(f"missing tensor {_listing(missing)} ({len(missing)} of {len(expected)} missing)")
    unexpected = sorted(n for n in weights if n not in expected)
    if unexpected:
        raise WeightsError(f"unexpected tensor {_listing(unexpected)} (not part of {config.architecture})")
    for name, shape in expected.items():
        t = weights[name]
        if not isinstance(t, torch.Tensor):
            raise WeightsError(f"tensor {name!r}: expected a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise WeightsError(f"tensor {name!r}: wrong shape, expected {shape}, got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise WeightsError(f"tensor {name!r}: expected a floating-point tensor, got {t.dtype}")


def fuse_experts_for_transformers(config: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our per-expert DeepSeek-V2 names → the state dict of ``transformers`` 5.x ``DeepseekV2ForCausalLM``
    (routed experts fused as ``mlp.experts.gate_up_proj`` (E, 2I, H) and ``mlp.experts.down_proj`` (E, H, I)).

    Tensors are stacked (copied); everything else is passed through.  A no-op for models without MoE.
    """
    if config.moe is None:
        return dict(weights)
    out = {k: v for k, v in weights.items() if ".mlp.experts." not in k}
    for i in range(config.num_hidden_layers):
        if not config.moe.is_moe_layer(i):
            continue
        p = f"model.layers.{i}.mlp.experts."
        n = config.moe.n_routed_experts
        out[p + "gate_up_proj"] = torch.stack(
            [torch.cat([weights[f"{p}{e}.gate_proj.weight"], weights[f"{p}{e}.up_proj.weight"]]) for e in range(n)])
        out[p + "down_proj"] = torch.stack([weights[f"{p}{e}.down_proj.weight"] for e in range(n)])
    return out
