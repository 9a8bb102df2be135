"""GPU prefill in the model's dtype, chunked, writing K/V straight into the paged KV cache.

For each chunk of ``PrefillOptions.chunk`` prompt tokens, per layer (`llama_layers`):
RMSNorm → one QKV GEMM (cuBLAS, the backend's own ``w_qkv``) → RoPE (the reference's tables and
rotation) → the chunk's K/V scattered into the pages of its slot (the pools the decode kernels
read, ``[num_pages, nkv, page_size, hd]``) → attention of the chunk's queries with torch SDPA →
O-proj + residual → SwiGLU FFN + residual. Then the final norm and the LM head on the last
position only (``logits="last"``), or on every position (``"all"``, for tests and scoring).

Attention of a chunk:

* the first chunk of a sequence attends to itself: SDPA with ``is_causal=True`` on the K/V just
  computed (square causal: flash, cuDNN and efficient attention all take it);
* a chunk that continues a slot (chunked prefill, or a prompt longer than one chunk) attends to
  every earlier row of the slot plus itself causally: the slot's rows are gathered from its pages
  into one contiguous ``[nkv, L, hd]`` per K and V (one gather each; at a 32K prompt on
  Llama-3-8B 64 MiB each, per layer, transient) and SDPA runs with a lower-right causal bias
  (`torch.nn.attention.bias.causal_lower_right`: query ``i`` sees keys ``0 .. L - n + i``), which
  torch runs with flash attention where it can, else efficient attention. Summed over a 32K prompt
  in 2K chunks the gathers copy ~2 GiB per layer (a few % of the prefill, measured by
  bench/prefill.py); SDPA kernels stream the slot's pages no better, having no paged input.

A sliding window (Mistral) replaces the causal flags by an explicit boolean mask of the window
(`visible_keys`), which the efficient and math kernels take (flash refuses it and is passed over).
A continuing chunk then gathers only the slot's pages from the one holding
`window_first_row` of its first query on: no query of the chunk sees a row before it, and the
engine may have returned those pages to the pool.

GQA: with flash preferred (the default on a GPU), SDPA gets the grouped K/V heads as they are
(``enable_gqa``); for other backends, or if flash refuses them, the K/V heads are repeated
(`PagedPrefill._native_gqa`).

Memory per chunk is bounded by the chunk, not the prompt: activations of ``chunk`` tokens (the
largest, SiLU(gate)·up's input ``[chunk, 2 * intermediate]``, 112 MiB at 2K tokens for
Llama-3-8B) plus the gathered K/V of the slot; no ``[T, T]`` scores (SDPA's flash/efficient
kernels stream them) and no ``[T, vocab]`` logits unless ``logits="all"`` asks for them.
"""

from __future__ import annotations

import functools
import logging
from contextlib import nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from clusterfuse.engine.llama_layers import (
    Fp32Matmul,
    attention_residual,
    ffn_residual,
    gather_pages,
    lm_head,
    project_qkv,
    visible_keys,
    write_kv,
)
from clusterfuse.engine.paged_cache import PagedKVCache, pages_for, window_first_row
from clusterfuse.reference.model_base import ReferenceModel

log = logging.getLogger("clusterfuse")

#: ``logits=`` values of a backend's forward: every position's logits, or the last position's only.
LOGITS_MODES = ("all", "last")
#: SDPA backends by the names `PrefillOptions.attention` takes.
SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
DEFAULT_CHUNK = 2048
#: SDPA backends a GPU prefill allows by default, in priority order: the ones that never
#: materialise the scores. bench/prefill.py times each alone (``--attention``) to pick the order.
GPU_ATTENTION = ("flash", "cudnn", "efficient")


