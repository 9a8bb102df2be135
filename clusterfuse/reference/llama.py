"""Reference Llama family: Llama-2/3 (MHA, GQA, llama3 rope scaling), Mistral (sliding window), Qwen2
(q/k/v bias), Qwen3 (per-head q/k RMSNorm), Phi-3 (its fused projections are split at load).

Hugging Face's separate q/k/v and gate/up projections are concatenated at load time
into the fused-kernel layouts (`ops` module docstring), so the model runs through the
same `self_attention` / `ffn_block` code the kernels are tested against.

A sliding window (``config.sliding_window``) masks rows older than the window; the cache still
holds every row of the sequence (its capacity is the whole sequence).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from clusterfuse.models.config import ModelConfig
from clusterfuse.reference.kv_cache import KVCache
from clusterfuse.reference.model_base import ReferenceModel
from clusterfuse.reference.ops import ffn_block, rms_norm, self_attention


class LlamaReferenceModel(ReferenceModel):
    """`ReferenceModel` for ``config.family == "llama"``.

    Per layer it holds ``w_qkv [(nh + 2*nkv) * hd, H]`` (+ ``b_qkv`` with ``attention_bias``),
    ``w_o``, ``w_gate_up [2*I, H]`` and ``w_down`` — the `attention_block` / `ffn_block` layouts —
    and with ``config.qk_norm`` the per-head norm weights ``q_norms`` / ``k_norms [hd]`` (else None).
    """

    def __init__(self, config: ModelConfig, weights: Mapping[str, torch.Tensor], *,
                 device: torch.device | str | None = None) -> None:
        if config.family != "llama":
            raise ValueError(f"config.family: expected 'llama', got {config.family!r}")
        super().__init__(config, weights, device=device)
        self.w_qkv, self.b_qkv, self.w_o, self.b_o, self.w_gate_up, self.w_down = [], [], [], [], [], []
        self.q_norms: list[torch.Tensor | None] = []
        self.k_norms: list[torch.Tensor | None] = []
        for i in range(config.num_hidden_layers):
            attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
            self.w_qkv.append(torch.cat([self._take(f"{attn}.{p}_proj.weight") for p in "qkv"]))
            biases = [self._take_optional(f"{attn}.{p}_proj.bias") for p in "qkv"]
            self.b_qkv.append(None if biases[0] is None else torch.cat(biases))
            self.q_norms.append(self._take(f"{attn}.q_norm.weight") if config.qk_norm else None)
            self.k_norms.append(self._take(f"{attn}.k_norm.weight") if config.qk_norm else None)
            self.w_o.append(self._take(f"{attn}.o_proj.weight"))
            self.b_o.append(self._take_optional(f"{attn}.o_proj.bias"))
            self.w_gate_up.append(torch.cat([self._take(f"{mlp}.gate_proj.weight"),
                                             self._take(f"{mlp}.up_proj.weight")]))
            self.w_down.append(self._take(f"{mlp}.down_proj.weight"))
        self._finish_loading()

    @property
    def rotary_dim(self) -> int:
        return self.config.head_dim

    def new_cache(self, max_batch: int, capacity: int, dtype: torch.dtype | None = None) -> KVCache:
        c = self.config
        return KVCache.for_heads(c.num_hidden_layers, max_batch, capacity, c.num_key_value_heads, c.head_dim,
                                 dtype=dtype or self.dtype, device=self.device)

    def attention(self, layer: int, x: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                  slots: list[int], starts: list[int]) -> torch.Tensor:
        c = self.config
        qk_norm = (self.q_norms[layer], self.k_norms[layer]) if c.qk_norm else None
        return self_attention(rms_norm(x, self.input_norms[layer], c.rms_norm_eps), self.w_qkv[layer],
                              self.b_qkv[layer], self.w_o[layer], self.cos, self.sin, positions,
                              cache.layer_stores(layer), slots, starts, num_heads=c.num_attention_heads,
                              num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim, b_o=self.b_o[layer],
                              qk_norm=qk_norm, eps=c.rms_norm_eps, window=c.sliding_window)

    def ffn(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        return ffn_block(h, self.post_attention_norms[layer], self.w_gate_up[layer], self.w_down[layer],
                         self.config.rms_norm_eps)
