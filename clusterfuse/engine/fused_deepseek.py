"""The fused backend of DeepSeek-V2 (DeepSeek-V2-Lite): per layer the fused MLA decode block, then
the fused FFN block (the first ``first_k_dense_replace`` layers) or the fused MoE block, every
decode step one CUDA-graph replay.

Decode (``T == 1``): embedding → per layer ``mla_block(residual=h)`` over the layer's paged latent
pool → ``ffn_block(residual=h)`` or ``moe_block(residual=h)`` → final RMSNorm → LM head, captured
per batch bucket and context class by `clusterfuse.engine.decode_graphs`, as the Llama fused
backend's. Prefill (``T > 1``): `clusterfuse.engine.deepseek_layers.DeepseekPrefill` in the model's
dtype, writing the latent rows into the same pools.

The weights are prepared once at load (`prepare_layers`): the MLA projections packed for the kernel
(`prepare_mla_weights`), each MoE layer's routed experts stacked into ``[E, 2I, H]`` / ``[E, H, I]``.
The reference model keeps views of the packed tensors (its ``w_q``/``w_kv_a`` and per-expert lists,
read by the prefill), so no weight is held twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from clusterfuse.engine.decode_graphs import PAGE_SIZE, PagedBackend
from clusterfuse.engine.deepseek_layers import DeepseekPrefill
from clusterfuse.engine.paged_cache import PagedKVCache
from clusterfuse.engine.prefill import PrefillOptions
from clusterfuse.models.config import ModelConfig
from clusterfuse.ops.ffn_block import ffn_block
from clusterfuse.ops.mla_block import MlaBlockWeights, mla_block, prepare_mla_weights
from clusterfuse.ops.moe_block import MoeRouting, moe_block
from clusterfuse.ops.options import DEFAULT_KERNEL_OPTIONS, KernelOptions
from clusterfuse.reference.deepseek_v2 import DeepseekV2ReferenceModel
from clusterfuse.reference.ops import rms_norm


@dataclass(frozen=True)
class DenseFfnWeights:
    """A dense SwiGLU layer as the FFN block takes it."""

    gate_up: torch.Tensor  # [2I, H]: gate rows then up rows
    down: torch.Tensor  # [H, I]


@dataclass(frozen=True)
class MoeLayerWeights:
    """An MoE layer as the MoE block takes it."""

    router: torch.Tensor  # [E, H]
    gate_up: torch.Tensor  # [E, 2I, H]: expert e's gate rows then up rows
    down: torch.Tensor  # [E, H, I]
    shared_gate_up: torch.Tensor | None  # [2 Is, H]: the shared experts as one MLP
    shared_down: torch.Tensor | None  # [H, Is]


@dataclass(frozen=True)
class DeepseekLayerWeights:
    attention: MlaBlockWeights
    ffn: DenseFfnWeights | MoeLayerWeights


def stack_experts(mlp: dict) -> MoeLayerWeights:
    """An MoE layer of the reference (``mlp``: its per-expert lists) with the routed experts stacked;
    the reference's lists become views of the stacked tensors (each expert's weights held once)."""
    gate_up, down = torch.stack(mlp["experts_gate_up"]), torch.stack(mlp["experts_down"])
    mlp["experts_gate_up"], mlp["experts_down"] = list(gate_up.unbind(0)), list(down.unbind(0))
    shared_gate_up, shared_down = mlp["shared"] if mlp["shared"] is not None else (None, None)
    return MoeLayerWeights(mlp["gate"], gate_up, down, shared_gate_up, shared_down)


def prepare_layers(ref: DeepseekV2ReferenceModel) -> list[DeepseekLayerWeights]:
    """Every layer's weights as the fused ops take them, once at load (module docstring); ValueError
    for what the kernels do not build. The reference's ``w_q``/``w_kv_a`` become views of the packed
    ``w_qa``."""
    c = ref.config
    layers = []
    for layer in range(c.num_hidden_layers):
        w = ref.attn[layer]
        packed = prepare_mla_weights(w, c.mla, c.num_attention_heads)
        w.w_q, w.w_kv_a = packed.w_qa.split([w.w_q.shape[0], w.w_kv_a.shape[0]])
        mlp = ref.mlp[layer]
        ffn = DenseFfnWeights(mlp["gate_up"], mlp["down"]) if "gate_up" in mlp else stack_experts(mlp)
        layers.append(DeepseekLayerWeights(packed, ffn))
    return layers


class FusedDeepseekModel(PagedBackend):
    """`DecoderBackend` for DeepSeek-V2 models on a Hopper GPU (see the module docstring)."""

    name = "fused"
    family = "deepseek_v2"

    def __init__(self, config: ModelConfig, weights: Mapping[str, torch.Tensor], *,
                 device: torch.device | str, page_size: int = PAGE_SIZE, capture_graphs: bool = True,
                 prefill: PrefillOptions | None = None,
                 kernel_options: KernelOptions = DEFAULT_KERNEL_OPTIONS) -> None:
        super().__init__(config, weights, device=device, page_size=page_size, capture_graphs=capture_graphs,
                         prefill=prefill)
        self.kernel_options = kernel_options  # how the fused kernels launch (clusterfuse.ops.options)
        if self.ref.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"dtype: the fused kernels run bf16 or fp16 weights, got {self.ref.dtype}")
        self.routing = MoeRouting.from_config(config.moe) if config.moe is not None else None
        self.layers = prepare_layers(self.ref)

    def load_reference(self, config: ModelConfig, weights: Mapping[str, torch.Tensor],
                       device: torch.device | str) -> DeepseekV2ReferenceModel:
        return DeepseekV2ReferenceModel(config, weights, device=device)

    def make_prefill(self, options: PrefillOptions) -> DeepseekPrefill:
        return DeepseekPrefill(self.ref, options, self.mm)

    @property
    def latent_dim(self) -> int:
        mla = self.config.mla
        return mla.kv_lora_rank + mla.qk_rope_head_dim

    def page_bytes(self) -> int:
        return self.config.num_hidden_layers * self.page_size * self.latent_dim * self.ref.embed.element_size()

    def make_cache(self, max_batch: int, capacity: int, num_pages: int) -> PagedKVCache:
        return PagedKVCache.for_latent(self.config.num_hidden_layers, max_batch, capacity, self.latent_dim,
                                       page_size=self.page_size, num_pages=num_pages, dtype=self.ref.dtype,
                                       device=self.device)

    def decode_step(self, ids: torch.Tensor, positions: torch.Tensor, cache_lens: torch.Tensor,
                    block_table: torch.Tensor, cache: PagedKVCache, rows: int | None = None) -> torch.Tensor:
        """One decode step over static buffers (graph body): fp32 logits [B, vocab]. The kernels read
        each sequence's own rows (``cache_lens``), so ``rows`` is not needed."""
        ref, c, opts = self.ref, self.config, self.kernel_options
        h = ref.embed[ids]
        for layer, w in enumerate(self.layers):
            h = mla_block(h, ref.input_norms[layer], w.attention, ref.cos, ref.sin, positions, cache.k_pools[layer],
                          cache_lens, eps=c.rms_norm_eps, softmax_scale=ref.softmax_scale, block_table=block_table,
                          page_size=cache.page_size, residual=h, options=opts)
            norm, ffn = ref.post_attention_norms[layer], w.ffn
            if isinstance(ffn, MoeLayerWeights):
                h = moe_block(h, norm, ffn.router, ffn.gate_up, ffn.down, c.rms_norm_eps, self.routing,
                              shared_gate_up=ffn.shared_gate_up, shared_down=ffn.shared_down, residual=h,
                              options=opts)
            else:
                h = ffn_block(h, norm, ffn.gate_up, ffn.down, c.rms_norm_eps, residual=h, options=opts)
        return self.mm(rms_norm(h, ref.final_norm, c.rms_norm_eps).to(ref.dtype), ref.lm_head)