@dataclass(frozen=True)
class PrefillOptions:
    """How prompts are prefilled.

    ``chunk``: prompt tokens per chunk (bounds the activations' memory). ``attention``: the SDPA
    backends allowed, in priority order (names of `SDPA_BACKENDS`); ``None`` is the device's
    default, `GPU_ATTENTION` on a GPU and torch's own choice on the CPU. ``math`` materialises
    ``[heads, n, L]`` fp32 scores: for tests only.
    """

    chunk: int = DEFAULT_CHUNK
    attention: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.chunk, bool) or not isinstance(self.chunk, int) or self.chunk < 1:
            raise ValueError(f"prefill chunk: expected a positive integer, got {self.chunk!r}")
        if self.attention is not None:
            if not self.attention:
                raise ValueError("prefill attention: expected at least one SDPA backend "
                                 "(or None for the device's default)")
            bad = [a for a in self.attention if a not in SDPA_BACKENDS]
            if bad:
                raise ValueError(f"prefill attention: unknown SDPA backend(s) {bad}; expected some of "
                                 f"{', '.join(SDPA_BACKENDS)}")


class ChunkRows(NamedTuple):
    """The cache rows of a prefill chunk: its tokens' ``positions [n]`` (= their rows in the slot),
    the ``pages [n]`` and ``offsets [n]`` they are written to, the slot's pages ``held`` up to the
    chunk's end (what a continuing chunk reads back) and the slot's ``rows`` once it is written."""

    positions: torch.Tensor
    pages: torch.Tensor
    offsets: torch.Tensor
    held: torch.Tensor
    rows: int


