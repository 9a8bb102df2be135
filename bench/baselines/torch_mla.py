"""The PyTorch baseline of the fused MLA decode block: absorbed multi-head latent attention
(DeepSeek-V2-Lite) written with torch ops in the weights' dtype (cuBLAS GEMVs and batched matmuls,
fp32 softmax), capturable in one CUDA graph, over the same packed weights (`MlaBlockWeights`) and
the same paged latent cache as `clusterfuse.ops.mla_block`.

Static shapes for graph capture: keys are read through the block table up to ``max_len`` rows and
masked past each sequence's length, so one graph serves every length up to ``max_len``. The new
row is scattered into the cache at ``cache_lens[b]`` on the device (no host sync).

In fp32 on the CPU it is also the absorbed side of the absorption identity test
(tests/test_mla_absorption.py): the same dataflow as the kernel, checked against the
unabsorbed math (per-head keys and values decompressed from the latent).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clusterfuse.ops.mla_block import KV_LORA_RANK, NUM_HEADS, QK_NOPE_HEAD_DIM, QK_ROPE_HEAD_DIM, MlaBlockWeights
from clusterfuse.reference.mla import LATENT_NORM_EPS


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(w.dtype))


def _rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., rope] fp32 with cos/sin broadcastable to [..., rope/2]: pairs (2i, 2i+1)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def absorbed_mla_block(hidden: torch.Tensor, norm_weight: torch.Tensor, w: MlaBlockWeights, cos: torch.Tensor,
                       sin: torch.Tensor, positions: torch.Tensor, latent_cache: torch.Tensor,
                       cache_lens: torch.Tensor, block_table: torch.Tensor, *, eps: float, softmax_scale: float,
                       max_len: int) -> torch.Tensor:
    """``hidden + MLA(RMSNorm(hidden))`` in hidden's dtype; appends each sequence's new latent row
    to the paged ``latent_cache [pages, page_size, rank + rope]`` at row ``cache_lens[b]``.
    Sequences attend to rows ``0 .. cache_lens[b]`` (``cache_lens[b] + 1 <= max_len``)."""
    B, _ = hidden.shape
    dt = hidden.dtype
    nope, rope, rank = QK_NOPE_HEAD_DIM, QK_ROPE_HEAD_DIM, KV_LORA_RANK
    page_size = latent_cache.shape[1]
    x = _rms_norm(hidden, norm_weight, eps)
    proj = F.linear(x, w.w_qa)  # [B, nh*(nope+rope) + rank + rope]
    q = proj[:, : NUM_HEADS * (nope + rope)].view(B, NUM_HEADS, nope + rope)
    c, k_pe = proj[:, NUM_HEADS * (nope + rope):].split([rank, rope], dim=-1)
    pos = positions.long()
    cs, sn = cos[pos][:, None], sin[pos][:, None]  # [B, 1, rope/2]
    q_pe = _rope_interleaved(q[..., nope:].float(), cs, sn)
    k_pe = _rope_interleaved(k_pe.float(), cs[:, 0], sn[:, 0])
    row = torch.cat([_rms_norm(c, w.kv_a_norm, LATENT_NORM_EPS).float(), k_pe], dim=-1).to(latent_cache.dtype)
    lens = cache_lens.long()
    pages = block_table.long().gather(1, (lens // page_size)[:, None])[:, 0]
    latent_cache[pages, lens % page_size] = row
    q_lat = torch.bmm(q[..., :nope].transpose(0, 1), w.w_uk).transpose(0, 1)  # [B, nh, rank]
    q_abs = torch.cat([q_lat.float(), q_pe], dim=-1).to(dt)  # [B, nh, rank + rope]
    n_pages = -(-max_len // page_size)
    rows = latent_cache[block_table[:, :n_pages].long()].flatten(1, 2)[:, :max_len]  # [B, max_len, rank + rope]
    scores = torch.bmm(q_abs, rows.transpose(1, 2)).float() * softmax_scale  # [B, nh, max_len]
    hidden_keys = torch.arange(max_len, device=hidden.device)[None, None, :] > lens[:, None, None]
    probs = scores.masked_fill(hidden_keys, float("-inf")).softmax(dim=-1).to(dt)
    o_lat = torch.bmm(probs, rows[..., :rank])  # [B, nh, rank]
    v = torch.bmm(o_lat.transpose(0, 1), w.w_uv.transpose(1, 2)).transpose(0, 1)  # [B, nh, v]
    out = F.linear(v.reshape(B, -1), w.w_o)
    return (hidden.float() + out.float()).to(dt)
