"""GGUF: config from metadata, name/shape mapping, llama.cpp's q/k permutation, dequantisation."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from clusterfuse.models.config import ConfigError, MLAConfig, ModelConfig, MoEConfig, RopeConfig
from clusterfuse.models.gguf_loader import config_from_gguf, llama3_rope_factors, load_gguf_weights, open_gguf
from clusterfuse.models.loader import load_model
from clusterfuse.models.random_init import random_weights
from clusterfuse.models.weights import WeightsError, expected_shapes
from tests.fixtures_models import smollm2_hf_state_dict, smollm2_loaded, write_gguf

Q = gguf.GGMLQuantizationType


# ------------------------------------------------------------------------------------- embedded SmolLM2
def test_smollm2_config():
    cfg = smollm2_loaded().config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size) == (576, 1536, 30, 49152)
    assert cfg.tie_word_embeddings and cfg.architecture == "LlamaForCausalLM" and cfg.family == "llama"
    assert cfg.rms_norm_eps == 1e-5 and cfg.rope == RopeConfig(theta=100000.0)
    assert cfg.max_position_embeddings == 8192 and cfg.bos_token_id == 1 and cfg.eos_token_ids == (2,)


def test_smollm2_all_tensors():
    loaded = smollm2_loaded()
    shapes = expected_shapes(loaded.config)
    assert {k: tuple(v.shape) for k, v in loaded.weights.items()} == shapes
    assert len(shapes) == 1 + 30 * 9 + 1
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in loaded.weights.values())
    assert loaded.source.startswith("gguf:") and loaded.tokenizer is not None


@pytest.mark.parametrize("name", [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",  # un-permuted with n_head = 9
    "model.layers.0.self_attn.k_proj.weight",  # un-permuted with n_head_kv = 3
    "model.layers.17.self_attn.q_proj.weight",
    "model.layers.29.self_attn.k_proj.weight",
    "model.layers.5.self_attn.v_proj.weight",
    "model.layers.3.mlp.down_proj.weight",
    "model.layers.3.input_layernorm.weight",
    "model.norm.weight",
])
def test_smollm2_matches_transformers(name):
    ours = smollm2_loaded().weights[name]
    ref = smollm2_hf_state_dict()[name]
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


def test_smollm2_bf16_device_dtype():
    loaded = load_model(None, dtype=torch.bfloat16, progress=False)
    assert all(t.dtype == torch.bfloat16 for t in loaded.weights.values())


# ----------------------------------------------------------------------------------- synthetic files
def _tiny_llama_config(**changes) -> ModelConfig:
    base = ModelConfig(family="llama", architecture="LlamaForCausalLM", vocab_size=96, hidden_size=64,
                       intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, rms_norm_eps=1e-6, rope=RopeConfig(theta=500000.0),
                       max_position_embeddings=256)
    return base.replace(**changes)


_TOLERANCE = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 2e-2, Q.Q4_0: 0.3, Q.Q4_1: 0.3}


@pytest.mark.parametrize("qtype", list(_TOLERANCE), ids=lambda q: q.name)
def test_quant_types_round_trip(tmp_path, qtype):
    cfg = _tiny_llama_config()
    w = random_weights(cfg, dtype=torch.float32, seed=0)
    stored = write_gguf(tmp_path / "m.gguf", cfg, w, qtype=qtype)
    loaded = load_model(str(tmp_path / "m.gguf"), dtype=None, progress=False)
    assert loaded.config.replace(name="") == cfg.replace(name="")
    assert loaded.tokenizer is None
    for name, t in w.items():
        got = loaded.weights[name]
        assert got.shape == t.shape, name
        rel = ((got - t).norm() / t.norm()).item()
        assert rel <= _TOLERANCE[qtype] + 1e-7, (name, rel)
    # exactly what gguf's own dequantisation gives (after un-permuting q): no extra error of ours
    q = loaded.weights["model.layers.1.self_attn.q_proj.weight"]
    raw = stored["blk.1.attn_q.weight"]  # permuted layout
    unperm = raw.reshape(4, 8, 2, 64).swapaxes(1, 2).reshape(64, 64)
    assert np.array_equal(q.numpy(), unperm)


def test_qwen2_gguf_bias_no_permute(tmp_path):
    cfg = _tiny_llama_config(architecture="Qwen2ForCausalLM", attention_bias=True)
    w = random_weights(cfg, dtype=torch.float32, seed=1)
    write_gguf(tmp_path / "q.gguf", cfg, w, arch="qwen2", qtype=Q.F32)
    loaded = load_model(str(tmp_path / "q.gguf"), dtype=None, progress=False)
    assert loaded.config.attention_bias and loaded.config.architecture == "Qwen2ForCausalLM"
    for name, t in w.items():
        assert torch.equal(loaded.weights[name], t), name


def test_qwen3_gguf_qk_norm_and_wide_heads(tmp_path):
    """llama.cpp's qwen3: attn_q_norm / attn_k_norm, no permute, key_length 32 with 4 heads on hidden 64."""
    cfg = _tiny_llama_config(architecture="Qwen3ForCausalLM", qk_norm=True, head_dim=32)
    w = random_weights(cfg, dtype=torch.float32, seed=2)
    write_gguf(tmp_path / "q3.gguf", cfg, w, arch="qwen3", qtype=Q.F32)
    loaded = load_model(str(tmp_path / "q3.gguf"), dtype=None, progress=False)
    assert loaded.config.qk_norm and loaded.config.architecture == "Qwen3ForCausalLM"
    assert loaded.config.head_dim == 32 and not loaded.config.attention_bias
    for name, t in w.items():
        assert torch.equal(loaded.weights[name], t), name


