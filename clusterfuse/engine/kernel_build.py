"""`clusterfuse build`: compile every kernel specialisation a model's decode needs, ahead of use
(`clusterfuse.ops.prebuild` lists them by shape; this maps a model to its shapes)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from clusterfuse.models.config import ModelConfig
from clusterfuse.models.loader import load_config
from clusterfuse.ops.build import prebuild, unique_specs
from clusterfuse.ops.prebuild import decode_library_specs, deepseek_library_specs, kernel_dtype

log = logging.getLogger("clusterfuse")


def prebuild_for_model(model: str | None, *, batches: Iterable[int] = (1, 2, 4, 8, 16),
                       dtype: str = "auto") -> list[Path]:
    """Build the fused libraries for ``model``'s shapes at these batch sizes: attention and FFN for the
    Llama family; MLA, MoE and (for the dense layers) FFN for DeepSeek-V2. (`clusterfuse build` checks
    the model's shapes first: `clusterfuse.cli.commands.check_fused_shapes`.)"""
    from clusterfuse.engine.backend import FUSED_FAMILIES

    config = load_config(model)
    if config.family not in FUSED_FAMILIES:
        raise ValueError(f"model: the fused kernels cover the {', '.join(FUSED_FAMILIES)} families; "
                         f"{config.name or model} is {config.family}")
    batches = list(batches)
    if config.family == "deepseek_v2":
        specs = unique_specs(deepseek_library_specs(batches, kernel_dtype(dtype), **_deepseek_layer_kinds(config)))
    else:
        specs = unique_specs(decode_library_specs(config.head_dim, config.gqa_group, batches, kernel_dtype(dtype),
                                                  qk_norm=config.qk_norm, window=config.sliding_window is not None))
    log.info("building %d kernel libraries for %s", len(specs), config.name or model)
    paths = prebuild(specs)
    for p in paths:
        print(p)
    return paths


def _deepseek_layer_kinds(config: ModelConfig) -> dict[str, bool]:
    """Whether a DeepSeek-V2 model has dense (FFN block) and MoE (MoE block) layers."""
    moe_layers = [config.moe is not None and config.moe.is_moe_layer(i) for i in range(config.num_hidden_layers)]
    return {"dense": not all(moe_layers), "moe": any(moe_layers)}
