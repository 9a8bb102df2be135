"""Reference Llama family: Llama-2/3 (MHA, GQA, llama3 rope scaling), Mistral, Qwen2 (q/k/v bias).

Hugging Face's separate q/k/v and gate/up projections are concatenated at load time
into the fused-kernel layouts (`ops` module docstring), so the model runs through the
same `self_attention` / `ffn_block` code the kernels are tested against.

Not modelled: Mistral's sliding window (the model attends to the whole cache).
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
    ``w_o``, ``w_gate_up [2*I, H]`` and ``w_down`` — the `attention_block` / `ffn_block` layouts.
    """

    def __init__(self, config: ModelConfig, weights: Mapping[str, torch.Tensor], *,
                 device: torch.device | str | None = None) -> None:
        if config.family != "llama":
            raise ValueError(f"config.family: expected 'llama', got {config.family!r}")
        super().__init__(config, weights, device=device)
        self.w_qkv, self.b_qkv, self.w_o, self.b_o, self.w_gate_up, self.w_down = [], [], [], [], [], []
        for i in range(config.num_hidden_layers):
            attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
            self.w_qkv.append(torch.cat([self._take(f"{attn}.{p}_proj.weight") for p in "qkv"]))
            biases = [self._take_optional(f"{attn}.{p}_proj.bias") for p in "qkv"]
            self.b_qkv.append(None if biases[0] is None else torch.cat(biases))
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
        return self_attention(rms_norm(x, self.input_norms[layer], c.rms_norm_eps), self.w_qkv[layer],
                              self.b_qkv[layer], self.w_o[layer], self.cos, self.sin, positions,
                              cache.layer_stores(layer), slots, starts, num_heads=c.num_attention_heads,
                              num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim, b_o=self.b_o[layer])

    def ffn(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        return ffn_block(h, self.post_attention_norms[layer], self.w_gate_up[layer], self.w_down[layer],
                         self.config.rms_norm_eps)
