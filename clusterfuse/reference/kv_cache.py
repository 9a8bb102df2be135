"""The reference backend's KV cache: per-layer row stores plus the length of every slot.

A *slot* is one sequence's place in the cache.  One model step appends the same number
of rows ``T`` to each slot it runs, in every layer, at the slot's current length; the
length moves on once, after the last layer (`advance`).  Room is checked before any row
is written (`check_room`), so a too-long sequence leaves the cache untouched.

The lengths live twice: on the host (a list of ints, the truth every bookkeeping decision
reads) and on the device (``lengths``, which kernels and CUDA graphs read).  Only `advance`,
`reset` and `set_lengths` change them, and they change both, so reading a length never waits
for the GPU.

Storage access goes through `RowStore` objects (`kv_storage`): a paged cache is this
class built over `PagedRowStore`\\ s.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from clusterfuse.reference.kv_storage import ContiguousRowStore, RowStore, write_sequences


class KVCache:
    """Per-layer cached rows for ``max_batch`` slots of up to ``capacity`` tokens each.

    ``stores[layer]`` is a tuple of row stores: ``(k, v)`` for multi-head attention, or
    ``(latent,)`` for MLA.  ``lengths`` (``LongTensor [max_batch]``, on the cache's device)
    counts the rows each slot holds; `slot_lengths` reads the same counts from a host copy.
    Change them only through `advance`, `reset` and `set_lengths`, which keep the two equal.
    """

    def __init__(self, stores: Sequence[tuple[RowStore, ...]], max_batch: int, capacity: int,
                 device: torch.device | str | None) -> None:
        self.stores = list(stores)
        self.max_batch = max_batch
        self.capacity = capacity
        self.lengths = torch.zeros(max_batch, dtype=torch.long, device=device)
        self._host_lengths = [0] * max_batch  # the same counts, read without a device sync

    # ------------------------------------------------------------------ construction
    @classmethod
    def for_heads(cls, num_layers: int, max_batch: int, capacity: int, num_kv_heads: int, head_dim: int,
                  *, dtype: torch.dtype, device: torch.device | str | None,
                  v_head_dim: int | None = None) -> KVCache:
        """Contiguous K and V, each ``[max_batch, num_kv_heads, capacity, head_dim]`` per layer."""
        _check_sizes(max_batch, capacity)

        def buf(dim: int) -> ContiguousRowStore:
            return ContiguousRowStore(torch.zeros(max_batch, num_kv_heads, capacity, dim, dtype=dtype, device=device))

        return cls([(buf(head_dim), buf(v_head_dim or head_dim)) for _ in range(num_layers)],
                   max_batch, capacity, device)

    @classmethod
    def for_latent(cls, num_layers: int, max_batch: int, capacity: int, latent_dim: int,
                   *, dtype: torch.dtype, device: torch.device | str | None) -> KVCache:
        """Contiguous MLA latent ``[max_batch, capacity, latent_dim]`` per layer
        (``latent_dim = kv_lora_rank + qk_rope_head_dim``: normalised latent, then roped key)."""
        _check_sizes(max_batch, capacity)
        return cls([(ContiguousRowStore(torch.zeros(max_batch, capacity, latent_dim, dtype=dtype, device=device)),)
                    for _ in range(num_layers)], max_batch, capacity, device)

    # ------------------------------------------------------------------ bookkeeping
    def check_slots(self, slots: Sequence[int]) -> None:
        """Raise ``ValueError`` unless ``slots`` are distinct indices below ``max_batch``."""
        if len(set(slots)) != len(slots):
            raise ValueError(f"slots: expected distinct slot indices, got {list(slots)}")
        bad = [s for s in slots if not 0 <= s < self.max_batch]
        if bad:
            raise ValueError(f"slots: {bad} out of range for a cache of max_batch {self.max_batch}")

    def slot_lengths(self, slots: Sequence[int]) -> list[int]:
        """The row counts of ``slots``, from the host copy (no device sync)."""
        return [self._host_lengths[s] for s in slots]

    def check_room(self, slots: Sequence[int], num_tokens: int) -> None:
        """Raise ``ValueError`` if appending ``num_tokens`` rows to any of ``slots`` would overflow."""
        self.check_slots(slots)
        for slot, length in zip(slots, self.slot_lengths(slots), strict=True):
            if length + num_tokens > self.capacity:
                raise ValueError(f"slot {slot}: sequence of {length + num_tokens} tokens exceeds "
                                 f"the cache capacity {self.capacity}")

    def advance(self, slots: Sequence[int], num_tokens: int) -> None:
        """Count ``num_tokens`` more rows in each slot (after every layer has appended them)."""
        for s in slots:
            self._host_lengths[s] += num_tokens
        self._upload_lengths()

    def reset(self, slot: int) -> None:
        """Forget slot ``slot``'s sequence (its rows are left in place and overwritten later)."""
        self.check_slots([slot])
        self._host_lengths[slot] = 0
        self._upload_lengths()

    def set_lengths(self, slots: Sequence[int], lengths: Sequence[int]) -> None:
        """Declare that ``slots[i]`` holds ``lengths[i]`` rows (for rows written other than by `append`)."""
        self.check_slots(slots)
        if len(lengths) != len(slots):
            raise ValueError(f"lengths: expected {len(slots)} lengths (one per slot), got {len(lengths)}")
        bad = [n for n in lengths if not 0 <= n <= self.capacity]
        if bad:
            raise ValueError(f"lengths: {bad} out of range for a cache of capacity {self.capacity}")
        for s, n in zip(slots, lengths, strict=True):
            self._host_lengths[s] = int(n)
        self._upload_lengths()

    def _upload_lengths(self) -> None:
        # The whole host copy (max_batch ints) in one copy queued on the stream: kernels queued
        # before it still read the old counts, those queued after it the new ones.
        self.lengths.copy_(host_tensor(self._host_lengths, torch.long, self.lengths.device), non_blocking=True)

    # ------------------------------------------------------------------ storage
    def append(self, layer: int, slots: Sequence[int], *entries: torch.Tensor) -> None:
        """Write ``entries[j][i]`` (``[..., T, D]``) for slot ``slots[i]`` at its current length, in
        ``layer``; the length itself moves on with `advance`."""
        self.check_room(slots, entries[0].shape[-2])
        write_sequences(self.stores[layer], list(slots), self.slot_lengths(slots), entries)

    def read(self, layer: int, slot: int, length: int) -> tuple[torch.Tensor, ...]:
        """The first ``length`` rows of ``slot`` in ``layer``, one tensor per cached quantity."""
        return tuple(store.read(slot, length) for store in self.stores[layer])

    def layer_stores(self, layer: int) -> tuple[RowStore, ...]:
        return self.stores[layer]


def host_tensor(values: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` as a host tensor to copy to ``device`` with ``non_blocking=True``.

    For a CUDA device the tensor is pinned, so the copy is queued on the stream and the host
    goes on at once; a copy from pageable memory (``torch.tensor(values, device="cuda")``) waits
    for the stream instead.  torch's caching host allocator keeps the pinned block until the
    queued copy has run, so the caller may drop the tensor right away.  For any other device
    it is a plain tensor (pinning needs CUDA).
    """
    return torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")


def _check_sizes(max_batch: int, capacity: int) -> None:
    if max_batch <= 0:
        raise ValueError(f"max_batch: expected a positive integer, got {max_batch}")
    if capacity <= 0:
        raise ValueError(f"capacity: expected a positive integer, got {capacity}")
