"""DeepSeek-V2 multi-head latent attention (MLA) in the absorbed form, over a latent cache.

Each cached row is ``[c | k_pe]``: the RMS-normed KV latent ``c`` (``kv_lora_rank``) and the
roped, head-shared key part ``k_pe`` (``qk_rope_head_dim``).  With ``kv_b_proj`` viewed per
head as ``[W_UK (qk_nope_head_dim rows) ; W_UV (v_head_dim rows)] x kv_lora_rank``:

    score(h, j) = q_nope_h . (W_UK_h c_j) + q_pe_h . k_pe_j = [W_UK_h^T q_nope_h | q_pe_h] . [c_j | k_pe_j]
    out_h       = sum_j p(h, j) W_UV_h c_j = W_UV_h (sum_j p(h, j) c_j)

so attention runs as one-KV-head attention over the cached rows themselves — keys are the
whole row, values its first ``kv_lora_rank`` entries — and per-head keys/values are never
materialised.  It is exact, so one code path serves prefill and decode.  RoPE uses the
interleaved (complex) pair layout, as DeepSeek and Hugging Face do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clusterfuse.models.config import MLAConfig
from clusterfuse.reference.kv_storage import RowStore, write_sequences
from clusterfuse.reference.ops import causal_attention, linear, rms_norm
from clusterfuse.reference.rope import apply_rope

#: eps of the q_a / kv_a RMSNorms (DeepSeek builds them with the default, not rms_norm_eps).
LATENT_NORM_EPS = 1e-6


@dataclass
class MLAWeights:
    """One layer's MLA weights, Hugging Face shapes; ``w_q`` xor ``(w_q_a, q_a_norm, w_q_b)``."""

    w_kv_a: torch.Tensor  # [kv_lora_rank + qk_rope_head_dim, H]   kv_a_proj_with_mqa
    kv_a_norm: torch.Tensor  # [kv_lora_rank]
    w_kv_b: torch.Tensor  # [num_heads * (qk_nope_head_dim + v_head_dim), kv_lora_rank]
    w_o: torch.Tensor  # [H, num_heads * v_head_dim]
    w_q: torch.Tensor | None = None  # [num_heads * qk_head_dim, H]          (q_lora_rank None)
    w_q_a: torch.Tensor | None = None  # [q_lora_rank, H]
    q_a_norm: torch.Tensor | None = None  # [q_lora_rank]
    w_q_b: torch.Tensor | None = None  # [num_heads * qk_head_dim, q_lora_rank]
    b_kv_a: torch.Tensor | None = None  # biases exist only with attention_bias
    b_q_a: torch.Tensor | None = None
    b_o: torch.Tensor | None = None


def mla_self_attention(x_normed: torch.Tensor, w: MLAWeights, mla: MLAConfig, num_heads: int,
                       cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, latent: RowStore,
                       seqs: list[int], starts: list[int], softmax_scale: float) -> torch.Tensor:
    """MLA of ``T`` new tokens per sequence: ``x_normed [B, T, H]`` -> fp32 ``[B, T, H]``
    (after ``o_proj``, residual not added).

    Batch row ``i`` is sequence ``seqs[i]`` of the ``latent`` row store, which holds
    ``starts[i]`` rows; the new rows ``[c | k_pe]`` are written at ``starts[i] ..`` and
    the queries attend to rows ``0 .. starts[i]+T-1`` read back from the store.
    ``softmax_scale`` is ``qk_head_dim ** -0.5`` times `yarn_softmax_scale_factor`.
    """
    B, T, _ = x_normed.shape
    nope, rope_dim, rank = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.kv_lora_rank
    if w.w_q is not None:
        q = linear(x_normed, w.w_q)
    else:
        q = linear(rms_norm(linear(x_normed, w.w_q_a, w.b_q_a), w.q_a_norm, LATENT_NORM_EPS), w.w_q_b)
    q = q.view(B, T, num_heads, nope + rope_dim).transpose(1, 2)
    q_nope, q_pe = q.split([nope, rope_dim], dim=-1)
    q_pe = apply_rope(q_pe, cos, sin, positions, interleaved=True)

    c, k_pe = linear(x_normed, w.w_kv_a, w.b_kv_a).split([rank, rope_dim], dim=-1)
    k_pe = apply_rope(k_pe[:, None], cos, sin, positions, interleaved=True)[:, 0]
    write_sequences((latent,), seqs, starts, (torch.cat([rms_norm(c, w.kv_a_norm, LATENT_NORM_EPS), k_pe], -1),))

    w_kv_b = w.w_kv_b.float().view(num_heads, nope + mla.v_head_dim, rank)
    w_uk, w_uv = w_kv_b[:, :nope], w_kv_b[:, nope:]
    q_full = torch.cat([torch.einsum("bhtn,hnc->bhtc", q_nope, w_uk), q_pe], dim=-1)  # [B, nh, T, rank + rope]
    out_latent = torch.stack([
        causal_attention(q_full[i], rows[None], rows[None, :, :rank], softmax_scale)
        for i, rows in enumerate(latent.read(seq, start + T) for seq, start in zip(seqs, starts, strict=True))
    ])  # [B, nh, T, rank]
    out = torch.einsum("bhtc,hvc->bthv", out_latent, w_uv).reshape(B, T, num_heads * mla.v_head_dim)
    return linear(out, w.w_o, w.b_o)
