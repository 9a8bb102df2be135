"""The backend choice on a real GPU: ``auto`` picks fused on Hopper for shapes the fused ops take,
torch otherwise (the shape rules themselves: tests/test_backend_choice.py)."""

from __future__ import annotations

import pytest
import torch

from clusterfuse.engine.backend import detect_platform, resolve_backend
from clusterfuse.models.presets import preset

pytestmark = pytest.mark.gpu


def test_auto_on_hopper_is_fused_for_shapes_the_kernels_take() -> None:
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the fused kernels need a Hopper (sm_90) GPU")
    dev = torch.device("cuda")
    llama3 = preset("llama-3-8b")
    platform = detect_platform(dev)
    if platform.nvcc is not None:
        assert resolve_backend("auto", platform, config=llama3, dtype=torch.bfloat16) == "fused"
    assert resolve_backend("auto", platform, config=llama3, dtype=torch.float32) == "torch"


def test_auto_on_a_gpu_without_clusters_is_torch() -> None:
    platform = detect_platform(torch.device("cuda"))
    if platform.fused_unavailable_reason() is None:
        pytest.skip("this GPU runs the fused kernels")
    assert resolve_backend("auto", platform, config=preset("llama-3-8b")) == "torch"
