"""`clusterfuse build`: compile every kernel specialisation a model's decode needs, ahead of use
(`clusterfuse.ops.prebuild` lists them by shape; this maps a model to its shapes)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from clusterfuse.models.loader import load_config
from clusterfuse.ops.build import prebuild, unique_specs
from clusterfuse.ops.prebuild import decode_library_specs, kernel_dtype

log = logging.getLogger("clusterfuse")


def prebuild_for_model(model: str | None, *, batches: Iterable[int] = (1, 2, 4, 8, 16),
                       dtype: str = "auto") -> list[Path]:
    """Build the fused attention and FFN libraries for ``model``'s shapes at these batch sizes."""
    config = load_config(model)
    if config.family != "llama":
        raise ValueError(f"model: the fused kernels cover the Llama family; {config.name or model} is "
                         f"{config.family}")
    specs = unique_specs(decode_library_specs(config.head_dim, config.gqa_group, batches, kernel_dtype(dtype),
                                              qk_norm=config.qk_norm, window=config.sliding_window is not None))
    log.info("building %d kernel libraries for %s", len(specs), config.name or model)
    paths = prebuild(specs)
    for p in paths:
        print(p)
    return paths
