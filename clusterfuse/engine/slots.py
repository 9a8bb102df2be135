"""Cache-slot bookkeeping: which rows of the KV cache belong to which running sequence."""

from __future__ import annotations


class SlotAllocator:
    """Hands out cache slots 0..max_batch-1; lowest free slot first so runs are reproducible."""

    def __init__(self, max_batch: int) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch: expected >= 1, got {max_batch}")
        self.max_batch = max_batch
        self._free = set(range(max_batch))

    @property
    def free(self) -> int:
        return len(self._free)

    def acquire(self) -> int:
        if not self._free:
            raise RuntimeError(f"all {self.max_batch} cache slots are in use")
        slot = min(self._free)
        self._free.remove(slot)
        return slot

    def release(self, slot: int) -> None:
        if not 0 <= slot < self.max_batch:
            raise ValueError(f"slot: expected 0..{self.max_batch - 1}, got {slot}")
        if slot in self._free:
            raise ValueError(f"slot: {slot} is not in use")
        self._free.add(slot)
