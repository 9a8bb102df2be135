"""The DeepSeek-V2 decoder layer in the model's dtype over plain torch ops, for the GPU prefill.

Per chunk of ``n`` prompt tokens and layer (`DeepseekPrefill._chunk`):

* MLA (`project_mla`): RMSNorm → q_proj → interleaved RoPE of each head's rope part; the
  KV-down projection → ``[RMSNorm(c) * kv_a_norm | RoPE(k_pe)]``, the latent row the fused MLA
  kernel reads (`clusterfuse.ops.mla_block`), scattered into the slot's pages of the layer's latent
  pool ``[num_pages, page_size, kv_lora_rank + qk_rope_head_dim]`` (`write_latent`);
* attention over the decompressed K/V (`decompress_kv`: ``kv_b_proj`` of every cached latent row
  of the slot, the shared ``k_pe`` broadcast to every head) with torch SDPA at DeepSeek's softmax
  scale, causal as the Llama prefill's (`clusterfuse.engine.prefill`); O-proj + residual;
* the FFN: the dense SwiGLU (the first ``first_k_dense_replace`` layers) or the MoE
  (`moe_ffn`: the reference's routing, each chosen expert applied to its tokens in one GEMM pair,
  the shared experts as one MLP) + residual.

Rounding follows the Llama prefill (`clusterfuse.engine.llama_layers`): GEMMs feeding the residual
stream give fp32, added to it in fp32; activations are held in the model's dtype; but the RMSNorms
round as the reference's (`hf_rms_norm`) and the MLA projections come out in fp32, so that the
latent rows are rounded once, as the reference and the kernel round them. The routing is
the reference's own (fp32 router logits, ties to the lower expert), so prefill and reference
choose the same experts. Deterministic: per-expert results land in their own (token, choice)
rows and are summed in a fixed order (no atomics).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clusterfuse.engine.llama_layers import Fp32Matmul, gather_pages, swiglu
from clusterfuse.engine.paged_cache import PagedKVCache
from clusterfuse.engine.prefill import PagedPrefill, PrefillOptions
from clusterfuse.models.config import MoEConfig
from clusterfuse.reference.deepseek_v2 import DeepseekV2ReferenceModel
from clusterfuse.reference.mla import LATENT_NORM_EPS
from clusterfuse.reference.moe import route
from clusterfuse.reference.ops import rms_norm as reference_rms_norm
from clusterfuse.reference.rope import apply_rope


def hf_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """RMSNorm rounded as the reference (and Hugging Face) round it, held in ``dtype``: with it the
    first layer's latent rows are the reference's up to GEMM summation order. (The Llama prefill's
    fused ``F.rms_norm`` rounds once instead of twice, which differs in a quarter of the elements by
    one bf16 step: DeepSeek's random-weight models amplify that to ~1 % of the logits.)"""
    return reference_rms_norm(x, weight, eps).to(dtype)


def project_mla(ref: DeepseekV2ReferenceModel, layer: int, x: torch.Tensor, positions: torch.Tensor,
                mm: Fp32Matmul) -> tuple[torch.Tensor, torch.Tensor]:
    """For ``N`` tokens ``x [N, H]`` at ``positions [N]``: the queries ``q [nh, N, nope + rope]`` (rope
    part rotated) and the latent rows ``[N, kv_lora_rank + rope]`` (``[RMSNorm(c) | RoPE(k_pe)]``), both
    in the model's dtype, each rounded once (the projections come out in fp32, as in the reference and
    the MLA kernel). ``ref.cos``/``ref.sin`` must cover every position."""
    c, w = ref.config, ref.attn[layer]
    mla, nh = c.mla, c.num_attention_heads
    xn = hf_rms_norm(x, ref.input_norms[layer], c.rms_norm_eps, x.dtype)
    q = mm(xn, w.w_q).view(-1, nh, mla.qk_head_dim).transpose(0, 1)  # [nh, N, qk] fp32
    q_nope, q_pe = q.split([mla.qk_nope_head_dim, mla.qk_rope_head_dim], dim=-1)
    pos = positions[None]  # apply_rope rotates [B, heads, T, d] at [B, T]
    q_pe = apply_rope(q_pe[None], ref.cos, ref.sin, pos, interleaved=True)[0]
    latent, k_pe = mm(xn, w.w_kv_a).split([mla.kv_lora_rank, mla.qk_rope_head_dim], dim=-1)
    k_pe = apply_rope(k_pe[None, None], ref.cos, ref.sin, pos, interleaved=True)[0, 0]
    rows = torch.cat([reference_rms_norm(latent, w.kv_a_norm, LATENT_NORM_EPS), k_pe], dim=-1)
    return torch.cat([q_nope, q_pe], dim=-1).to(x.dtype), rows.to(x.dtype)


def write_latent(pool: torch.Tensor, pages: torch.Tensor, offsets: torch.Tensor, rows: torch.Tensor) -> None:
    """Store ``rows[i]`` in row ``offsets[i]`` of page ``pages[i]`` of ``pool [num_pages, page_size, latent]``."""
    pool[pages, offsets] = rows


def decompress_kv(ref: DeepseekV2ReferenceModel, layer: int,
                  latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head keys ``[nh, L, nope + rope]`` and values ``[nh, L, v]`` of the cached latent rows
    ``latent [L, kv_lora_rank + rope]``: ``kv_b_proj`` of the latent, the row's ``k_pe`` shared by
    every head."""
    c = ref.config
    mla, nh = c.mla, c.num_attention_heads
    latent_c, k_pe = latent.split([mla.kv_lora_rank, mla.qk_rope_head_dim], dim=-1)
    per_head = mla.qk_nope_head_dim + mla.v_head_dim
    kv = F.linear(latent_c, ref.attn[layer].w_kv_b).view(-1, nh, per_head).transpose(0, 1)  # [nh, L, nope + v]
    k_nope, v = kv.split([mla.qk_nope_head_dim, mla.v_head_dim], dim=-1)
    return torch.cat([k_nope, k_pe[None].expand(nh, -1, -1)], dim=-1), v


def moe_ffn(x: torch.Tensor, mlp: dict, moe: MoEConfig, mm: Fp32Matmul) -> torch.Tensor:
    """fp32 MoE output of the normed ``x [N, H]`` (residual not added); ``mlp`` is the reference's
    layer dict (``gate``, ``experts_gate_up``, ``experts_down``, ``shared``). One host sync (the
    experts' token counts)."""
    weights, experts = route(x, mlp["gate"], moe)  # [N, k] each
    n, k = experts.shape
    flat = experts.flatten()
    order = torch.sort(flat, stable=True).indices  # (token, choice) rows grouped by expert
    counts = torch.bincount(flat, minlength=moe.n_routed_experts).tolist()
    per_choice = torch.zeros(n * k, x.shape[1], dtype=torch.float32, device=x.device)
    first = 0
    for e, count in enumerate(counts):
        if count:
            rows = order[first:first + count]
            y = swiglu(x[rows // k], mlp["experts_gate_up"][e], mlp["experts_down"][e], mm)
            per_choice[rows] = y * weights.flatten()[rows, None]
            first += count
    out = per_choice.view(n, k, -1).sum(dim=1)
    if mlp["shared"] is not None:
        out += swiglu(x, *mlp["shared"], mm)
    return out


def ffn_residual(ref: DeepseekV2ReferenceModel, layer: int, h: torch.Tensor, mm: Fp32Matmul) -> torch.Tensor:
    """The residual stream after layer ``layer``'s FFN (dense SwiGLU or MoE) of ``RMSNorm(h)``."""
    c, mlp = ref.config, ref.mlp[layer]
    normed = hf_rms_norm(h, ref.post_attention_norms[layer], c.rms_norm_eps, h.dtype)
    out = swiglu(normed, mlp["gate_up"], mlp["down"], mm) if "gate_up" in mlp else moe_ffn(normed, mlp, c.moe, mm)
    return (h.float() + out).to(h.dtype)


class DeepseekPrefill(PagedPrefill):
    """`PagedPrefill` of DeepSeek-V2 into a latent `PagedKVCache` (`PagedKVCache.for_latent`; module
    docstring)."""

    def __init__(self, ref: DeepseekV2ReferenceModel, options: PrefillOptions, mm: Fp32Matmul) -> None:
        super().__init__(ref, options, mm)
        self.softmax_scale = ref.softmax_scale

    def _chunk(self, ids: torch.Tensor, cache: PagedKVCache, slot: int, start: int) -> torch.Tensor:
        """Run ``ids [n]`` at rows ``start ..`` of ``slot``; returns the last residual stream ``[n, H]``."""
        ref, n = self.ref, ids.shape[0]
        positions, pages, offsets, held, rows = self.chunk_rows(cache, slot, start, n)
        x = ref.embed[ids]
        for layer in range(ref.config.num_hidden_layers):
            q, latent = project_mla(ref, layer, x, positions, self.mm)
            pool = cache.k_pools[layer]
            write_latent(pool, pages, offsets, latent)
            if start:  # every cached row of the slot, this chunk's included
                latent = gather_pages(pool[:, None], held)[0, :rows]
            k, v = decompress_kv(ref, layer, latent)
            out = self._attend(q, k, v)  # [nh, n, v]
            x = (x.float() + self.mm(out.transpose(0, 1).reshape(n, -1), ref.attn[layer].w_o)).to(x.dtype)
            x = ffn_residual(ref, layer, x, self.mm)
        return x
