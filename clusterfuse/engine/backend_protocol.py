"""What the engine needs from a model backend (reference, fused, torch)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch


class DecoderBackend(Protocol):
    """A model that appends tokens to the rows of a paged KV cache and returns their logits.

    ``forward(input_ids [B, T], cache, slots, logits=...)`` appends row ``i``'s tokens to cache slot
    ``slots[i]`` at whatever length that slot holds, and returns fp32 logits ``[B, T, V]``
    (``logits="all"``) or ``[B, 1, V]`` (``logits="last"``).  The engine calls it two ways:

    * a decode step: ``T == 1``, ``B <= max_decode_batch``; the ids are the previous step's sampled
      ids as they are on the device, before the host has read them (reading them would stall);
    * a prefill chunk: ``B == 1``, ``T <= prefill_chunk``; chunked prefill continues a slot.

    ``new_cache(max_batch, capacity, num_pages=None)`` makes the `PagedKVCache` the engine schedules
    pages of (``num_pages`` None: the backend's choice). An optional ``prepare_decode(cache, batch)``
    does one-time work for decode batches up to ``batch`` rows (the fused backend captures its CUDA
    graphs); the engine calls it when it is built, so that no request pays for it. An optional
    ``kv_window`` (int or None) says that every layer attends only within a sliding window of that
    many rows and that the backend reads no cache row before
    `clusterfuse.engine.paged_cache.window_first_row` of a query: the engine may then return the
    pages before it to the pool.
    """

    device: torch.device
    #: Prompt tokens one prefill call takes; the engine prefills at most this many tokens per step.
    prefill_chunk: int
    #: The most rows of one decode call (None: any); a larger batch runs as several calls.
    max_decode_batch: int | None

    def new_cache(self, max_batch: int, capacity: int, num_pages: int | None = None) -> Any: ...

    def forward(self, input_ids: torch.Tensor, cache: Any, slots: Sequence[int] | None = None, *,
                logits: str = "all") -> torch.Tensor: ...
