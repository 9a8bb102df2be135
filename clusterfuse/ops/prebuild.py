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
from clusterfuse.models.config import ModelConfig
from clusterfuse.models.loader import load_config
from clusterfuse.ops import attention_block, ffn_block
from clusterfuse.ops.build import BuildSpec, prebuild, unique_specs

log = logging.getLogger("clusterfuse")


def model_library_specs(config: ModelConfig, batches: Iterable[int], dtype: torch.dtype) -> list[BuildSpec]:
    """``(name, sources, defines)`` of the fused attention and FFN libraries a Llama-family model's
    decode needs at these batch sizes in bf16 or fp16 (repeats included: `prebuild` builds each once)."""
    specs = [s for b in batches for s in attention_block.build_specs(dtype, config.head_dim, config.gqa_group, b)]
    specs.append(ffn_block.build_spec())
    return specs


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
    specs = unique_specs(model_library_specs(config, batches, torch_dtype))
    log.info("building %d kernel libraries for %s", len(specs), config.name or model)
    paths = prebuild(specs)
    for p in paths:
        print(p)
    return paths
