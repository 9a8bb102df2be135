"""The command line's error policy (issue 39): a user error is one line on stderr naming the argument,
exit code 2, found at parse time; an internal error keeps its traceback; a closed stdout ends quietly."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clusterfuse.cli import commands
from clusterfuse.cli.main import build_parser, main

ROOT = Path(__file__).resolve().parent.parent


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clusterfuse: error: "), captured.err
    assert captured.out == ""
    return lines[0]


@pytest.mark.parametrize(("argv", "named"), [
    (["generate", "x", "--device", "tpu"], "--device"),
    (["generate", "x", "--device", "meta"], "--device"),
    (["info", "--device", "tpu"], "--device"),
    (["generate", "x", "--dtype", "int8"], "--dtype"),
    (["generate", "x", "--capacity", "1e8"], "--capacity"),
    (["generate", "x", "--capacity", "0"], "--capacity"),
    (["generate", "x", "--capacity", "-4"], "--capacity"),
    (["generate", "x", "--temperature", "nan"], "--temperature"),
    (["generate", "x", "--temperature", "inf"], "--temperature"),
    (["generate", "x", "--temperature", "-1"], "--temperature"),
    (["generate", "x", "--top-p", "0"], "--top-p"),
    (["generate", "x", "--top-p", "1.5"], "--top-p"),
    (["generate", "x", "--top-k", "-1"], "--top-k"),
    (["generate", "x", "--max-tokens", "0"], "--max-tokens"),
    (["generate", "x", "--max-tokens", "1e9"], "--max-tokens"),
    (["generate", "x", "--seed", "-1"], "--seed"),
    (["generate", "x", "--stop", ""], "--stop"),
    (["generate", "bad \udcff utf-8"], "prompts"),
    (["chat", "--system", "\udcfe"], "--system"),
    (["build", "--batch", "17"], "--batch"),
    (["frobnicate"], "command"),
])
def test_bad_arguments_are_one_line_at_parse_time(capsys, monkeypatch, argv, named):
    def must_not_run(_args):
        raise AssertionError("reached the command")

    for name in ("generate", "chat", "info", "build"):
        monkeypatch.setattr(commands, name, must_not_run)
    assert main(argv) == 2
    assert f"argument {named}" in _one_error_line(capsys)


def test_capacity_help_states_the_real_default():
    text = build_parser()._subparsers._group_actions[0].choices["generate"].format_help()
    assert "min(the model's max positions, 4096)" in " ".join(text.split())


def test_internal_errors_keep_their_traceback(monkeypatch):
    def broken(_args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(commands, "info", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["info", "--device", "cpu"])


def test_library_errors_become_one_line(capsys, monkeypatch):
    def bad(_args):
        raise ValueError("model: first line\nsecond line")

    monkeypatch.setattr(commands, "info", bad)
    assert main(["info", "--device", "cpu"]) == 2
    assert _one_error_line(capsys) == "clusterfuse: error: model: first line second line"


def test_build_refuses_unsupported_shape_before_nvcc(capsys, monkeypatch, tmp_path):
    import clusterfuse.engine.kernel_build as kernel_build

    monkeypatch.setattr(kernel_build, "prebuild", lambda *a, **k: pytest.fail("nvcc reached"))
    config = {"architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 384, "intermediate_size": 64,
              "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 4}  # head_dim 96
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["build", "--model", str(tmp_path)]) == 2
    assert "head_dim 96" in _one_error_line(capsys)


def test_bench_without_a_source_checkout_says_so(capsys, monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert main(["bench", "ffn"]) == 2
    assert "needs a clusterfuse source checkout" in _one_error_line(capsys)


def test_quiet_silences_info_logs_and_root_logger_is_untouched(capsys, monkeypatch):
    root_handlers = list(logging.getLogger().handlers)

    def logs(_args):
        logging.getLogger("clusterfuse.engine").info("an info line")
        logging.getLogger("clusterfuse.engine").warning("a warning line")
        return 0

    monkeypatch.setattr(commands, "generate", logs)
    assert main(["generate", "x", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "a warning line" in err and "an info line" not in err
    assert main(["generate", "x"]) == 0
    err = capsys.readouterr().err
    assert err.count("an info line") == 1  # one handler, not one per main() call
    assert logging.getLogger().handlers == root_handlers


def _cli(*args: str | bytes, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "clusterfuse.cli.main", *args], env=env, capture_output=True,
                          timeout=300, **kwargs)


def test_invalid_utf8_in_argv_is_a_clear_error():
    proc = _cli("generate", b"bad \xff bytes", "--device", "cpu")
    assert proc.returncode == 2
    assert proc.stderr.decode().strip() == "clusterfuse: error: generate: argument prompts: not valid UTF-8 text"


def test_broken_pipe_ends_quietly():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(f"{sys.executable} -m clusterfuse.cli.main generate 'The capital of France is' -n 24 "
                          "--device cpu --ignore-eos --quiet | head -c 5", shell=True, env=env, capture_output=True,
                          timeout=300, executable="/bin/bash")
    assert proc.stdout == b"The c"
    assert b"Traceback" not in proc.stderr and b"BrokenPipe" not in proc.stderr, proc.stderr
