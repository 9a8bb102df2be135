"""The `clusterfuse` command on the CPU: help, info, generate, and clear errors."""

from __future__ import annotations

import pytest

from clusterfuse.cli.main import build_parser, main


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("generate", "chat", "info", "build", "bench"):
        assert cmd in out


def test_info_reports_backend(capsys):
    assert main(["info", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "fused kernels:      cannot run: no CUDA GPU" in out
    assert "backend (auto):     reference" in out


def test_generate_with_embedded_model_streams_text(capsys):
    assert main(["generate", "--chat", "What is the capital of France?", "-n", "16", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "Paris" in captured.out
    assert "ms per output token" in captured.err


def test_generate_batch_with_random_preset(capsys):
    assert main(["generate", "--model", "smollm2-135m", "--device", "cpu", "-n", "3", "--quiet",
                 "--ignore-eos", "ab", "abcdef"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- [") == 2


def test_unknown_preset_is_a_clear_error(capsys):
    assert main(["generate", "--model", "llama-9-1t", "x", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "llama-9-1t" in err and "llama-2-7b" in err


def test_bad_sampling_option_is_a_clear_error(capsys):
    assert main(["generate", "x", "--top-p", "0", "--device", "cpu"]) == 2
    assert "--top-p" in capsys.readouterr().err


def test_forcing_fused_without_gpu_is_a_clear_error(capsys):
    assert main(["generate", "x", "--backend", "fused", "--device", "cpu"]) == 2
    assert "fused" in capsys.readouterr().err


def test_parser_defaults():
    args = build_parser().parse_args(["generate", "hi"])
    assert args.model is None and args.max_tokens == 128 and args.temperature == 0.0


def test_build_rejects_models_the_fused_kernels_do_not_take(capsys, monkeypatch, tmp_path):
    """A DeepSeek-V2 model with a q LoRA (DeepSeek-V2, not -Lite): one error line, before nvcc."""
    import json

    import clusterfuse.engine.kernel_build as kernel_build

    monkeypatch.setattr(kernel_build, "prebuild", lambda *a, **k: pytest.fail("nvcc reached"))
    config = {"architectures": ["DeepseekV2ForCausalLM"], "vocab_size": 64, "hidden_size": 2048,
              "intermediate_size": 10944, "num_hidden_layers": 2, "num_attention_heads": 16,
              "num_key_value_heads": 16, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
              "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 64, "num_experts_per_tok": 6,
              "moe_intermediate_size": 1408, "n_shared_experts": 2, "first_k_dense_replace": 1}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["build", "--model", str(tmp_path)]) == 2
    assert "q LoRA" in capsys.readouterr().err
