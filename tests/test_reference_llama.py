"""The reference Llama family against Hugging Face ``transformers`` on tiny random models (CPU, fp32).

Also holds the HF-parity helpers `hf_weights`, `our_config`, `randomize` and
`assert_matches_hf`, shared with ``test_reference_deepseek.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clusterfuse.models.config import ModelConfig
from clusterfuse.models.loader import load_model
from clusterfuse.reference import build_reference_model

transformers = pytest.importorskip("transformers")

PROMPT, DECODE_STEPS, TOLERANCE = 7, 8, 1e-4


# ------------------------------------------------------------------------------------------ helpers
def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights with O(1) activations (HF's 0.02 init makes attention nearly uniform), norms and
    biases away from 1 and 0, so every parameter shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1 + 0.2 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.2 * noise)
            else:
                p.copy_(noise / p.shape[-1] ** 0.5)
    return model.eval()


def hf_weights(model: torch.nn.Module, config: ModelConfig) -> dict[str, torch.Tensor]:
    """A transformers state dict in our weight contract: ``lm_head.weight`` dropped when tied, and
    routed experts (fused 3-D ``mlp.experts.gate_up_proj`` / ``down_proj`` in transformers 5) split
    into ``mlp.experts.{e}.{gate,up,down}_proj.weight``."""
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach().clone()
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix, inter = name[: -len("gate_up_proj")], t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = t[e, :inter].clone()
                out[f"{prefix}{e}.up_proj.weight"] = t[e, inter:].clone()
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = t[e].clone()
        else:
            out[name] = t
    return out


def our_config(model: torch.nn.Module) -> ModelConfig:
    """Our config parsed from the HF config's dict (transformers 5 writes ``rope_parameters``)."""
    data = model.config.to_dict()
    data["architectures"] = [type(model).__name__]
    return ModelConfig.from_hf_dict(data)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).norm() / ref.norm())


@torch.no_grad()
def assert_matches_hf(model: torch.nn.Module, batch: int = 2, seed: int = 0, saved_to: Path | None = None) -> None:
    """Prefill ``PROMPT`` tokens then ``DECODE_STEPS`` single-token steps through HF (eager, dynamic
    cache) and through our reference; logits must agree to ``TOLERANCE`` at every step. With
    ``saved_to``, the model is written there by ``save_pretrained`` and ours is what `load_model` reads
    back (config.json and safetensors as transformers writes them), else built from the state dict."""
    if saved_to is None:
        config = our_config(model)
        ours = build_reference_model(config, hf_weights(model, config))
    else:
        model.save_pretrained(saved_to)
        loaded = load_model(str(saved_to), dtype=None, progress=False)
        config, ours = loaded.config, build_reference_model(loaded.config, loaded.weights)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch, PROMPT + DECODE_STEPS), generator=g)
    cache = ours.new_cache(batch, PROMPT + DECODE_STEPS)

    hf = model(ids[:, :PROMPT], use_cache=True)
    mine = ours.forward(ids[:, :PROMPT], cache)
    assert mine.dtype == torch.float32 and mine.shape == hf.logits.shape
    errors = [rel_err(mine, hf.logits)]
    past = hf.past_key_values
    for t in range(PROMPT, PROMPT + DECODE_STEPS):
        hf = model(ids[:, t:t + 1], past_key_values=past, use_cache=True)
        past = hf.past_key_values
        errors.append(rel_err(ours.forward(ids[:, t:t + 1], cache), hf.logits))
    assert cache.lengths.tolist() == [PROMPT + DECODE_STEPS] * batch
    assert max(errors) < TOLERANCE, f"relative errors per step: {errors}"


