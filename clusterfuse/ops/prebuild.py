"""`clusterfuse build`: compile every kernel specialisation a model's decode needs, ahead of use.

Kernels are otherwise built on first use (JIT); building them up front, in parallel, keeps
that minute out of the first request and out of CUDA-graph capture.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch

from clusterfuse.engine.backend import resolve_dtype
from clusterfuse.models.loader import load_config
from clusterfuse.ops import attention_block, ffn_block
from clusterfuse.ops.build import prebuild

log = logging.getLogger("clusterfuse")


def prebuild_for_model(model: str | None, *, batches: Iterable[int] = (1, 2, 4, 8, 16),
                       dtype: str = "auto") -> list[Path]:
    """Build the fused attention and FFN libraries for ``model``'s shapes at these batch sizes."""
    config = load_config(model)
    if config.family != "llama":
        raise ValueError(f"model: the fused kernels cover the Llama family; {config.name or model} is "
                         f"{config.family}")
    torch_dtype = resolve_dtype(dtype, torch.device("cuda"))
    if torch_dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"dtype: the fused kernels run bf16 or fp16, got {dtype}")
    specs = [attention_block.build_spec(torch_dtype, config.head_dim, config.gqa_group, b) for b in batches]
    specs.append(ffn_block.build_spec())
    unique = list({(name, tuple(sources), tuple(sorted(defines.items()))): (name, sources, defines)
                   for name, sources, defines in specs}.values())  # batch sizes often share a build
    log.info("building %d kernel libraries for %s", len(unique), config.name or model)
    paths = prebuild(unique)
    for p in paths:
        print(p)
    return paths