class PagedPrefill:
    """Prefills one sequence at a time into a `PagedKVCache` (module docstring). The chunk loop, the
    attention and the LM head are shared; `_chunk` runs a Llama-family layer stack (a family with
    other layers overrides it: `clusterfuse.engine.deepseek_layers.DeepseekPrefill`)."""

    #: SDPA's ``scale`` (None: its default, the query head dim ** -0.5).
    softmax_scale: float | None = None

    def __init__(self, ref: ReferenceModel, options: PrefillOptions, mm: Fp32Matmul) -> None:
        self.ref, self.options, self.mm = ref, options, mm
        c = ref.config
        self.attention = options.attention or (GPU_ATTENTION if ref.device.type == "cuda" else None)
        self._group = c.num_attention_heads // c.num_key_value_heads

    def run(self, input_ids: torch.Tensor, cache: PagedKVCache, slot: int, *, logits: str = "last") -> torch.Tensor:
        """Append the prompt tokens ``input_ids [T]`` to ``slot`` (at the length it already holds) and
        return fp32 logits ``[T, vocab]`` (``logits="all"``) or ``[1, vocab]`` (``"last"``).

        Raises ``ValueError`` before touching the cache when the tokens are out of the vocabulary
        or the slot has no room (capacity or free pages) for all ``T`` of them."""
        if logits not in LOGITS_MODES:
            raise ValueError(f"logits: expected one of {', '.join(LOGITS_MODES)}, got {logits!r}")
        vocab = self.ref.config.vocab_size
        ids = input_ids.to(self.ref.device)
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:  # one host sync per prompt: prefill only
            raise ValueError(f"input_ids: token ids must lie in [0, {vocab})")
        T = ids.shape[0]
        cache.check_room([slot], T)  # allocates every page of the prompt, or raises with none taken
        start = cache.slot_lengths([slot])[0]
        self.ref.rope_tables(start + T)
        chunk = self.options.chunk
        outs = []
        for c0 in range(0, T, chunk):
            x = self._chunk(ids[c0:c0 + chunk], cache, slot, start + c0)
            cache.advance([slot], x.shape[0])
            if logits == "all":
                outs.append(lm_head(self.ref, x, self.mm))
            elif c0 + chunk >= T:
                outs.append(lm_head(self.ref, x[-1:], self.mm))
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    @staticmethod
    def chunk_rows(cache: PagedKVCache, slot: int, start: int, n: int) -> ChunkRows:
        """Where the ``n`` tokens of a chunk at rows ``start ..`` of ``slot`` go (`ChunkRows`)."""
        positions = torch.arange(start, start + n, device=cache.block_table.device)
        table = cache.block_table[slot]
        held = table[:pages_for(start + n, cache.page_size)]
        return ChunkRows(positions, table[positions // cache.page_size].long(), positions % cache.page_size, held,
                         start + n)

    def _chunk(self, ids: torch.Tensor, cache: PagedKVCache, slot: int, start: int) -> torch.Tensor:
        """Run ``ids [n]`` at rows ``start ..`` of ``slot``; returns the last residual stream ``[n, H]``."""
        ref, c = self.ref, self.ref.config
        n = ids.shape[0]
        positions, pages, offsets, held, rows = self.chunk_rows(cache, slot, start, n)
        # Pages before the window of the chunk's first query (row start) are not read (module docstring).
        skip = 0 if c.sliding_window is None else window_first_row(start, c.sliding_window) // cache.page_size
        held, read = held[skip:], rows - skip * cache.page_size
        x = ref.embed[ids]
        for layer in range(c.num_hidden_layers):
            q, k, v = project_qkv(ref, layer, x, positions)
            write_kv(cache.k_pools[layer], cache.v_pools[layer], pages, offsets, k, v)
            if start:
                k = gather_pages(cache.k_pools[layer], held)[:, :read]
                v = gather_pages(cache.v_pools[layer], held)[:, :read]
            out = self._attend(q, k, v)  # [nh, n, hd]
            x = attention_residual(ref, layer, x, out.transpose(0, 1).reshape(n, -1), self.mm)
            x = ffn_residual(ref, layer, x, self.mm)
        return x

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of ``q [nh, n, hd]`` (the last ``n`` rows) over ``k``/``v [nkv, L, hd]`` (the
        slot's rows up to the chunk's end, from any row before every query's window on)."""
        gqa = self._group > 1
        if gqa and self._native_gqa:
            try:
                return self._sdpa(q, k, v, gqa=True)
            except RuntimeError as err:  # no allowed kernel takes grouped heads for this shape
                log.info("prefill attention: SDPA %s refused grouped K/V heads (%s); repeating them instead",
                         self.attention or "default", str(err).splitlines()[0])
                self._native_gqa = False
        if gqa:
            k, v = k.repeat_interleave(self._group, dim=0), v.repeat_interleave(self._group, dim=0)
        return self._sdpa(q, k, v, gqa=False)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, gqa: bool) -> torch.Tensor:
        n, L = q.shape[1], k.shape[1]
        q, k, v = q[None], k[None], v[None]  # SDPA's fused kernels take 4-D [batch, heads, rows, hd] only
        window, scale = self.ref.config.sliding_window, self.softmax_scale
        with self._backends():
            if window is not None and window < L:
                rows = torch.arange(L - n, L, device=q.device)[:, None]  # each query's own row
                mask = visible_keys(torch.arange(L, device=q.device)[None, :], rows, window)
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa, scale=scale)[0]
            if n == L:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa, scale=scale)[0]
            return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(n, L), enable_gqa=gqa,
                                                  scale=scale)[0]

    @functools.cached_property
    def _native_gqa(self) -> bool:
        """Whether SDPA gets fewer K/V heads than query heads (``enable_gqa``) rather than K/V heads
        repeated ``group`` times: where the preferred backend is flash (on a GPU, in a dtype and head
        size it runs; the lower-right causal path calls flash directly, which reads grouped heads
        natively) or math, or torch chooses (CPU). Efficient attention and cuDNN get repeated heads,
        so that every backend runs: at a 32K prompt that repeat would be ~4x the gathered K/V bytes
        per layer and chunk."""
        if self.attention is None:
            return True
        first = self.attention[0]
        if first == "math":
            return True
        return first == "flash" and self.ref.dtype in (torch.bfloat16, torch.float16) and \
            self.ref.config.head_dim <= 256

    def _backends(self):
        if self.attention is None:
            return nullcontext()
        return sdpa_kernel([SDPA_BACKENDS[a] for a in self.attention], set_priority=True)
