"""Paged KV cache: a pool of fixed-size pages per layer, handed to sequences as they grow.

The layout is the one the fused attention kernel and vLLM/FlashInfer read: per layer a K
and a V pool ``[num_pages, num_kv_heads, page_size, head_dim]`` and one shared
``block_table [max_batch, max_pages_per_seq]`` (int32, on the device) whose row ``s`` lists
the pages of slot ``s`` in order.  Pages are taken from a free list when a step needs them
(`check_room`, called before any row is written) and returned when the slot is reset, so
many short sequences and a few long ones share one pool.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from clusterfuse.reference.kv_cache import KVCache, host_tensor
from clusterfuse.reference.kv_storage import PagedRowStore


def pages_for(rows: int, page_size: int) -> int:
    return -(-rows // page_size)


class PagedKVCache(KVCache):
    """`KVCache` over paged row stores with on-demand page allocation.

    ``capacity`` bounds one sequence (the block table's width); ``num_pages`` bounds all of
    them together.  Page 0 .. num_pages-1 are real; unused block-table entries hold 0 and
    are never read (a slot reads only pages covering its length).
    """

    def __init__(self, num_layers: int, max_batch: int, capacity: int, num_kv_heads: int, head_dim: int, *,
                 page_size: int, num_pages: int, dtype: torch.dtype, device: torch.device | str) -> None:
        if page_size < 1:
            raise ValueError(f"page_size: expected a positive integer, got {page_size}")
        if num_pages < 1:
            raise ValueError(f"num_pages: expected a positive integer, got {num_pages}")
        self.page_size = page_size
        self.num_pages = num_pages
        max_pages = pages_for(capacity, page_size)
        self.block_table = torch.zeros(max_batch, max_pages, dtype=torch.int32, device=device)
        self.k_pools = [torch.zeros(num_pages, num_kv_heads, page_size, head_dim, dtype=dtype, device=device)
                        for _ in range(num_layers)]
        self.v_pools = [torch.zeros_like(k) for k in self.k_pools]
        stores = [(PagedRowStore(k, self.block_table), PagedRowStore(v, self.block_table))
                  for k, v in zip(self.k_pools, self.v_pools, strict=True)]
        super().__init__(stores, max_batch, max_pages * page_size, device)
        # Host-side truth for allocation; the device block table mirrors it.
        self._free: list[int] = list(range(num_pages - 1, -1, -1))  # pop() hands out the lowest page
        self._pages: list[list[int]] = [[] for _ in range(max_batch)]

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def pages_of(self, slot: int) -> list[int]:
        return list(self._pages[slot])

    def check_room(self, slots: Sequence[int], num_tokens: int) -> None:
        """Raise ``ValueError`` unless every slot can take ``num_tokens`` more rows, then make sure
        each has the pages for them.  Nothing is allocated when the pool is short."""
        super().check_room(slots, num_tokens)
        needs = {s: pages_for(length + num_tokens, self.page_size) - len(self._pages[s])
                 for s, length in zip(slots, self.slot_lengths(slots), strict=True)}
        total = sum(n for n in needs.values() if n > 0)
        if total > len(self._free):
            raise ValueError(f"KV cache is full: {total} more pages of {self.page_size} tokens needed, "
                             f"{len(self._free)} free of {self.num_pages}")
        for slot, n in needs.items():
            if n <= 0:
                continue
            new = [self._free.pop() for _ in range(n)]
            first = len(self._pages[slot])
            self._pages[slot].extend(new)
            # Queued on the stream, no host wait: steps queued before it never read these entries.
            pages = host_tensor(new, torch.int32, self.block_table.device)
            self.block_table[slot, first:first + n].copy_(pages, non_blocking=True)

    def reset(self, slot: int) -> None:
        """Forget the slot's sequence and return its pages to the pool."""
        super().reset(slot)
        self._free.extend(reversed(self._pages[slot]))
        self._free.sort(reverse=True)
        self._pages[slot] = []
        self.block_table[slot].zero_()
