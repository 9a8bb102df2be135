"""Where cached rows live: contiguous per-sequence buffers or a pool of fixed-size pages.

Every cache tensor keeps its sequence axis second to last, so one layout rule covers
K/V (``[..., heads, rows, head_dim]``) and the MLA latent (``[..., rows, latent_dim]``).
A *row store* hides the layout behind two methods — write ``T`` rows of a sequence at a
given row, read rows ``first .. L-1`` of a sequence (``first`` 0: the first ``L``; a sliding
window reads only its rows, so a paged cache may have returned the pages before them) — so
attention code never knows whether the cache is paged.
"""

from __future__ import annotations

from typing import Protocol

import torch


class RowStore(Protocol):
    """Rows of one cached quantity (K, V or the MLA latent) for many sequences."""

    @property
    def capacity(self) -> int:
        """The most rows one sequence can hold."""
        ...

    def write(self, seq: int, start: int, rows: torch.Tensor) -> None:
        """Store ``rows [..., T, D]`` as rows ``start .. start+T-1`` of sequence ``seq``."""
        ...

    def read(self, seq: int, length: int, first: int = 0) -> torch.Tensor:
        """Rows ``first .. length-1`` of sequence ``seq``: ``[..., length - first, D]`` in the storage dtype."""
        ...


class ContiguousRowStore:
    """``buffer [num_seqs, ..., capacity, D]``: sequence ``s`` owns ``buffer[s]``."""

    def __init__(self, buffer: torch.Tensor) -> None:
        self.buffer = buffer

    @property
    def capacity(self) -> int:
        return self.buffer.shape[-2]

    def write(self, seq: int, start: int, rows: torch.Tensor) -> None:
        self.buffer[seq][..., start:start + rows.shape[-2], :] = rows.to(self.buffer.dtype)

    def read(self, seq: int, length: int, first: int = 0) -> torch.Tensor:
        return self.buffer[seq][..., first:length, :]


class PagedRowStore:
    """``pool [num_pages, ..., page_size, D]`` with ``block_table [num_seqs, max_pages]``:
    row ``r`` of sequence ``s`` is row ``r % page_size`` of page ``block_table[s, r // page_size]``."""

    def __init__(self, pool: torch.Tensor, block_table: torch.Tensor) -> None:
        self.pool = pool
        self.block_table = block_table

    @property
    def page_size(self) -> int:
        return self.pool.shape[-2]

    @property
    def capacity(self) -> int:
        return self.block_table.shape[1] * self.page_size

    def write(self, seq: int, start: int, rows: torch.Tensor) -> None:
        # One scatter for all T rows (no per-row host round trip): the two advanced indices
        # (page, offset) are split by the head axis, so their broadcast dim leads the result.
        ps = self.page_size
        r = torch.arange(start, start + rows.shape[-2], device=self.pool.device)
        pages = self.block_table[seq].to(self.pool.device)[r // ps].long()
        self.pool[pages, ..., r % ps, :] = rows.to(self.pool.dtype).movedim(-2, 0)

    def read(self, seq: int, length: int, first: int = 0) -> torch.Tensor:
        if length <= first:
            return self.pool[0][..., :0, :]
        ps = self.page_size
        pages = self.block_table[seq, first // ps:-(-length // ps)].tolist()  # only the pages holding the rows
        start = first // ps * ps
        return torch.cat([self.pool[p] for p in pages], dim=-2)[..., first - start:length - start, :]


def write_sequences(stores: tuple[RowStore, ...], seqs: list[int], starts: list[int],
                    entries: tuple[torch.Tensor, ...]) -> None:
    """For batch row ``i``: store ``entries[j][i]`` (``[..., T, D]``) in ``stores[j]`` as rows
    ``starts[i] ..`` of sequence ``seqs[i]``."""
    for i, (seq, start) in enumerate(zip(seqs, starts, strict=True)):
        for store, rows in zip(stores, entries, strict=True):
            store.write(seq, start, rows[i])
