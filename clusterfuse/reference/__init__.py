"""The reference backend: every fused block's math in plain PyTorch with fp32 accumulation.

It is the oracle every kernel test compares against, and the backend on machines without
a Hopper GPU.  It is itself checked against Hugging Face ``transformers`` on tiny random
models (``tests/test_reference_*.py``).

* `ops` — the fused-block ops (`attention_block`, `ffn_block`) and the building blocks the
  models are made of;
* `rope`, `kv_storage` / `kv_cache`, `mla`, `moe` — one concept each;
* `LlamaReferenceModel`, `DeepseekV2ReferenceModel` — whole models over Hugging Face-named weights.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from clusterfuse.models.config import ModelConfig
from clusterfuse.reference.deepseek_v2 import DeepseekV2ReferenceModel
from clusterfuse.reference.kv_cache import KVCache
from clusterfuse.reference.kv_storage import ContiguousRowStore, PagedRowStore, RowStore
from clusterfuse.reference.llama import LlamaReferenceModel
from clusterfuse.reference.model_base import ReferenceModel
from clusterfuse.reference.ops import attention_block, ffn_block, rms_norm
from clusterfuse.reference.rope import apply_rope, rope_cos_sin, yarn_softmax_scale_factor

_FAMILIES: dict[str, type[ReferenceModel]] = {
    "llama": LlamaReferenceModel,
    "deepseek_v2": DeepseekV2ReferenceModel,
}


def build_reference_model(config: ModelConfig, weights: Mapping[str, torch.Tensor], *,
                          device: torch.device | str | None = None) -> ReferenceModel:
    """The reference model of ``config.family`` over ``weights`` (Hugging Face names)."""
    try:
        cls = _FAMILIES[config.family]
    except KeyError:
        raise ValueError(f"config.family: no reference model for {config.family!r}; "
                         f"supported: {', '.join(_FAMILIES)}") from None
    return cls(config, weights, device=device)


__all__ = [
    "ContiguousRowStore",
    "DeepseekV2ReferenceModel",
    "KVCache",
    "LlamaReferenceModel",
    "PagedRowStore",
    "ReferenceModel",
    "RowStore",
    "apply_rope",
    "attention_block",
    "build_reference_model",
    "ffn_block",
    "rms_norm",
    "rope_cos_sin",
    "yarn_softmax_scale_factor",
]