def test_sliding_window_read_when_the_file_has_one(tmp_path):
    """``{arch}.attention.sliding_window`` becomes the config's window; a file without it has none."""
    cfg = _tiny_llama_config(architecture="MistralForCausalLM", sliding_window=6)
    w = random_weights(cfg, dtype=torch.float32, seed=3)
    write_gguf(tmp_path / "m.gguf", cfg, w, qtype=Q.F32, metadata=lambda g: g.add_sliding_window(6))
    assert load_model(str(tmp_path / "m.gguf"), dtype=None, progress=False).config.sliding_window == 6
    write_gguf(tmp_path / "full.gguf", cfg, w, qtype=Q.F32)
    assert load_model(str(tmp_path / "full.gguf"), dtype=None, progress=False).config.sliding_window is None
    write_gguf(tmp_path / "bad.gguf", cfg, w, qtype=Q.F32, metadata=lambda g: g.add_sliding_window(0))
    with pytest.raises(ConfigError, match="llama.attention.sliding_window"):
        load_model(str(tmp_path / "bad.gguf"), dtype=None, progress=False)


def _tiny_deepseek_config(q_lora_rank=None) -> ModelConfig:
    return ModelConfig(
        family="deepseek_v2", architecture="DeepseekV2ForCausalLM", vocab_size=96, hidden_size=64,
        intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
        rms_norm_eps=1e-6, max_position_embeddings=256,
        rope=RopeConfig(theta=10000.0, kind="yarn", factor=40.0, original_max_position_embeddings=64,
                        mscale=0.707, mscale_all_dim=0.707),
        mla=MLAConfig(kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                      q_lora_rank=q_lora_rank),
        moe=MoEConfig(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=2,
                      first_k_dense_replace=1, routed_scaling_factor=1.0))


@pytest.mark.parametrize("split_kv_b", [False, True])
@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_deepseek2_gguf(tmp_path, split_kv_b, q_lora_rank):
    cfg = _tiny_deepseek_config(q_lora_rank)
    w = random_weights(cfg, dtype=torch.float32, seed=2)
    write_gguf(tmp_path / "d.gguf", cfg, w, arch="deepseek2", qtype=Q.F32, split_kv_b=split_kv_b,
               rope_yarn={"factor": 40.0, "original": 64, "mscale_all_dim": 0.707})
    loaded = load_model(str(tmp_path / "d.gguf"), dtype=None, progress=False)
    got = loaded.config
    assert got.mla == cfg.mla and got.moe == cfg.moe
    assert got.rope.kind == "yarn" and got.rope.factor == 40.0 and got.rope.original_max_position_embeddings == 64
    assert got.rope.mscale_all_dim == pytest.approx(0.707, rel=1e-5)
    for name, t in w.items():
        assert torch.equal(loaded.weights[name], t), name