def tiny(cls_name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random ``transformers`` model of class ``cls_name`` (eager attention)."""
    torch.manual_seed(seed)
    kwargs = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5)
    kwargs.update(overrides)
    config_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))
    config = config_cls(**kwargs)
    config._attn_implementation = "eager"
    return randomize(getattr(transformers, cls_name)(config), seed)


# ------------------------------------------------------------------------------------------- tests
CASES = {
    "llama_mha": ("LlamaForCausalLM", {}),
    "llama_gqa_tied": ("LlamaForCausalLM", {"num_key_value_heads": 2, "tie_word_embeddings": True}),
    "llama_head_dim_32": ("LlamaForCausalLM", {"num_key_value_heads": 1, "head_dim": 32}),
    "llama3_rope": ("LlamaForCausalLM", {"num_key_value_heads": 2, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    "linear_rope": ("LlamaForCausalLM", {"rope_parameters": {"rope_type": "linear", "rope_theta": 500.0,
                                                             "factor": 2.0}}),
    "llama_attention_bias": ("LlamaForCausalLM", {"attention_bias": True}),
    "qwen2_bias": ("Qwen2ForCausalLM", {"num_key_value_heads": 2}),
    "mistral": ("MistralForCausalLM", {"num_key_value_heads": 2, "num_hidden_layers": 3}),
    # a window shorter than the prompt, and than the whole sequence
    "mistral_window": ("MistralForCausalLM", {"num_key_value_heads": 2, "sliding_window": 4}),
    "qwen2_window": ("Qwen2ForCausalLM", {"num_key_value_heads": 2, "use_sliding_window": True,
                                          "sliding_window": 5, "max_window_layers": 0}),
    # heads x head_dim (4 x 32) != hidden (64), GQA, tied, QK-norm
    "qwen3": ("Qwen3ForCausalLM", {"num_key_value_heads": 2, "head_dim": 32, "tie_word_embeddings": True}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case: str) -> None:
    cls_name, overrides = CASES[case]
    assert_matches_hf(tiny(cls_name, seed=len(case), **overrides))


SAVED_CASES = {
    "qwen3": ("Qwen3ForCausalLM", CASES["qwen3"][1]),
    "mistral_window": ("MistralForCausalLM", CASES["mistral_window"][1]),
    # Phi-3: fused qkv_proj / gate_up_proj in the checkpoint, split at load; GQA; a window too
    "phi3": ("Phi3ForCausalLM", {"num_key_value_heads": 2, "pad_token_id": 0, "bos_token_id": 1,
                                 "eos_token_id": 2}),
    "phi3_window": ("Phi3ForCausalLM", {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                                        "sliding_window": 5}),
}


@pytest.mark.parametrize("case", list(SAVED_CASES))
def test_checkpoints_written_by_transformers_load_and_match(case: str, tmp_path: Path) -> None:
    cls_name, overrides = SAVED_CASES[case]
    assert_matches_hf(tiny(cls_name, seed=len(case) + 1, **overrides), saved_to=tmp_path)


def test_phi3_checkpoint_holds_fused_projections_split_at_load(tmp_path: Path) -> None:
    from safetensors import safe_open

    model = tiny("Phi3ForCausalLM", **SAVED_CASES["phi3"][1])
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert "model.layers.0.self_attn.qkv_proj.weight" in names and "model.layers.0.mlp.gate_up_proj.weight" in names
    loaded = load_model(str(tmp_path), dtype=None, progress=False)
    state = model.state_dict()
    qkv, gate_up = state["model.layers.1.self_attn.qkv_proj.weight"], state["model.layers.1.mlp.gate_up_proj.weight"]
    w = loaded.weights
    assert torch.equal(torch.cat([w[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"]), qkv)
    assert torch.equal(torch.cat([w["model.layers.1.mlp.gate_proj.weight"], w["model.layers.1.mlp.up_proj.weight"]]),
                       gate_up)
    assert w["model.layers.1.self_attn.k_proj.weight"].shape == (2 * 16, 64)


def test_config_parser_reads_qwen3_and_window() -> None:
    qwen3 = our_config(tiny("Qwen3ForCausalLM", **CASES["qwen3"][1]))
    assert qwen3.qk_norm and qwen3.head_dim == 32 and qwen3.hidden_size == 64 and qwen3.sliding_window is None
    assert our_config(tiny("MistralForCausalLM", **CASES["mistral_window"][1])).sliding_window == 4
    assert our_config(tiny("Qwen2ForCausalLM", **CASES["qwen2_window"][1])).sliding_window == 5
    assert our_config(tiny("Qwen2ForCausalLM", sliding_window=5)).sliding_window is None  # use_sliding_window off


def test_config_parser_reads_rope_parameters() -> None:
    config = our_config(tiny("LlamaForCausalLM", **CASES["llama3_rope"][1]))
    assert config.rope.kind == "llama3" and config.rope.factor == 8.0
    assert config.rope.original_max_position_embeddings == 64
    assert config.num_key_value_heads == 2 and config.head_dim == 16


@torch.no_grad()
def test_batch_with_different_lengths_matches_each_sequence_alone() -> None:
    model = tiny("LlamaForCausalLM", num_key_value_heads=2)
    config = our_config(model)
    ours = build_reference_model(config, hf_weights(model, config))
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 128, (1, n), generator=g) for n in (5, 9)]
    steps = torch.randint(0, 128, (2, 4), generator=g)

    alone = []
    for seq, nxt in zip(seqs, steps, strict=True):
        cache = ours.new_cache(1, 16)
        ours.forward(seq, cache)
        alone.append(torch.cat([ours.forward(nxt[t].view(1, 1), cache) for t in range(4)], dim=1))

    cache = ours.new_cache(3, 16)
    slots = [2, 0]  # not range(B), and not in order
    for seq, slot in zip(seqs, slots, strict=True):
        ours.forward(seq, cache, slots=[slot])
    batched = torch.cat([ours.forward(steps[:, t:t + 1], cache, slots=slots) for t in range(4)], dim=1)
    assert cache.lengths.tolist() == [9 + 4, 0, 5 + 4]
    for i in range(2):
        assert rel_err(batched[i], alone[i][0]) < 1e-5


@torch.no_grad()
def test_overflow_raises_and_leaves_cache_untouched() -> None:
    model = tiny("LlamaForCausalLM")
    config = our_config(model)
    ours = build_reference_model(config, hf_weights(model, config))
    cache = ours.new_cache(2, 8)
    ours.forward(torch.zeros(2, 6, dtype=torch.long), cache)
    snapshot = [s.buffer.clone() for layer in cache.stores for s in layer]
    with pytest.raises(ValueError, match="sequence of 9 tokens exceeds the cache capacity 8"):
        ours.forward(torch.zeros(2, 3, dtype=torch.long), cache)
    assert cache.lengths.tolist() == [6, 6]
    buffers = [s.buffer for layer in cache.stores for s in layer]
    assert all(torch.equal(a, b) for a, b in zip(snapshot, buffers, strict=True))
    cache.reset(1)
    ours.forward(torch.zeros(1, 3, dtype=torch.long), cache, slots=[1])
    assert cache.lengths.tolist() == [6, 3]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"input_ids": torch.zeros(2, 3)}, "input_ids"),
    ({"input_ids": torch.full((2, 3), 128)}, "input_ids"),
    ({"slots": [0]}, "slots"),
    ({"slots": [0, 0]}, "slots"),
    ({"slots": [0, 5]}, "slots"),
])
def test_forward_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    model = tiny("LlamaForCausalLM")
    config = our_config(model)
    ours = build_reference_model(config, hf_weights(model, config))
    args = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "cache": ours.new_cache(2, 8), **kwargs}
    with pytest.raises(ValueError, match=match):
        ours.forward(**args)


def test_weight_names_are_checked() -> None:
    model = tiny("LlamaForCausalLM")
    config = our_config(model)
    weights = hf_weights(model, config)
    missing = dict(weights)
    del missing["model.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(ValueError, match="missing 'model.layers.1.self_attn.k_proj.weight'"):
        build_reference_model(config, missing)
    with pytest.raises(ValueError, match="unexpected tensors.*model.layers.0.extra.weight"):
        build_reference_model(config, {**weights, "model.layers.0.extra.weight": torch.zeros(1)})


@torch.no_grad()
def test_chunked_prefill_equals_one_prefill() -> None:
    """T > 1 on a non-empty cache: the causal mask is offset by the rows already cached."""
    model = tiny("LlamaForCausalLM", num_key_value_heads=2)
    config = our_config(model)
    ours = build_reference_model(config, hf_weights(model, config))
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(4))
    whole = ours.forward(ids, ours.new_cache(2, 9))
    cache = ours.new_cache(2, 9)
    chunks = torch.cat([ours.forward(ids[:, :4], cache), ours.forward(ids[:, 4:], cache)], dim=1)
    assert rel_err(chunks, whole) < 1e-6


@torch.no_grad()
def test_bf16_weights_run_with_bf16_cache_and_fp32_logits() -> None:
    model = tiny("LlamaForCausalLM", num_key_value_heads=2)
    config = our_config(model)
    weights = hf_weights(model, config)
    ref = build_reference_model(config, weights)
    low = build_reference_model(config, {k: v.bfloat16() for k, v in weights.items()})
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(5))
    cache = low.new_cache(2, 8)
    logits = low.forward(ids, cache)
    assert cache.stores[0][0].buffer.dtype == torch.bfloat16 and logits.dtype == torch.float32
    assert rel_err(logits, ref.forward(ids, ref.new_cache(2, 8))) < 5e-2
