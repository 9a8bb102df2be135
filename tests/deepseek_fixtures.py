"""DeepSeek-V2 configs shared by the engine's CPU and GPU tests: DeepSeek-V2-Lite's shape (its MLA
dimensions are the ones the fused MLA kernel is built for) with fewer layers, or narrower where
the test runs on the CPU."""

from __future__ import annotations

import dataclasses

from clusterfuse.models.config import ModelConfig
from clusterfuse.models.presets import preset


def lite_config(num_layers: int, *, max_positions: int | None = None) -> ModelConfig:
    """DeepSeek-V2-Lite with ``num_layers`` layers (the first dense, the rest MoE)."""
    lite = preset("deepseek-v2-lite")
    return dataclasses.replace(lite, name=f"deepseek-v2-lite-{num_layers}l", num_hidden_layers=num_layers,
                               max_position_embeddings=max_positions or lite.max_position_embeddings)


def narrow_lite_config(num_layers: int = 3, **moe_changes) -> ModelConfig:
    """DeepSeek-V2-Lite's attention (16 heads, the kernel's MLA dimensions) on a narrow residual stream
    (hidden 64, vocab 96) with 8 small experts (top 2 + 2 shared, width 32): fast on the CPU."""
    lite = preset("deepseek-v2-lite")
    moe = dataclasses.replace(lite.moe, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                              **moe_changes)
    return dataclasses.replace(lite, name="narrow-lite", vocab_size=96, hidden_size=64, intermediate_size=96,
                               num_hidden_layers=num_layers, moe=moe)
