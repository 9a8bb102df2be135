"""The Llama decoder layer in the model's dtype over plain torch ops: cuBLAS GEMMs, SDPA.

Shared by the GPU prefill (`prefill`) and the torch backend's decode step (`torch_model`).
The weights are the ones `LlamaReferenceModel` holds after repacking (``w_qkv``, ``w_o``,
``w_gate_up``, ``w_down``, in the model's dtype): nothing here copies a weight. The rope
tables and the rope rotation are the reference's, so every rope kind the reference runs
(Llama-3 scaling, linear) runs here identically.

Rounding follows the reference's storage rule (`clusterfuse.reference.ops`): GEMM outputs that
feed the residual stream (O-proj, down-proj, LM head) come out in fp32 and are added to the
residual in fp32 before it is rounded once to the model's dtype; intermediate activations
(normed input, q/k/v, attention output, SiLU(gate)·up) are held in the model's dtype.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from clusterfuse.reference.llama import LlamaReferenceModel
from clusterfuse.reference.rope import apply_rope

log = logging.getLogger("clusterfuse")


class Fp32Matmul:
    """``x @ w.T`` with an fp32 result from a model-dtype GEMM: on a GPU one cuBLAS call with an fp32
    output where torch has it (``torch.mm(out_dtype=float32)``), else the GEMM's own output
    converted (said once in the log). fp32 weights give fp32 anyway. On the CPU (tests, debugging;
    torch has no such GEMM there) the operands are converted to fp32 for the call."""

    def __init__(self) -> None:
        self._fp32_out = True  # cleared once if torch.mm(out_dtype=float32) is unavailable here

    def __call__(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return x @ w.T
        if not x.is_cuda:
            return x.float() @ w.float().T
        if self._fp32_out:
            try:
                return torch.mm(x, w.T, out_dtype=torch.float32)
            except (RuntimeError, NotImplementedError, TypeError) as err:  # older torch / cuBLAS
                log.info("fp32-output GEMM unavailable (%s); residual-stream GEMMs round to %s first", err, x.dtype)
                self._fp32_out = False
        return (x @ w.T).float()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in ``x``'s dtype (torch's fused kernel, fp32 statistics)."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def project_qkv(ref: LlamaReferenceModel, layer: int, x: torch.Tensor,
                positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RMSNorm → one QKV GEMM → RoPE for ``N`` tokens ``x [N, H]`` at ``positions [N]`` (each token its
    own position: the tokens of one prompt chunk, or one token of each sequence of a decode step).
    Returns ``q [nh, N, hd]``, ``k [nkv, N, hd]``, ``v [nkv, N, hd]`` in the model's dtype.
    With ``qk_norm`` (Qwen3) each head of q and k is RMSNormed before RoPE.
    ``ref.cos``/``ref.sin`` must already cover every position."""
    c = ref.config
    nh, nkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    qkv = F.linear(rms_norm(x, ref.input_norms[layer], c.rms_norm_eps), ref.w_qkv[layer], ref.b_qkv[layer])
    heads = qkv.view(-1, nh + 2 * nkv, hd).transpose(0, 1)  # [heads, N, hd]
    q, k, v = heads.split([nh, nkv, nkv], dim=0)
    if c.qk_norm:
        q, k = rms_norm(q, ref.q_norms[layer], c.rms_norm_eps), rms_norm(k, ref.k_norms[layer], c.rms_norm_eps)
    pos = positions[None]  # apply_rope rotates [B, heads, T, d] at [B, T]
    q = apply_rope(q[None], ref.cos, ref.sin, pos, interleaved=False)[0].to(x.dtype)
    k = apply_rope(k[None], ref.cos, ref.sin, pos, interleaved=False)[0].to(x.dtype)
    return q, k, v


def visible_keys(keys: torch.Tensor, last: torch.Tensor, window: int | None) -> torch.Tensor:
    """Which key rows ``keys`` a query at row ``last`` sees (broadcast): ``0 .. last``, or with a sliding
    ``window`` W only the last W of them, ``last - W + 1 .. last`` (the reference's `causal_attention`)."""
    seen = keys <= last
    return seen if window is None else seen & (keys > last - window)


def write_kv(k_pool: torch.Tensor, v_pool: torch.Tensor, pages: torch.Tensor, offsets: torch.Tensor,
             k: torch.Tensor, v: torch.Tensor) -> None:
    """Store token ``i``'s ``k[:, i]`` / ``v[:, i]`` (``[nkv, N, hd]``) in row ``offsets[i]`` of page
    ``pages[i]`` of the pools ``[num_pages, nkv, page_size, hd]``: one scatter each, no host sync."""
    # Advanced indices (page, offset) split by the head slice: their broadcast dim leads, [N, nkv, hd].
    k_pool[pages, :, offsets, :] = k.transpose(0, 1)
    v_pool[pages, :, offsets, :] = v.transpose(0, 1)


def gather_pages(pool: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
    """The rows of the pages ``pages [..., P]`` (in order) of ``pool [num_pages, nkv, ps, hd]``:
    ``[..., nkv, P * ps, hd]``, one gather kernel (the head axis leads the gathered copy, so that
    its pages' rows are adjacent; the result is a view of it with the head axis moved back)."""
    g = pool.transpose(0, 1)[:, pages.long()]  # [nkv, ..., P, ps, hd]
    return g.flatten(-3, -2).movedim(0, -3)


def attention_residual(ref: LlamaReferenceModel, layer: int, x: torch.Tensor, attn: torch.Tensor,
                       mm: Fp32Matmul) -> torch.Tensor:
    """The residual stream after the attention block: ``x + attn @ w_o.T`` (``attn [N, nh * hd]``)."""
    out = mm(attn, ref.w_o[layer])
    if ref.b_o[layer] is not None:
        out = out + ref.b_o[layer].float()
    return (x.float() + out).to(x.dtype)


def swiglu(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, mm: Fp32Matmul) -> torch.Tensor:
    """fp32 ``down(SiLU(gate) * up)`` of ``x [N, H]`` (``w_gate_up``: gate rows then up rows; the
    product held in the model's dtype)."""
    gate, up = F.linear(x, w_gate_up).chunk(2, dim=-1)
    return mm(F.silu(gate) * up, w_down)


def ffn_residual(ref: LlamaReferenceModel, layer: int, h: torch.Tensor, mm: Fp32Matmul) -> torch.Tensor:
    """The residual stream after the SwiGLU FFN block: ``h + down(SiLU(gate) * up)`` of ``RMSNorm(h)``."""
    normed = rms_norm(h, ref.post_attention_norms[layer], ref.config.rms_norm_eps)
    return (h.float() + swiglu(normed, ref.w_gate_up[layer], ref.w_down[layer], mm)).to(h.dtype)


def lm_head(ref: LlamaReferenceModel, x: torch.Tensor, mm: Fp32Matmul) -> torch.Tensor:
    """fp32 logits ``[N, vocab]`` of the residual stream ``x [N, H]``: final RMSNorm, then the LM head
    GEMM with an fp32 output (logits rounded to bf16 would tie and flip the top-1 token)."""
    return mm(rms_norm(x, ref.final_norm, ref.config.rms_norm_eps), ref.lm_head)
