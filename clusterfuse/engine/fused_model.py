"""The fused backend: Llama-family decoding with one fused attention and one fused FFN kernel
per layer, every decode step one CUDA-graph replay.

Decode (``T == 1``): embedding → per layer ``attention_block(residual=h)`` (with the model's QK-norm
weights and sliding window, if any) → ``ffn_block(residual=h)``
→ final RMSNorm → LM head, captured once per batch-size bucket (1, 2, 4, 8, 16) and context class
(`decode_graphs`); the fused ops' launch choices (cluster size, exchange path, block size) are the
ones tuned at the class's length. Prefill (``T > 1``) is the shared GPU prefill in the model's dtype
(`clusterfuse.engine.prefill`), which writes the prompt's K/V into the same paged pools the kernels
read.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from clusterfuse.engine.decode_graphs import (  # noqa: F401  (re-exported: bench and tests import them from here)
    BATCH_BUCKETS,
    PAGE_SIZE,
    SEQ_CLASSES,
    PagedLlamaBackend,
    bucket_for,
    seq_class_for,
    seq_classes,
    tuning_block_table,
)
from clusterfuse.engine.paged_cache import PagedKVCache
from clusterfuse.engine.prefill import PrefillOptions
from clusterfuse.models.config import ModelConfig
from clusterfuse.ops.attention_block import attention_block
from clusterfuse.ops.ffn_block import ffn_block
from clusterfuse.ops.options import DEFAULT_KERNEL_OPTIONS, KernelOptions
from clusterfuse.reference.ops import rms_norm


class FusedModel(PagedLlamaBackend):
    """`DecoderBackend` for Llama-family models on a Hopper GPU (see the module docstring)."""

    name = "fused"
    batch_buckets = BATCH_BUCKETS

    def __init__(self, config: ModelConfig, weights: Mapping[str, torch.Tensor], *,
                 device: torch.device | str, page_size: int = PAGE_SIZE,
                 prefill: PrefillOptions | None = None,
                 kernel_options: KernelOptions = DEFAULT_KERNEL_OPTIONS) -> None:
        super().__init__(config, weights, device=device, page_size=page_size, prefill=prefill)
        self.kernel_options = kernel_options  # how the fused kernels launch (clusterfuse.ops.options)
        if self.ref.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"dtype: the fused kernels run bf16 or fp16 weights, got {self.ref.dtype}")
        if any(b is not None for b in self.ref.b_o):
            raise ValueError("weights: an o_proj bias is not supported by the fused attention block")

    def decode_step(self, ids: torch.Tensor, positions: torch.Tensor, cache_lens: torch.Tensor,
                    block_table: torch.Tensor, cache: PagedKVCache, rows: int | None = None) -> torch.Tensor:
        """One decode step over static buffers (graph body): fp32 logits [B, vocab]. The kernels read
        each sequence's own rows (``cache_lens``), so ``rows`` is not needed."""
        ref, c = self.ref, self.config
        cos, sin = ref.cos, ref.sin
        h = ref.embed[ids]
        for layer in range(c.num_hidden_layers):
            h = attention_block(h, ref.input_norms[layer], ref.w_qkv[layer], ref.b_qkv[layer], ref.w_o[layer],
                                cos, sin, positions, cache.k_pools[layer], cache.v_pools[layer], cache_lens,
                                num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
                                head_dim=c.head_dim, eps=c.rms_norm_eps, block_table=block_table,
                                page_size=cache.page_size, residual=h, q_norm=ref.q_norms[layer],
                                k_norm=ref.k_norms[layer], window=c.sliding_window, options=self.kernel_options)
            h = ffn_block(h, ref.post_attention_norms[layer], ref.w_gate_up[layer], ref.w_down[layer],
                          c.rms_norm_eps, residual=h, options=self.kernel_options)
        return self.mm(rms_norm(h, ref.final_norm, c.rms_norm_eps).to(ref.dtype), ref.lm_head)
