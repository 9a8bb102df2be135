"""The plain PyTorch bf16 prefill the engine's prefill is measured against: the whole prompt in
one pass, a contiguous KV cache, cuBLAS GEMMs and SDPA (flash) — what one writes without paging
or chunking.

Per layer: ``F.rms_norm`` → fused QKV GEMM → RoPE (`bench.baselines.torch_blocks`, gpt-fast's
form) → K/V copied into a contiguous ``[nkv, capacity, hd]`` cache → SDPA ``is_causal`` with
native GQA → O-proj GEMM + residual (bf16) → SwiGLU GEMMs + residual; final norm and LM head
on the last position. It runs over the weights the engine's backend already holds
(``LlamaReferenceModel``'s repacked ``w_qkv`` / ``w_gate_up``), so a benchmark holds them once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.baselines.torch_blocks import apply_rope, rope_tables
from clusterfuse.reference.llama import LlamaReferenceModel


class TorchPrefill:
    """``prefill(ids [T]) -> fp32 logits [vocab]`` of the last position; K/V left in ``k_cache``/``v_cache``."""

    def __init__(self, ref: LlamaReferenceModel, capacity: int,
                 backends: tuple[SDPBackend, ...] = (SDPBackend.FLASH_ATTENTION,)) -> None:
        c = ref.config
        self.ref, self.capacity, self.backends = ref, capacity, list(backends)
        self.cos, self.sin = rope_tables(c, capacity, ref.device)
        shape = (c.num_key_value_heads, capacity, c.head_dim)
        self.k_cache = [torch.empty(shape, dtype=ref.dtype, device=ref.device) for _ in range(c.num_hidden_layers)]
        self.v_cache = [torch.empty_like(k) for k in self.k_cache]

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        ref, c = self.ref, self.ref.config
        T = ids.shape[0]
        if T > self.capacity:
            raise ValueError(f"ids: {T} tokens exceed the baseline cache's capacity {self.capacity}")
        nh, nkv, hd, eps = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rms_norm_eps
        cos, sin = self.cos[:T, None], self.sin[:T, None]  # [T, 1, hd]
        x = F.embedding(ids, ref.embed)
        for layer in range(c.num_hidden_layers):
            qkv = F.linear(F.rms_norm(x, (x.shape[-1],), ref.input_norms[layer], eps), ref.w_qkv[layer],
                           ref.b_qkv[layer]).view(T, nh + 2 * nkv, hd)
            q, k, v = qkv.split([nh, nkv, nkv], dim=1)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # [T, heads, hd]
            self.k_cache[layer][:, :T] = k.transpose(0, 1)
            self.v_cache[layer][:, :T] = v.transpose(0, 1)
            with sdpa_kernel(self.backends):
                out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], self.k_cache[layer][None, :, :T],
                                                     self.v_cache[layer][None, :, :T], is_causal=True,
                                                     enable_gqa=nh != nkv)
            x = x + F.linear(out[0].transpose(0, 1).reshape(T, nh * hd), ref.w_o[layer])
            gate, up = F.linear(F.rms_norm(x, (x.shape[-1],), ref.post_attention_norms[layer], eps),
                                ref.w_gate_up[layer]).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, ref.w_down[layer])
        last = F.rms_norm(x[-1:], (x.shape[-1],), ref.final_norm, eps)
        return F.linear(last, ref.lm_head).float()[0]
