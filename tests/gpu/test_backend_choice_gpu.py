"""The backend choice on a real GPU: `fused_shape_problem` asks the fused ops' own checks, and
``auto`` picks fused on Hopper for shapes they take, torch otherwise."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from clusterfuse.engine.backend import detect_platform, fused_shape_problem, resolve_backend
from clusterfuse.models.presets import preset

pytestmark = pytest.mark.gpu


def test_fused_shape_rules_come_from_the_ops() -> None:
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the fused kernels need a Hopper (sm_90) GPU")
    dev = torch.device("cuda")
    llama3 = preset("llama-3-8b")
    assert fused_shape_problem(llama3, torch.bfloat16, dev) is None
    assert fused_shape_problem(preset("smollm2-135m"), torch.float16, dev) is None
    assert "head_dim" in fused_shape_problem(dataclasses.replace(llama3, head_dim=96), torch.bfloat16, dev)
    assert "num_kv_heads" in fused_shape_problem(dataclasses.replace(llama3, num_key_value_heads=2),
                                                 torch.bfloat16, dev)  # 16 query heads per KV head
    assert "dtype" in fused_shape_problem(llama3, torch.float32, dev)
    platform = detect_platform(dev)
    if platform.nvcc is not None:
        assert resolve_backend("auto", platform, config=llama3, dtype=torch.bfloat16) == "fused"
    assert resolve_backend("auto", platform, config=llama3, dtype=torch.float32) == "torch"


def test_auto_on_a_gpu_without_clusters_is_torch() -> None:
    platform = detect_platform(torch.device("cuda"))
    if platform.fused_unavailable_reason() is None:
        pytest.skip("this GPU runs the fused kernels")
    assert resolve_backend("auto", platform, config=preset("llama-3-8b")) == "torch"
