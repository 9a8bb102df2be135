"""Compile the fused attention and FFN libraries a decode needs, ahead of use.

Kernels are otherwise built on first use (JIT); building them up front, in parallel, keeps
that minute out of the first request and out of CUDA-graph capture. This module knows shapes
only; `clusterfuse.engine.kernel_build` maps a model to them (``clusterfuse build``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from clusterfuse.ops import attention_block, ffn_block, mla_block, moe_block
from clusterfuse.ops.build import BuildSpec

#: The dtype names the fused kernels build for (``auto``: bf16, what the engine runs on a GPU).
KERNEL_DTYPES = {"auto": torch.bfloat16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
                 "fp16": torch.float16, "float16": torch.float16}


def kernel_dtype(name: str) -> torch.dtype:
    """The torch dtype of a dtype name the fused kernels run; ValueError naming ``dtype`` otherwise."""
    if name not in KERNEL_DTYPES:
        raise ValueError(f"dtype: the fused kernels run {', '.join(KERNEL_DTYPES)}; got {name!r}")
    return KERNEL_DTYPES[name]


def decode_library_specs(head_dim: int, gqa: int, batches: Iterable[int], dtype: torch.dtype, *,
                         qk_norm: bool = False, window: bool = False) -> list[BuildSpec]:
    """``(name, sources, defines)`` of the fused attention and FFN libraries a Llama-family decode
    with this head dim and GQA ratio (and QK-norm, a sliding window) needs at these batch sizes in
    bf16 or fp16 (repeats included: `clusterfuse.ops.build.prebuild` builds each once). A model with a
    window also gets the build without it, which runs caches no longer than the window
    (`attention_block.kernel_window`)."""
    windows = (False, True) if window else (False,)
    specs = [s for b in batches for w in windows
             for s in attention_block.build_specs(dtype, head_dim, gqa, b, qk_norm=qk_norm, window=w)]
    specs.append(ffn_block.build_spec())
    return specs


def deepseek_library_specs(batches: Iterable[int], dtype: torch.dtype, *, dense: bool, moe: bool) -> list[BuildSpec]:
    """``(name, sources, defines)`` of the libraries a DeepSeek-V2 decode needs at these batch sizes:
    the MLA block (every cluster size and key loop), the MoE block where the model has MoE layers
    (``moe``), the FFN block where it has dense ones (``dense``); repeats included."""
    batches = list(batches)
    specs = [s for b in batches for s in mla_block.build_specs(dtype, b)]
    if moe:
        specs += [moe_block.build_spec(dtype, b) for b in batches]
    if dense:
        specs.append(ffn_block.build_spec())
    return specs
