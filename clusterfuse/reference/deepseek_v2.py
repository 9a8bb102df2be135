"""Reference DeepSeek-V2: MLA attention over a compressed latent cache (`mla`), YaRN rope,
and MoE feed-forward layers (`moe`) after ``first_k_dense_replace`` dense ones.

Routed experts are read per expert (``mlp.experts.{e}.{gate,up,down}_proj.weight``), the
shared experts as one MLP (``mlp.shared_experts.*``), the router as ``mlp.gate.weight``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from clusterfuse.models.config import ModelConfig
from clusterfuse.reference.kv_cache import KVCache
from clusterfuse.reference.mla import MLAWeights, mla_self_attention
from clusterfuse.reference.model_base import ReferenceModel
from clusterfuse.reference.moe import check_moe_config, moe_ffn
from clusterfuse.reference.ops import ffn_block, rms_norm
from clusterfuse.reference.rope import yarn_softmax_scale_factor


class DeepseekV2ReferenceModel(ReferenceModel):
    """`ReferenceModel` for ``config.family == "deepseek_v2"``; its cache is a `KVCache` of
    latent rows ``[max_batch, capacity, kv_lora_rank + qk_rope_head_dim]`` per layer."""

    def __init__(self, config: ModelConfig, weights: Mapping[str, torch.Tensor], *,
                 device: torch.device | str | None = None) -> None:
        if config.family != "deepseek_v2" or config.mla is None:
            raise ValueError(f"config.family: expected 'deepseek_v2' with MLA fields, got {config.family!r}")
        if config.moe is not None:
            check_moe_config(config.moe)
        super().__init__(config, weights, device=device)
        mla = config.mla
        self.softmax_scale = mla.qk_head_dim ** -0.5 * yarn_softmax_scale_factor(config.rope)
        self.attn: list[MLAWeights] = []
        self.mlp: list[dict] = []
        for i in range(config.num_hidden_layers):
            self.attn.append(self._load_mla(f"model.layers.{i}.self_attn", lora=mla.q_lora_rank is not None))
            prefix = f"model.layers.{i}.mlp"
            if config.moe is not None and config.moe.is_moe_layer(i):
                n_shared = config.moe.n_shared_experts
                self.mlp.append({
                    "gate": self._take(f"{prefix}.gate.weight"),
                    "experts_gate_up": [self._take_gate_up(f"{prefix}.experts.{e}")
                                        for e in range(config.moe.n_routed_experts)],
                    "experts_down": [self._take(f"{prefix}.experts.{e}.down_proj.weight")
                                     for e in range(config.moe.n_routed_experts)],
                    "shared": (self._take_gate_up(f"{prefix}.shared_experts"),
                               self._take(f"{prefix}.shared_experts.down_proj.weight")) if n_shared else None,
                })
            else:
                self.mlp.append({"gate_up": self._take_gate_up(prefix),
                                 "down": self._take(f"{prefix}.down_proj.weight")})
        self._finish_loading()

    def _take_gate_up(self, prefix: str) -> torch.Tensor:
        """``gate_proj`` and ``up_proj`` of an MLP, concatenated into the ``w_gate_up`` layout."""
        return torch.cat([self._take(f"{prefix}.gate_proj.weight"), self._take(f"{prefix}.up_proj.weight")])

    def _load_mla(self, prefix: str, *, lora: bool) -> MLAWeights:
        w = MLAWeights(
            w_kv_a=self._take(f"{prefix}.kv_a_proj_with_mqa.weight"),
            kv_a_norm=self._take(f"{prefix}.kv_a_layernorm.weight"),
            w_kv_b=self._take(f"{prefix}.kv_b_proj.weight"),
            w_o=self._take(f"{prefix}.o_proj.weight"),
            b_kv_a=self._take_optional(f"{prefix}.kv_a_proj_with_mqa.bias"),
            b_o=self._take_optional(f"{prefix}.o_proj.bias"),
        )
        if lora:
            w.w_q_a = self._take(f"{prefix}.q_a_proj.weight")
            w.b_q_a = self._take_optional(f"{prefix}.q_a_proj.bias")
            w.q_a_norm = self._take(f"{prefix}.q_a_layernorm.weight")
            w.w_q_b = self._take(f"{prefix}.q_b_proj.weight")
        else:
            w.w_q = self._take(f"{prefix}.q_proj.weight")
        return w

    @property
    def rotary_dim(self) -> int:
        return self.config.mla.qk_rope_head_dim

    def new_cache(self, max_batch: int, capacity: int, dtype: torch.dtype | None = None) -> KVCache:
        mla = self.config.mla
        return KVCache.for_latent(self.config.num_hidden_layers, max_batch, capacity,
                                  mla.kv_lora_rank + mla.qk_rope_head_dim, dtype=dtype or self.dtype,
                                  device=self.device)

    def attention(self, layer: int, x: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                  slots: list[int], starts: list[int]) -> torch.Tensor:
        (latent,) = cache.layer_stores(layer)
        return mla_self_attention(rms_norm(x, self.input_norms[layer], self.config.rms_norm_eps), self.attn[layer],
                                  self.config.mla, self.config.num_attention_heads, self.cos, self.sin, positions,
                                  latent, slots, starts, self.softmax_scale)

    def ffn(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        mlp, eps = self.mlp[layer], self.config.rms_norm_eps
        if "gate_up" in mlp:
            return ffn_block(h, self.post_attention_norms[layer], mlp["gate_up"], mlp["down"], eps)
        return moe_ffn(rms_norm(h, self.post_attention_norms[layer], eps), mlp["gate"], mlp["experts_gate_up"],
                       mlp["experts_down"], mlp["shared"], self.config.moe)
