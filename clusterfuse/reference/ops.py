"""The reference ops: the math of every fused block, in plain PyTorch with fp32 accumulation.

Two kinds of functions live here:

* building blocks the reference models are assembled from (`rms_norm`, `linear`,
  `gated_mlp`, `causal_attention`, `self_attention`) — one piece of code is the truth
  for both the models and the fused-block ops;
* the **fused-block ops** (`attention_block`, `ffn_block`): the signatures of the GPU kernels'
  ops (`clusterfuse.ops`), the kernels' tuning knobs (cluster size, exchange) aside.  They
  validate every argument (``ValueError`` naming it) and return fp32, or with ``residual=``
  the next residual stream in its dtype, as the fused ops do.  Kernel tests compare against them.

Weight layouts (the kernels' layouts; the models repack Hugging Face weights into them):

* ``w_qkv [(num_heads + 2 * num_kv_heads) * head_dim, H]``: q rows, then k rows, then v rows
  (``b_qkv`` likewise);
* ``w_gate_up [2 * I, H]``: gate rows, then up rows; ``w_down [H, I]``;
* ``w_o [H, num_heads * head_dim]``.

Storage precision: with bf16/fp16 weights, the activation vectors a GEMV reads (the normed
hidden state, the attention output, SiLU(gate)·up) are held in the weights' dtype, as Hugging
Face models and the fused kernels hold them; `rms_norm` rounds as ``LlamaRMSNorm`` does,
``T(w * T(x * rstd))``.  Everything is accumulated in fp32; fp32 weights round nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clusterfuse.reference.checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_positive,
    check_range,
    check_tensor,
)
from clusterfuse.reference.kv_storage import ContiguousRowStore, PagedRowStore, RowStore, write_sequences
from clusterfuse.reference.rope import apply_rope

# ---------------------------------------------------------------------------- building blocks


#: Weight dtypes whose models store activations in that dtype (see the module docstring).
LOW_PRECISION = (torch.bfloat16, torch.float16)


def stored(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as fp32 after rounding to ``dtype`` where that is bf16/fp16 (the storage precision)."""
    return x.to(dtype).float() if dtype in LOW_PRECISION else x.float()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dimension, returned in fp32; with a
    bf16/fp16 ``weight`` rounded as Hugging Face's ``LlamaRMSNorm``: ``T(w * T(x * rstd))``."""
    x = x.float()
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if weight.dtype in LOW_PRECISION:
        return (weight * normed.to(weight.dtype)).float()
    return normed * weight.float()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` accumulated in fp32 (``weight [out, in]``, as ``torch.nn.Linear``);
    ``x`` is first held in a bf16/fp16 weight's dtype (`stored`)."""
    return F.linear(stored(x, weight.dtype), weight.float(), None if bias is None else bias.float())


def gated_mlp(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """``down(SiLU(gate(x)) * up(x))`` in fp32, with ``w_gate_up`` = gate rows then up rows."""
    gate, up = linear(x, w_gate_up).chunk(2, dim=-1)
    return linear(F.silu(gate) * up, w_down)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     window: int | None = None) -> torch.Tensor:
    """Softmax attention of one sequence, fp32: ``q [num_heads, T, Dk]`` over ``k [num_kv_heads, L, Dk]``
    and ``v [num_kv_heads, L, Dv]`` -> ``[num_heads, T, Dv]``.

    The ``T`` queries are the sequence's last ``T`` tokens: query ``i`` sits at row ``L - T + i``
    and sees keys ``0 .. L - T + i`` (itself included).  Query head ``h`` uses KV head
    ``h // (num_heads / num_kv_heads)`` (grouped-query attention; MLA's absorbed form is the
    case ``num_kv_heads = 1``).
    """
    num_heads, T, _ = q.shape
    num_kv_heads, L, _ = k.shape
    group = num_heads // num_kv_heads
    qg = q.float().reshape(num_kv_heads, group, T, -1)
    scores = torch.einsum("hgtd,hld->hgtl", qg, k.float()) * scale
    rows = torch.arange(L - T, L, device=q.device)[:, None]
    keys = torch.arange(L, device=q.device)[None, :]
    hidden = keys > rows
    if window is not None:
        hidden |= keys <= rows - window
    probs = scores.masked_fill(hidden, float("-inf")).softmax(dim=-1)
    return torch.einsum("hgtl,hld->hgtd", probs, v.float()).reshape(num_heads, T, -1)


def self_attention(x_normed: torch.Tensor, w_qkv: torch.Tensor, b_qkv: torch.Tensor | None, w_o: torch.Tensor,
                   cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                   kv: tuple[RowStore, RowStore], seqs: list[int], starts: list[int], *,
                   num_heads: int, num_kv_heads: int, head_dim: int,
                   b_o: torch.Tensor | None = None, qk_norm: tuple[torch.Tensor, torch.Tensor] | None = None,
                   eps: float = 1e-6, window: int | None = None) -> torch.Tensor:
    """Multi-head / grouped-query self-attention of ``T`` new tokens per sequence, fp32.

    ``x_normed [B, T, H]`` (the normed block input) -> ``[B, T, H]`` (after the output
    projection, residual not added).  Batch row ``i`` is sequence ``seqs[i]`` of the row
    stores ``kv = (k, v)``, which already holds ``starts[i]`` rows; the new tokens' roped
    keys and values are written as rows ``starts[i] .. starts[i]+T-1`` and the queries
    attend to rows ``0 .. starts[i]+T-1`` read back from the stores (so a reduced-precision
    cache rounds the new keys exactly as later steps will see them).  RoPE is rotate-half at
    ``positions [B, T]``; the softmax scale is ``head_dim ** -0.5``.  ``qk_norm = (q_norm, k_norm)``
    weights ``[head_dim]`` (Qwen3): each head of q and k is RMSNormed (``eps``) before RoPE.
    ``window``: sliding-window attention over the last ``window`` rows (`causal_attention`).
    """
    B, T, _ = x_normed.shape
    qkv = linear(x_normed, w_qkv, b_qkv).view(B, T, num_heads + 2 * num_kv_heads, head_dim).transpose(1, 2)
    q, k, v = qkv.split([num_heads, num_kv_heads, num_kv_heads], dim=1)
    if qk_norm is not None:
        q, k = rms_norm(stored(q, w_qkv.dtype), qk_norm[0], eps), rms_norm(stored(k, w_qkv.dtype), qk_norm[1], eps)
    q = apply_rope(q, cos, sin, positions, interleaved=False)
    k = apply_rope(k, cos, sin, positions, interleaved=False)
    write_sequences(kv, seqs, starts, (k, v))

    def attend(i: int, seq: int, start: int) -> torch.Tensor:
        # With a window only its rows are read, from the first one the earliest query (row start)
        # sees: the rows before it are hidden from every query (causal_attention's rule is the same
        # relative to the first row read), and a paged cache may have returned their pages.
        first = 0 if window is None else max(0, start + 1 - window)
        k_rows, v_rows = kv[0].read(seq, start + T, first), kv[1].read(seq, start + T, first)
        return causal_attention(q[i], k_rows, v_rows, head_dim ** -0.5, window)

    out = torch.stack([attend(i, seq, start) for i, (seq, start) in enumerate(zip(seqs, starts, strict=True))])
    # [B, num_heads, T, head_dim]
    return linear(out.transpose(1, 2).reshape(B, T, num_heads * head_dim), w_o, b_o)


# ---------------------------------------------------------------------------- fused-block ops


def attention_block(
    hidden: torch.Tensor,
    norm_weight: torch.Tensor,
    w_qkv: torch.Tensor,
    b_qkv: torch.Tensor | None,
    w_o: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lens: torch.Tensor,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    eps: float,
    block_table: torch.Tensor | None = None,
    page_size: int | None = None,
    residual: torch.Tensor | None = None,
    residual_partials: torch.Tensor | None = None,
    q_norm: torch.Tensor | None = None,
    k_norm: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """One decode token per sequence through a Llama-style attention block; returns fp32 ``[B, H]``
    (with ``residual``: ``(residual.float() + out).to(residual.dtype)``, the next residual stream).

    Math, for each sequence ``b``::

        x      = hidden                                           if residual_partials is None
               = (hidden.float() + residual_partials.sum(0)).to(hidden.dtype)   otherwise
        q,k,v  = split(RMSNorm(x; norm_weight, eps) @ w_qkv.T + b_qkv)   # q rows, k rows, v rows
        q, k   = RMSNorm per head (q_norm, k_norm; eps)                   # only with q_norm / k_norm (Qwen3)
        q, k   = RoPE rotate-half with cos/sin[positions[b]]
        cache row cache_lens[b] of sequence b  <-  k, v                  # stored in the cache dtype
        attn   = softmax(q . K^T * head_dim**-0.5) V over rows 0 .. cache_lens[b]  (cache_lens[b] + 1
                 keys: the new token attends to itself; query head h uses KV head h // (nh / nkv));
                 with a sliding ``window`` W only rows cache_lens[b] - W + 1 .. cache_lens[b]
        out[b] = attn @ w_o.T                                            # fp32, the return value

    The caller adds the residual: the next residual stream is ``(x.float() + out).to(hidden.dtype)``,
    with ``x`` as defined above (``hidden`` itself when there are no partials).  The op does not
    advance ``cache_lens``; the caller adds 1 after the step.  No other cache row is written.

    Args:
        hidden: ``[B, H]`` fp16/bf16/fp32, the residual stream entering the block.
        residual_partials: ``None`` or fp32 ``[P, B, H]``: partial sums the previous block left
            unreduced (e.g. per-cluster o-proj/down-proj partials); they are summed into ``hidden``.
        norm_weight: ``[H]``.  w_qkv: ``[(num_heads + 2*num_kv_heads) * head_dim, H]``.
        b_qkv: ``None`` or ``[(num_heads + 2*num_kv_heads) * head_dim]`` (Qwen2).
        w_o: ``[H, num_heads * head_dim]``.  Weights and caches have ``hidden``'s dtype.
        cos, sin: fp32 ``[max_pos, head_dim / 2]`` (`rope_cos_sin`).
        positions: int32/int64 ``[B]``, each ``< max_pos`` (normally equal to ``cache_lens``).
        k_cache, v_cache: contiguous ``[B, num_kv_heads, capacity, head_dim]`` (sequence ``b`` owns
            ``k_cache[b]``), or paged ``[num_pages, num_kv_heads, page_size, head_dim]`` when
            ``block_table`` is given: row ``r`` of sequence ``b`` is
            ``k_cache[block_table[b, r // page_size], :, r % page_size]``.
        cache_lens: int32/int64 ``[B]``: rows already cached per sequence; ``cache_lens[b] + 1``
            must not exceed the capacity (``capacity``, or ``max_pages * page_size`` when paged).
        block_table: ``None`` or int32/int64 ``[B, max_pages]`` of page indices; only the pages holding
            rows ``0 .. cache_lens[b]`` are read, and they must be valid page indices.
        page_size: required with ``block_table``; must equal ``k_cache.shape[2]``.
        residual: ``None`` or ``[B, H]`` of ``hidden``'s dtype (normally ``hidden`` itself): added
            to the output, which is then returned in that dtype (the fused op's ``residual=``).
        q_norm, k_norm: both ``None``, or both ``[head_dim]`` of ``hidden``'s dtype: QK-norm (Qwen3).
        window: ``None`` or a positive int: sliding-window attention (`causal_attention`).
    """
    device = _check_device("hidden", hidden)
    B, H = check_tensor("hidden", hidden, shape=(None, None), dtypes=FLOAT_DTYPES).shape
    dtype = hidden.dtype
    for name, value in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
        check_positive(name, value)
    if num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads: {num_kv_heads} does not divide num_heads {num_heads}")
    if head_dim % 2:
        raise ValueError(f"head_dim: expected an even number (RoPE rotates pairs), got {head_dim}")
    qkv_rows = (num_heads + 2 * num_kv_heads) * head_dim
    x = _sum_partials(hidden, residual_partials)
    check_tensor("norm_weight", norm_weight, shape=(H,), dtypes=(dtype,), device=device)
    check_tensor("w_qkv", w_qkv, shape=(qkv_rows, H), dtypes=(dtype,), device=device)
    if b_qkv is not None:
        check_tensor("b_qkv", b_qkv, shape=(qkv_rows,), dtypes=(dtype,), device=device)
    check_tensor("w_o", w_o, shape=(H, num_heads * head_dim), dtypes=(dtype,), device=device)
    _check_rope_tables(cos, sin, head_dim // 2, device)
    check_tensor("positions", positions, shape=(B,), dtypes=INDEX_DTYPES, device=device)
    check_range("positions", positions, 0, cos.shape[0])
    k_store, v_store = _kv_stores(k_cache, v_cache, block_table, page_size, B, num_kv_heads, head_dim, dtype, device)
    lens = _check_cache_lens(cache_lens, B, k_store.capacity, device)
    if block_table is not None:
        for b, n in enumerate(lens):
            check_range(f"block_table[{b}]", block_table[b, :n // page_size + 1], 0, k_cache.shape[0])
    if (q_norm is None) != (k_norm is None):
        raise ValueError("q_norm: QK-norm needs both q_norm and k_norm (or neither)")
    if q_norm is not None:
        check_tensor("q_norm", q_norm, shape=(head_dim,), dtypes=(dtype,), device=device)
        check_tensor("k_norm", k_norm, shape=(head_dim,), dtypes=(dtype,), device=device)
    if window is not None:
        check_positive("window", window)

    out = self_attention(rms_norm(x, norm_weight, eps)[:, None], w_qkv, b_qkv, w_o, cos, sin,
                         positions.long()[:, None], (k_store, v_store), list(range(B)), lens,
                         num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                         qk_norm=None if q_norm is None else (q_norm, k_norm), eps=eps, window=window)
    return _add_residual(out[:, 0], residual, hidden)


def ffn_block(x: torch.Tensor, norm_weight: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
              eps: float, *, residual: torch.Tensor | None = None) -> torch.Tensor:
    """SwiGLU feed-forward block; returns fp32 ``[B, H]``::

        out = (SiLU(g) * u) @ w_down.T,   [g | u] = RMSNorm(x; norm_weight, eps) @ w_gate_up.T

    ``x [B, H]`` is the already-summed block input (residual stream); the caller's next
    residual stream is ``(x.float() + out).to(x.dtype)``, which ``residual=x`` returns directly
    (as the fused op).  ``w_gate_up [2*I, H]`` holds the gate rows then the up rows;
    ``w_down [H, I]``; ``norm_weight [H]``; all of ``x``'s dtype.
    """
    device = _check_device("x", x)
    B, H = check_tensor("x", x, shape=(None, None), dtypes=FLOAT_DTYPES).shape
    check_tensor("norm_weight", norm_weight, shape=(H,), dtypes=(x.dtype,), device=device)
    two_i = check_tensor("w_gate_up", w_gate_up, shape=(None, H), dtypes=(x.dtype,), device=device).shape[0]
    if two_i == 0 or two_i % 2:
        raise ValueError(f"w_gate_up: expected an even, non-zero number of rows (gate then up), got {two_i}")
    check_tensor("w_down", w_down, shape=(H, two_i // 2), dtypes=(x.dtype,), device=device)
    return _add_residual(gated_mlp(rms_norm(x, norm_weight, eps), w_gate_up, w_down), residual, x)


# ---------------------------------------------------------------------------- validation helpers


def _add_residual(out: torch.Tensor, residual: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``out`` (fp32), or ``(residual.float() + out)`` in the residual's dtype (checked like ``like``)."""
    if residual is None:
        return out
    check_tensor("residual", residual, shape=tuple(like.shape), dtypes=(like.dtype,), device=like.device)
    return (residual.float() + out).to(residual.dtype)


def _check_device(name: str, t: object) -> torch.device:
    """The device of the first tensor argument, which every other tensor must share."""
    return check_tensor(name, t).device


def _sum_partials(hidden: torch.Tensor, partials: torch.Tensor | None) -> torch.Tensor:
    """The block input: ``hidden`` plus the previous block's unreduced fp32 partials, if any."""
    if partials is None:
        return hidden
    check_tensor("residual_partials", partials, shape=(None, *hidden.shape), dtypes=(torch.float32,),
                 device=hidden.device)
    return (hidden.float() + partials.sum(0)).to(hidden.dtype)


def _check_rope_tables(cos: torch.Tensor, sin: torch.Tensor, half: int, device: torch.device) -> None:
    check_tensor("cos", cos, shape=(None, half), dtypes=(torch.float32,), device=device)
    check_tensor("sin", sin, shape=tuple(cos.shape), dtypes=(torch.float32,), device=device)


def _kv_stores(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor | None,
               page_size: int | None, batch: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
               device: torch.device) -> tuple[RowStore, RowStore]:
    """Row stores over a contiguous or paged K/V cache, after checking its shape."""
    if block_table is None:
        if page_size is not None:
            raise ValueError("page_size: given without block_table (a contiguous cache has no pages)")
        check_tensor("k_cache", k_cache, shape=(batch, num_kv_heads, None, head_dim), dtypes=(dtype,), device=device)
        check_tensor("v_cache", v_cache, shape=tuple(k_cache.shape), dtypes=(dtype,), device=device)
        return ContiguousRowStore(k_cache), ContiguousRowStore(v_cache)
    check_positive("page_size", page_size)
    check_tensor("k_cache", k_cache, shape=(None, num_kv_heads, page_size, head_dim), dtypes=(dtype,), device=device)
    check_tensor("v_cache", v_cache, shape=tuple(k_cache.shape), dtypes=(dtype,), device=device)
    check_tensor("block_table", block_table, shape=(batch, None), dtypes=INDEX_DTYPES, device=device)
    return PagedRowStore(k_cache, block_table), PagedRowStore(v_cache, block_table)


def _check_cache_lens(cache_lens: torch.Tensor, batch: int, capacity: int, device: torch.device) -> list[int]:
    check_tensor("cache_lens", cache_lens, shape=(batch,), dtypes=INDEX_DTYPES, device=device)
    lens = cache_lens.tolist()
    for b, n in enumerate(lens):
        if n < 0:
            raise ValueError(f"cache_lens: expected non-negative lengths, got {n} for sequence {b}")
        if n + 1 > capacity:
            raise ValueError(f"cache_lens: sequence {b}: sequence of {n + 1} tokens exceeds the cache capacity "
                             f"{capacity}")
    return lens
