"""The reference model as an engine backend: the same scheduler, paged cache and preemption as on
the GPU, on any device (CI runs it on the CPU).

The reference package must not know the engine, so its models make contiguous caches; this
adapter gives them the engine's `PagedKVCache` instead (the reference attention reads and writes
through row stores, so it runs unchanged over pages).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from clusterfuse.engine.paged_cache import PagedKVCache, pages_for
from clusterfuse.reference.model_base import ReferenceModel

#: Tokens per KV page (the fused backend's page size, so both schedule alike).
PAGE_SIZE = 16
#: Prompt tokens per prefill chunk: long enough that a chunk's matmuls are efficient, short enough
#: that a step with a chunk does not hold running streams back for long on a CPU.
PREFILL_CHUNK = 256
#: When the caller gives no page count: at most this many bytes of KV pages on the CPU ...
CPU_KV_BYTES = 1 << 30
#: ... and at most this share of the free memory on a GPU.
GPU_KV_MEMORY_FRACTION = 0.5


class ReferenceBackend:
    """`DecoderBackend` over a `ReferenceModel` with a paged KV cache."""

    max_decode_batch: int | None = None  # any batch in one forward call

    def __init__(self, model: ReferenceModel, *, page_size: int = PAGE_SIZE,
                 prefill_chunk: int = PREFILL_CHUNK) -> None:
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk: expected a positive integer, got {prefill_chunk}")
        self.model = model
        self.device = model.device
        self.page_size = page_size
        self.prefill_chunk = prefill_chunk

    @property
    def kv_window(self) -> int | None:
        """The sliding window of every layer (None: full attention); the reference attention reads
        only the window's rows (`clusterfuse.reference.ops.self_attention`; MLA reads every row)."""
        c = self.model.config
        return c.sliding_window if c.mla is None else None

    def new_cache(self, max_batch: int, capacity: int, num_pages: int | None = None) -> PagedKVCache:
        """A paged cache for ``max_batch`` sequences of up to ``capacity`` tokens.  ``num_pages`` defaults
        to every sequence at full capacity, cut to a memory budget (`CPU_KV_BYTES`,
        `GPU_KV_MEMORY_FRACTION`) but never below one full sequence."""
        c, dtype = self.model.config, self.model.dtype
        per_seq = pages_for(capacity, self.page_size)
        if num_pages is None:
            row_bytes = torch.tensor([], dtype=dtype).element_size() * c.num_hidden_layers * (
                c.mla.kv_lora_rank + c.mla.qk_rope_head_dim if c.mla is not None
                else 2 * c.num_key_value_heads * c.head_dim)
            if self.device.type == "cuda":
                budget = int(torch.cuda.mem_get_info(self.device)[0] * GPU_KV_MEMORY_FRACTION)
            else:
                budget = CPU_KV_BYTES
            num_pages = max(per_seq, min(max_batch * per_seq, budget // (row_bytes * self.page_size)))
        elif num_pages < per_seq:
            raise ValueError(f"num_pages: {num_pages} pages of {self.page_size} tokens cannot hold one sequence of "
                             f"capacity {capacity} ({per_seq} pages)")
        common = dict(page_size=self.page_size, num_pages=num_pages, dtype=dtype, device=self.device)
        if c.mla is not None:
            return PagedKVCache.for_latent(c.num_hidden_layers, max_batch, capacity,
                                           c.mla.kv_lora_rank + c.mla.qk_rope_head_dim, **common)
        return PagedKVCache(c.num_hidden_layers, max_batch, capacity, c.num_key_value_heads, c.head_dim, **common)

    def forward(self, input_ids: torch.Tensor, cache: PagedKVCache, slots: Sequence[int] | None = None, *,
                logits: str = "all") -> torch.Tensor:
        return self.model.forward(input_ids, cache, slots, logits=logits)
