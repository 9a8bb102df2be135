"""The MoE block benchmark's PyTorch baseline computes the reference op's math (CPU, tiny configs),
and its floor counts the experts the batch actually chose."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bench.baselines.torch_moe import TorchMoEBlock
from bench.floor import moe_block_bytes
from clusterfuse.models.config import MoEConfig
from clusterfuse.models.presets import preset
from clusterfuse.reference.moe import moe_block

TINY = dataclasses.replace(
    preset("deepseek-v2-lite"), hidden_size=64, name="tiny-moe",
    moe=MoEConfig(n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=24, n_shared_experts=2,
                  routed_scaling_factor=2.0))
GROUPED = dataclasses.replace(TINY, moe=dataclasses.replace(TINY.moe, topk_method="group_limited_greedy", n_group=4,
                                                            topk_group=2, n_shared_experts=0, norm_topk_prob=True))


@pytest.mark.parametrize("config", (TINY, GROUPED), ids=("greedy-shared", "grouped-normalised"))
def test_baseline_matches_the_reference_op(config):
    block = TorchMoEBlock(config, dtype=torch.float32, device="cpu", seed=3)
    x = torch.randn(5, config.hidden_size, generator=torch.Generator().manual_seed(4))
    shared = None if block.shared_gate_up is None else (block.shared_gate_up, block.shared_down)
    want = moe_block(x, block.norm_weight, block.router, block.w_gate_up, block.w_down, config.rms_norm_eps,
                     config.moe, shared=shared, residual=x)
    torch.testing.assert_close(block(x), want, rtol=1e-4, atol=1e-5)


def test_floor_counts_the_union_of_the_choices():
    lite = preset("deepseek-v2-lite")
    assert moe_block_bytes(lite, 4, 20).weights - moe_block_bytes(lite, 4, 19).weights == 2 * 3 * 2048 * 1408
