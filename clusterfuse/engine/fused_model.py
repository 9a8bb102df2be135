"""The fused backend: Llama-family decoding with one fused attention and one fused FFN kernel
per layer, every decode step one CUDA-graph replay.

Decode (``T == 1``): embedding → per layer ``attention_block(residual=h)`` (with the model's QK-norm
weights and sliding window, if any) → ``ffn_block(residual=h)``
→ final RMSNorm → LM head, captured once per batch-size bucket (1, 2, 4, 8, 16) and context class
(`decode_graphs`); the fused ops' launch choices (cluster size, exchange path, block size) are the
ones tuned at the class's length. Prefill (``T > 1``) is the shared GPU prefill in the model's dtype
(`clusterfuse.engine.prefill`), which writes the prompt's K/V into the same paged pools the kernels
read.

``step="persistent"`` runs every layer of the decode step in one launch instead
(`clusterfuse.ops.decode_step`: the same phases and partitions as the per-block kernels at one
cluster size, 256 threads, bit-identical to them with those launch choices). Not the default until
a GPU has measured it. Where the device cannot hold that launch resident (another process on the
GPU, a smaller GPU; ``step_max_clusters=0`` forces it in tests), the step falls back to the
per-block kernels for that batch size, said once in the log.
"""

from __future__ import annotations

import logging
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
from clusterfuse.ops import decode_step as step_op
from clusterfuse.ops.attention_block import attention_block
from clusterfuse.ops.ffn_block import ffn_block
from clusterfuse.ops.options import DEFAULT_KERNEL_OPTIONS, KernelOptions
from clusterfuse.reference.ops import rms_norm

log = logging.getLogger("clusterfuse")

#: How the decode step launches its layers: two fused kernels per layer, or all layers in one.
DECODE_STEPS = ("per_block", "persistent")


class FusedModel(PagedLlamaBackend):
    """`DecoderBackend` for Llama-family models on a Hopper GPU (see the module docstring)."""

    name = "fused"
    batch_buckets = BATCH_BUCKETS

    def __init__(self, config: ModelConfig, weights: Mapping[str, torch.Tensor], *,
                 device: torch.device | str, page_size: int = PAGE_SIZE,
                 prefill: PrefillOptions | None = None,
                 kernel_options: KernelOptions = DEFAULT_KERNEL_OPTIONS, step: str = "per_block",
                 step_cluster: int | None = None, step_max_clusters: int | None = None) -> None:
        if step not in DECODE_STEPS:
            raise ValueError(f"step: expected one of {DECODE_STEPS}, got {step!r}")
        if step_cluster is not None and step_cluster not in step_op.CLUSTER_SIZES:
            raise ValueError(f"step_cluster: expected one of {step_op.CLUSTER_SIZES} or None, got {step_cluster!r}")
        if step_max_clusters is not None and (isinstance(step_max_clusters, bool)
                                              or not isinstance(step_max_clusters, int) or step_max_clusters < 0):
            raise ValueError(f"step_max_clusters: expected None or an int >= 0, got {step_max_clusters!r}")
        super().__init__(config, weights, device=device, page_size=page_size, prefill=prefill)
        self.kernel_options = kernel_options  # how the fused kernels launch (clusterfuse.ops.options)
        # The persistent step's choices: its one cluster size (None: step_op.default_cluster_size)
        # and a cap on its resident clusters (None: what the device holds; 0 refuses it).
        self.step, self.step_cluster, self.step_max_clusters = step, step_cluster, step_max_clusters
        #: Batch sizes whose persistent step the device refused, with the reason (they run per block).
        self.persistent_refused: dict[int, str] = {}
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
        if self.step == "persistent" and ids.shape[0] not in self.persistent_refused:
            try:
                h = self._persistent_layers(h, positions, cache_lens, block_table, cache)
                return self.mm(rms_norm(h, ref.final_norm, c.rms_norm_eps).to(ref.dtype), ref.lm_head)
            except step_op.PersistentStepRefused as err:
                self.persistent_refused[ids.shape[0]] = str(err)
                log.warning("persistent decode step refused for batch %d, running the per-block kernels: %s",
                            ids.shape[0], err)
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

    def step_layers(self, cache: PagedKVCache) -> list[step_op.StepLayer]:
        """Every layer's weights and cache pools, as the persistent step takes them."""
        ref = self.ref
        return [step_op.StepLayer(ref.input_norms[i], ref.w_qkv[i], ref.b_qkv[i], ref.w_o[i], ref.q_norms[i],
                                  ref.k_norms[i], cache.k_pools[i], cache.v_pools[i], ref.post_attention_norms[i],
                                  ref.w_gate_up[i], ref.w_down[i]) for i in range(self.config.num_hidden_layers)]

    def step_cluster_size(self, device: torch.device) -> int:
        """The persistent step's cluster size: the one asked for, else `step_op.default_cluster_size`."""
        return self.step_cluster or step_op.default_cluster_size(self.config.num_key_value_heads, device)

    def _persistent_layers(self, h: torch.Tensor, positions: torch.Tensor, cache_lens: torch.Tensor,
                           block_table: torch.Tensor, cache: PagedKVCache) -> torch.Tensor:
        """Every layer of the step in one launch (`clusterfuse.ops.decode_step`)."""
        ref, c = self.ref, self.config
        return step_op.decode_step(h, self.step_layers(cache), ref.cos, ref.sin, positions, cache_lens,
                                   num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
                                   head_dim=c.head_dim, eps=c.rms_norm_eps,
                                   cluster_size=self.step_cluster_size(h.device), block_table=block_table,
                                   page_size=cache.page_size, window=c.sliding_window, options=self.kernel_options,
                                   max_clusters=self.step_max_clusters)
