"""Which backend runs (`clusterfuse.engine.backend`): auto falls back fused → torch → reference with
one log line saying why, forced backends that cannot run raise a ValueError naming why, and nvcc
is found the way the kernel builder finds it."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from clusterfuse.engine import backend as be
from clusterfuse.engine.backend import Platform, build_backend, detect_platform, resolve_backend
from clusterfuse.models.random_init import random_weights
from clusterfuse.ops.build import find_nvcc
from tests.test_prefill import CONFIGS

CPU = Platform(torch.device("cpu"), "cpu", None, None)
A100 = Platform(torch.device("cuda"), "NVIDIA A100-SXM4-80GB", (8, 0), "/usr/local/cuda/bin/nvcc")
H100 = Platform(torch.device("cuda"), "NVIDIA H100 80GB HBM3", (9, 0), "/usr/local/cuda/bin/nvcc")
H100_NO_NVCC = Platform(torch.device("cuda"), "NVIDIA H100 80GB HBM3", (9, 0), None)


@pytest.mark.parametrize(("platform", "family", "expected", "why"), [
    (CPU, "llama", "reference", "no CUDA GPU"),
    (A100, "llama", "torch", "compute capability 8.0"),
    (H100_NO_NVCC, "llama", "torch", "nvcc was not found"),
    (H100, "llama", "fused", None),
    (H100, "deepseek_v2", "fused", None),
    (H100_NO_NVCC, "deepseek_v2", "reference", "torch backend runs the llama family"),
    (A100, "deepseek_v2", "reference", "torch backend runs the llama family"),
])
def test_auto_choice_and_its_one_log_line(platform, family, expected, why, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="clusterfuse"):
        assert resolve_backend("auto", platform, family) == expected
    lines = [r.getMessage() for r in caplog.records]
    if why is None:
        assert lines == []
    else:
        assert len(lines) == 1 and why in lines[0] and f"using the {expected} backend" in lines[0]


def test_auto_checks_the_fused_kernels_shape_rules(monkeypatch, caplog) -> None:
    """With a config, auto asks the fused ops' checks; a shape they refuse falls back to torch."""
    asked = []

    def refuse(config, dtype):
        asked.append((config.head_dim, dtype))
        return "the fused kernels do not take this model's shape (head_dim: expected one of (64, 128), got 16)"

    monkeypatch.setattr(be, "fused_shape_problem", refuse)
    with caplog.at_level(logging.INFO, logger="clusterfuse"):
        assert resolve_backend("auto", H100, config=CONFIGS["gqa"], dtype=torch.bfloat16) == "torch"
    assert asked == [(16, torch.bfloat16)]
    assert len(caplog.records) == 1 and "head_dim" in caplog.records[0].getMessage()
    with pytest.raises(ValueError, match="backend: 'fused' requested but .*head_dim"):
        resolve_backend("fused", H100, config=CONFIGS["gqa"])


@pytest.mark.parametrize(("requested", "platform", "match"), [
    ("fused", CPU, "'fused' requested but no CUDA GPU"),
    ("fused", A100, "'fused' requested but .*compute capability 8.0"),
    ("torch", CPU, "'torch' requested but no CUDA GPU"),
    ("fast", H100, "backend: expected one of auto, fused, torch, reference"),
])
def test_forced_backend_that_cannot_run_raises(requested, platform, match) -> None:
    with pytest.raises(ValueError, match=match):
        resolve_backend(requested, platform)


def test_forced_backends_that_can_run() -> None:
    assert resolve_backend("torch", A100) == "torch"
    assert resolve_backend("torch", H100) == "torch"
    assert resolve_backend("reference", H100) == "reference"


def test_nvcc_is_found_as_the_kernel_builder_finds_it(monkeypatch, tmp_path: Path, request) -> None:
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(0o755)
    find_nvcc.cache_clear()  # the builder looks once per process; this test looks again under each setting
    request.addfinalizer(find_nvcc.cache_clear)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    assert find_nvcc() == str(nvcc)
    assert detect_platform(torch.device("cpu")).nvcc == str(nvcc)
    find_nvcc.cache_clear()
    monkeypatch.delenv("CUDA_HOME")
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "bin") + os.pathsep + os.environ.get("PATH", ""))
    assert detect_platform(torch.device("cpu")).nvcc == str(nvcc)


def test_build_backend() -> None:
    config = CONFIGS["gqa"]
    for name in ("reference", "auto"):
        with pytest.raises(ValueError, match="build_backend builds 'fused' or 'torch'"):
            build_backend(name, config, {}, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="capture_graphs"):  # graphs need CUDA; resolve_backend says so first
        build_backend("torch", config, random_weights(config, dtype=torch.float32), device=torch.device("cpu"))


