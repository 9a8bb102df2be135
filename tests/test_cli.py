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


def test_build_rejects_models_without_fused_kernels(capsys):
    assert main(["build", "--model", "deepseek-v2-lite"]) == 2
    assert "Llama family" in capsys.readouterr().err