def test_llama3_rope_freqs(tmp_path):
    cfg = _tiny_llama_config(head_dim=16)
    w = random_weights(cfg, dtype=torch.float32, seed=0)
    freqs = llama3_rope_factors(500000.0, 16, factor=8.0).astype(np.float32)
    write_gguf(tmp_path / "l3.gguf", cfg, w, extra_tensors={"rope_freqs.weight": freqs})
    rope = config_from_gguf(open_gguf(tmp_path / "l3.gguf")).rope
    assert rope == RopeConfig(theta=500000.0, kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=8192)
    write_gguf(tmp_path / "odd.gguf", cfg, w, extra_tensors={"rope_freqs.weight": freqs[::-1].copy()})
    with pytest.raises(ConfigError, match="rope_freqs.weight: per-frequency rope factors"):
        config_from_gguf(open_gguf(tmp_path / "odd.gguf"))


def test_unsupported_architecture(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConfigError, match="unsupported architecture 'gpt2'; supported: llama, qwen2, qwen3, deepseek2"):
        load_model(str(tmp_path / "x.gguf"), progress=False)


def test_gguf_errors(tmp_path):
    cfg = _tiny_llama_config()
    w = random_weights(cfg, dtype=torch.float32, seed=0)
    del w["model.layers.1.mlp.up_proj.weight"]
    write_gguf(tmp_path / "m.gguf", cfg, w)
    with pytest.raises(WeightsError, match=r"m\.gguf: missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        load_model(str(tmp_path / "m.gguf"), progress=False)
    write_gguf(tmp_path / "m.gguf", cfg, random_weights(cfg, dtype=torch.float32, seed=0))
    reader = open_gguf(tmp_path / "m.gguf")
    with pytest.raises(WeightsError, match=r"m\.gguf: tensor 'model\.layers\.0\.mlp\.gate_proj\.weight': wrong shape"):
        load_gguf_weights(reader, cfg.replace(intermediate_size=128), progress=False)
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "t.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"t\.gguf: GGUF: tensor '.*': data \[.*\) lies outside the file"):
        load_model(str(tmp_path / "t.gguf"), progress=False)


@pytest.mark.parametrize("shape", [(1_000_000,), (4 * 48, 64), (5, 48, 64)])
def test_expert_tensor_of_other_shape_is_refused_before_the_split(tmp_path, shape):
    """``ffn_*_exps`` is cut into one tensor per expert: checked first, or a flat tensor of a few MB
    became a million "experts" (seconds and GBs per MB of file)."""
    cfg = _tiny_deepseek_config()
    write_gguf(tmp_path / "d.gguf", cfg, random_weights(cfg, dtype=torch.float32, seed=2), arch="deepseek2",
               extra_tensors={"blk.1.ffn_gate_exps.weight": np.zeros(shape, np.float32)})
    with pytest.raises(WeightsError, match=rf"d\.gguf: tensor 'blk\.1\.ffn_gate_exps\.weight': expected "
                                           rf"{cfg.moe.n_routed_experts} experts stacked as a 3-D tensor"):
        load_model(str(tmp_path / "d.gguf"), progress=False)


@pytest.mark.parametrize("k_b_shape", [(4 * 32, 16), (4, 16, 32), (4, 32, 16, 1)])
def test_split_kv_b_of_wrong_shape_is_a_clear_error(tmp_path, k_b_shape):
    """llama.cpp's attn_k_b / attn_v_b are joined into kv_b_proj: shapes are checked first (a 2-D
    attn_k_b was an IndexError traceback, a wrong 3-D one a RuntimeError from torch.cat)."""
    cfg = _tiny_deepseek_config()
    write_gguf(tmp_path / "d.gguf", cfg, random_weights(cfg, dtype=torch.float32, seed=2), arch="deepseek2",
               split_kv_b=True, extra_tensors={"blk.0.attn_k_b.weight": np.zeros(k_b_shape, np.float32)})
    with pytest.raises(WeightsError, match=r"d\.gguf: tensor attn_k_b of model\.layers\.0\.self_attn\.kv_b_proj\."
                                           r"weight: wrong shape, expected \(4, 32, 16\)"):
        load_model(str(tmp_path / "d.gguf"), progress=False)