@pytest.mark.parametrize("name", ["qk_norm_wide_heads", "sliding_window"])
def test_fused_runs_qk_norm_and_windows(monkeypatch, caplog, name) -> None:
    """QK-norm (with heads x head_dim != hidden) and a sliding window are in the fused attention block:
    auto picks fused without a log line, and a forced fused is accepted; only the shape rules are asked."""
    asked = []
    monkeypatch.setattr(be, "fused_shape_problem", lambda config, dtype: asked.append(config.name))
    with caplog.at_level(logging.INFO, logger="clusterfuse"):
        assert resolve_backend("auto", H100, config=CONFIGS[name]) == "fused"
    assert caplog.records == []
    assert resolve_backend("fused", H100, config=CONFIGS[name]) == "fused"
    assert asked == [CONFIGS[name].name] * 2


def test_real_qk_norm_and_window_models_pass_the_shape_rules() -> None:
    """The issue's presets (and Mistral's window) take the fused kernels' shapes: Qwen3-0.6B's 16 x 128
    heads on hidden 1024 included; Phi-3-mini's head_dim 96 does not (the torch backend runs it)."""
    import dataclasses

    from clusterfuse.engine.backend import fused_shape_problem
    from clusterfuse.models.presets import preset

    for name in ("qwen3-0.6b", "qwen3-8b", "llama-3.2-1b", "llama-3.2-3b"):
        assert fused_shape_problem(preset(name), torch.bfloat16) is None, name
    mistral_window = dataclasses.replace(preset("mistral-7b"), sliding_window=4096)
    assert resolve_backend("auto", H100, config=mistral_window) == "fused"
    phi3 = dataclasses.replace(preset("llama-3-8b"), hidden_size=3072, num_attention_heads=32,
                               num_key_value_heads=32, head_dim=96, intermediate_size=8192)
    assert "head_dim" in fused_shape_problem(phi3, torch.bfloat16)


def test_fused_shape_rules_come_from_the_ops() -> None:
    """`fused_shape_problem` asks the ops' own dimension rules; nothing is allocated, so no GPU is needed."""
    import dataclasses

    from clusterfuse.engine.backend import fused_shape_problem
    from clusterfuse.models.presets import preset

    llama3 = preset("llama-3-8b")
    assert fused_shape_problem(llama3, torch.bfloat16) is None
    assert fused_shape_problem(preset("smollm2-135m"), torch.float16) is None
    assert "head_dim" in fused_shape_problem(dataclasses.replace(llama3, head_dim=96), torch.bfloat16)
    assert "num_kv_heads" in fused_shape_problem(dataclasses.replace(llama3, num_key_value_heads=2),
                                                 torch.bfloat16)  # 16 query heads per KV head
    assert "intermediate" in fused_shape_problem(dataclasses.replace(llama3, intermediate_size=14332),
                                                 torch.bfloat16)
    assert "dtype" in fused_shape_problem(llama3, torch.float32)


def test_deepseek_v2_lite_takes_the_fused_kernels() -> None:
    """DeepSeek-V2-Lite's shape passes the MLA, MoE and FFN ops' rules: auto picks fused on Hopper with
    no log line; a forced torch backend refuses the family, naming it."""
    from clusterfuse.engine.backend import fused_shape_problem
    from clusterfuse.models.presets import preset

    lite = preset("deepseek-v2-lite")
    assert fused_shape_problem(lite, torch.bfloat16) is None
    assert fused_shape_problem(lite, torch.float16) is None
    assert resolve_backend("auto", H100, config=lite) == "fused"
    with pytest.raises(ValueError, match="'torch' requested but the torch backend runs the llama family, not "
                                         "deepseek_v2"):
        resolve_backend("torch", H100, config=lite)


@pytest.mark.parametrize(("change", "why"), [
    ({"num_attention_heads": 32}, "mla: the kernel is built for"),
    ("q_lora", "q LoRA"),
    ("experts", "number of experts"),
    ("sigmoid", "scoring_func"),
    ({"intermediate_size": 10940}, "intermediate"),
])
def test_deepseek_shapes_the_kernels_refuse_fall_back_to_the_reference(change, why, caplog) -> None:
    """A DeepSeek-V2 shape one of the ops refuses (MLA dims, a q LoRA, MoE routing or sizes, the dense
    FFN): auto falls back to the reference with one log line naming the op's reason; nothing on a GPU."""
    import dataclasses

    from clusterfuse.engine.backend import fused_shape_problem
    from clusterfuse.models.presets import preset

    lite = preset("deepseek-v2-lite")
    if change == "q_lora":
        config = dataclasses.replace(lite, mla=dataclasses.replace(lite.mla, q_lora_rank=1536))
    elif change == "experts":
        config = dataclasses.replace(lite, moe=dataclasses.replace(lite.moe, n_routed_experts=1000,
                                                                   num_experts_per_tok=6))
    elif change == "sigmoid":
        config = dataclasses.replace(lite, moe=dataclasses.replace(lite.moe, scoring_func="sigmoid"))
    else:
        config = dataclasses.replace(lite, **change)
    assert why in fused_shape_problem(config, torch.bfloat16)
    with caplog.at_level(logging.INFO, logger="clusterfuse"):
        assert resolve_backend("auto", H100, config=config) == "reference"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and why in lines[0] and "using the reference backend" in lines[0]
