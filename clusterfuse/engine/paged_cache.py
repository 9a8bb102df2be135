"""Paged KV cache: a pool of fixed-size pages per layer, handed to sequences as they grow.

The layout is the one the fused attention kernel and vLLM/FlashInfer read: per layer a K
and a V pool ``[num_pages, num_kv_heads, page_size, head_dim]`` (or, for MLA, one latent pool
``[num_pages, page_size, latent_dim]``, `PagedKVCache.for_latent`) and one shared
``block_table [max_batch, max_pages_per_seq]`` (int32, on the device) whose row ``s`` lists
the pages of slot ``s`` in order.  Pages are taken from a free list when a step needs them
(`check_room`, called before any row is written) and returned when the slot is reset, so
many short sequences and a few long ones share one pool.  The scheduler asks `pages_needed`
before it runs a step, so that it can preempt a sequence instead of overflowing the pool.

With a sliding window on every layer (Mistral-v0.1) no later step reads the rows before a
sequence's window, and the scheduler returns the pages wholly before it (`release_before`,
`window_first_row`): a slot then holds its pages ``released .. `` of its block-table row, and
a long generation O(window) pages instead of O(length).  The returned pages' block-table entries
stay as they were and are never read: every reader of a windowed model (the fused kernel, the
torch backend's decode step, the prefill, the reference attention) reads only the rows from
`window_first_row` on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from clusterfuse.reference.kv_cache import KVCache, host_tensor
from clusterfuse.reference.kv_storage import PagedRowStore


def pages_for(rows: int, page_size: int) -> int:
    return -(-rows // page_size)


#: Keys per tile of the fused attention kernel's key loop (split_kv_mma.cuh kTileKeys): with a
#: window it reads from the window's first key rounded down to a tile (window_tile_start).
KERNEL_TILE_KEYS = 16


def window_first_row(next_row: int, window: int) -> int:
    """The first cached row that a query at row ``next_row`` or later may read under a sliding
    ``window``: its first visible key ``next_row + 1 - window``, rounded down to the fused kernel's
    16-key tiles (the kernel loads whole tiles and masks the keys before the window)."""
    first = max(0, next_row + 1 - window)
    return first - first % KERNEL_TILE_KEYS


class PagedKVCache(KVCache):
    """`KVCache` over paged row stores with on-demand page allocation.

    ``capacity`` bounds one sequence (the block table's width); ``num_pages`` bounds all of
    them together.  Page 0 .. num_pages-1 are real; unused block-table entries hold 0 and
    are never read (a slot reads only pages covering its length), nor are the entries of pages
    returned by `release_before` (a window reads only rows after them).
    """

    def __init__(self, num_layers: int, max_batch: int, capacity: int, num_kv_heads: int, head_dim: int, *,
                 page_size: int, num_pages: int, dtype: torch.dtype, device: torch.device | str,
                 v_head_dim: int | None = None) -> None:
        self._build(num_layers, max_batch, capacity, ((num_kv_heads, head_dim), (num_kv_heads, v_head_dim or head_dim)),
                    page_size=page_size, num_pages=num_pages, dtype=dtype, device=device)

    @classmethod
    def for_latent(cls, num_layers: int, max_batch: int, capacity: int, latent_dim: int, *, page_size: int,
                   num_pages: int, dtype: torch.dtype, device: torch.device | str) -> PagedKVCache:
        """One MLA latent pool ``[num_pages, page_size, latent_dim]`` per layer (see `KVCache.for_latent`)."""
        cache = cls.__new__(cls)
        cache._build(num_layers, max_batch, capacity, ((latent_dim,),), page_size=page_size, num_pages=num_pages,
                     dtype=dtype, device=device)
        return cache

    def _build(self, num_layers: int, max_batch: int, capacity: int, row_shapes: tuple[tuple[int, ...], ...], *,
               page_size: int, num_pages: int, dtype: torch.dtype, device: torch.device | str) -> None:
        """Pools for each cached quantity of ``row_shapes`` (a row's shape, its last axis the row width:
        ``(heads, head_dim)`` gives ``[num_pages, heads, page_size, head_dim]``)."""
        if page_size < 1:
            raise ValueError(f"page_size: expected a positive integer, got {page_size}")
        if num_pages < 1:
            raise ValueError(f"num_pages: expected a positive integer, got {num_pages}")
        self.page_size = page_size
        self.num_pages = num_pages
        max_pages = pages_for(capacity, page_size)
        self.block_table = torch.zeros(max_batch, max_pages, dtype=torch.int32, device=device)
        #: pools[layer][j]: the pages of cached quantity j (K, V or the latent) in that layer.
        self.pools = [tuple(torch.zeros(num_pages, *shape[:-1], page_size, shape[-1], dtype=dtype, device=device)
                            for shape in row_shapes) for _ in range(num_layers)]
        # K and V pools by layer, as the fused kernels take them (the latent pool counts as K).
        self.k_pools = [layer[0] for layer in self.pools]
        self.v_pools = [layer[1] for layer in self.pools if len(layer) > 1]
        stores = [tuple(PagedRowStore(pool, self.block_table) for pool in layer) for layer in self.pools]
        super().__init__(stores, max_batch, max_pages * page_size, device)
        # Host-side truth for allocation; the device block table mirrors it.
        self._free: list[int] = list(range(num_pages - 1, -1, -1))  # pop() hands out the lowest page
        # The pages a slot holds, in block-table order from entry _released[slot] (the entries
        # before it were returned by release_before).
        self._pages: list[list[int]] = [[] for _ in range(max_batch)]
        self._released = [0] * max_batch

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def pages_of(self, slot: int) -> list[int]:
        """The pages ``slot`` holds, in order (without those `release_before` returned)."""
        return list(self._pages[slot])

    def pages_spanned(self, slot: int) -> int:
        """Block-table entries of ``slot`` in use so far: its pages and those it returned before them
        (its rows fit in ``pages_spanned * page_size``)."""
        return self._released[slot] + len(self._pages[slot])

    def pages_needed(self, slot: int, rows: int) -> int:
        """How many more pages ``slot`` needs to hold ``rows`` rows in all (0 if it has them)."""
        return max(0, pages_for(rows, self.page_size) - self.pages_spanned(slot))

    def release_before(self, slot: int, row: int) -> int:
        """Return to the pool the pages of ``slot`` that lie wholly before row ``row`` (rows no later
        step reads: a sliding window's, see `window_first_row`); returns how many. Their block-table
        entries are left as they are and must not be read again. Stream order makes this safe while
        an earlier step that reads them is still queued: a step that writes a returned page to
        another slot is queued after it."""
        n = min(row // self.page_size - self._released[slot], len(self._pages[slot]))
        if n <= 0:
            return 0
        gone, self._pages[slot] = self._pages[slot][:n], self._pages[slot][n:]
        self._released[slot] += n
        self._free.extend(gone)
        self._free.sort(reverse=True)
        return n

    def reserve(self, slot: int, rows: int) -> None:
        """Give ``slot`` the pages for ``rows`` rows in all, before a step writes them (the scheduler's
        on-demand allocation; a step's `check_room` then finds them there)."""
        n = self.pages_needed(slot, rows)
        if n > len(self._free):
            raise ValueError(f"KV cache is full: {n} more pages of {self.page_size} tokens needed, "
                             f"{len(self._free)} free of {self.num_pages}")
        self._allocate(slot, n)

    def check_room(self, slots: Sequence[int], num_tokens: int) -> None:
        """Raise ``ValueError`` unless every slot can take ``num_tokens`` more rows, then make sure
        each has the pages for them.  Nothing is allocated when the pool is short."""
        super().check_room(slots, num_tokens)
        needs = {s: self.pages_needed(s, length + num_tokens)
                 for s, length in zip(slots, self.slot_lengths(slots), strict=True)}
        total = sum(needs.values())
        if total > len(self._free):
            raise ValueError(f"KV cache is full: {total} more pages of {self.page_size} tokens needed, "
                             f"{len(self._free)} free of {self.num_pages}")
        for slot, n in needs.items():
            self._allocate(slot, n)

    def _allocate(self, slot: int, n: int) -> None:
        if n <= 0:
            return
        new = [self._free.pop() for _ in range(n)]
        first = self.pages_spanned(slot)
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
        self._released[slot] = 0
        self.block_table[slot].zero_()
