"""Continuous batching: which requests run in the next engine step, and with which cache pages.

A FIFO ``waiting`` queue and a ``running`` list (kept in arrival order, each holding a cache slot).
Every step (`schedule`):

1. **Plan the running requests' work**, oldest first: each decoding request gets one token; each
   prefilling request gets its next prompt chunk while the step's prefill budget lasts (see below).
   Pages are allocated on demand: a step takes only the pages its new rows need.
2. **Preempt when the pages run out.** If the work does not fit the free pages, the NEWEST running
   request is preempted — its slot and pages freed, it goes back to the front of the waiting queue —
   and the plan is made again. Later it is recomputed from its prompt plus the tokens it generated
   (its text already streamed is not re-emitted), so nobody fails for want of pages. The oldest
   request always fits (the pool holds at least one sequence of full capacity), so this ends.
3. **Admit waiting requests** in FIFO order while a slot is free, the prefill budget has room and
   the free pages cover the request's whole prompt beyond what running requests still need (one
   page per decoding request as headroom, the rest of each prefilling prompt). Not in a step that
   preempted: a request just preempted would come straight back and push out another.

Sliding windows: with ``window`` (the model's window, when every layer has one and the engine frees
pages out of it), each step first returns the pages of every running request that lie wholly before
the rows its next query can see (`PagedKVCache.release_before`, `window_first_row`), so a long
generation holds O(window) pages. The accounting counts a request's block-table entries, returned
ones included (`PagedKVCache.pages_spanned`), so "pages needed" stays right; admission still asks
for a whole prompt's pages, an upper bound of what a windowed prefill holds at once.

Prefill policy: a **token budget** of ``prefill_budget`` prompt tokens per step (the backend's
``prefill_chunk``), shared by the prefilling requests in arrival order, alongside the decode batch
of every decoding request. Why a budget and not "one chunk per step": the decode batch runs every
step, so a running stream waits at most about one chunk's worth of prefill per token (a long prompt
is cut into chunks over several steps); and a burst of short prompts is prefilled together in one
step instead of one per step, so their first tokens come together.

The engine runs one step ahead of the host (`LLMEngine`): when a step is planned, the previous
step's tokens are not read yet. So the plan counts tokens sampled rather than read (limits that are
counts, max tokens and capacity, are never overrun), a request that ended by EOS or a stop string
may run one extra step (its token is dropped), and a preempted request is not admitted again while
one of its tokens is still on its way to the host.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from clusterfuse.engine.paged_cache import PagedKVCache, pages_for, window_first_row
from clusterfuse.engine.sequence import Sequence, Status
from clusterfuse.engine.slots import SlotAllocator


@dataclass
class PrefillChunk:
    """Prompt rows ``start .. end-1`` of ``seq.prefill_tokens()``; ``samples``: the chunk ends the
    prompt, so its last logits give the sequence's next token."""

    seq: Sequence
    start: int
    end: int
    samples: bool


@dataclass
class ScheduledStep:
    """One step's work: a decode batch (one token each, oldest first) and prefill chunks."""

    decode: list[Sequence] = field(default_factory=list)
    prefill: list[PrefillChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill


class Scheduler:
    """Waiting queue, running list, cache slots and pages (see the module docstring). ``window``: the
    sliding window of every layer, whose older pages are returned to the pool (None: keep every page)."""

    def __init__(self, cache: PagedKVCache, *, max_num_seqs: int, capacity: int, prefill_budget: int,
                 window: int | None = None) -> None:
        if prefill_budget < 1:
            raise ValueError(f"prefill_budget: expected a positive integer, got {prefill_budget}")
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"window: expected a positive integer or None, got {window!r}")
        self.window = window
        self.cache = cache
        self.capacity = capacity
        self.prefill_budget = prefill_budget
        self.slots = SlotAllocator(max_num_seqs)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # arrival order: running[-1] is the newest
        self.preemptions = 0

    # ------------------------------------------------------------------ requests in and out
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Take ``seq`` out wherever it is and free its slot and pages."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self._free_slot(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ one step
    def schedule(self) -> ScheduledStep:
        """Plan the next step, preempting and admitting as needed, and account for it: the planned
        rows get their pages and count as computed, the tokens the step samples as sampled."""
        if self.window is not None:
            self._release_out_of_window()
        preempted: list[Sequence] = []
        while (plan := self._plan_running()) is None:
            victim = self.running[-1]
            self._preempt(victim)
            preempted.append(victim)
        decode, chunks = plan
        if not preempted:
            self._admit(decode, chunks)
        for s in decode:
            self.cache.reserve(s.slot, s.computed + 1)
            s.computed += 1
            s.sampled += 1
        for c in chunks:
            self.cache.reserve(c.seq.slot, c.end)
            c.seq.computed = c.end
            c.seq.sampled += c.samples
        return ScheduledStep(decode, chunks, preempted)

    def _plan_running(self) -> tuple[list[Sequence], list[PrefillChunk]] | None:
        """The running requests' work for one step within the free pages; None if a decoding request
        cannot get the page for its next token, or if nothing at all can run for want of pages."""
        free, budget = self.cache.free_pages, self.prefill_budget
        decode: list[Sequence] = []
        chunks: list[PrefillChunk] = []
        for s in self.running:
            if s.prefilling:
                n = min(budget, s.prefill_target - s.computed, self._rows_fitting(s, free))
                if n > 0:
                    free -= self.cache.pages_needed(s.slot, s.computed + n)
                    budget -= n
                    chunks.append(PrefillChunk(s, s.computed, s.computed + n, s.computed + n == s.prefill_target))
            elif self._may_decode(s):
                need = self.cache.pages_needed(s.slot, s.computed + 1)
                if need > free:
                    return None
                free -= need
                decode.append(s)
        starved = any(s.prefilling for s in self.running) and budget == self.prefill_budget
        if starved and not decode and not chunks:  # prefills short of pages and nothing else to run
            return None
        return decode, chunks

    def _admit(self, decode: list[Sequence], chunks: list[PrefillChunk]) -> None:
        """Admit waiting requests (FIFO) into this step while slots, prefill budget and pages allow."""
        if not self.waiting or not self.slots.free:  # the steady state: nothing to do, nothing to count
            return
        budget = self.prefill_budget - sum(c.end - c.start for c in chunks)
        free = self.cache.free_pages - sum(self.cache.pages_needed(s.slot, s.computed + 1) for s in decode)
        # Pages running requests will still take: the rest of each prompt, one page of headroom per decoder.
        free -= sum(self.cache.pages_needed(s.slot, s.prefill_target) for s in self.running if s.prefilling)
        free -= len(decode)
        while self.waiting and self.slots.free and budget > 0:
            s = self.waiting[0]
            target = len(s.prompt_ids) + s.sampled
            if s.tokens_in_flight or pages_for(target, self.cache.page_size) > free:
                break
            self.waiting.popleft()
            s.slot, s.status = self.slots.acquire(), Status.RUNNING
            s.computed, s.prefill_target = 0, target
            self._insert_running(s)
            free -= pages_for(target, self.cache.page_size)
            n = min(budget, target)
            budget -= n
            chunks.append(PrefillChunk(s, 0, n, n == target))
        chunks.sort(key=lambda c: c.seq.arrival)

    # ------------------------------------------------------------------ helpers
    def _release_out_of_window(self) -> None:
        """Return the pages no later query of a running request can see: its next one sits at row
        ``computed`` (the next decode token, or the next prompt chunk's first row)."""
        for s in self.running:
            self.cache.release_before(s.slot, window_first_row(s.computed, self.window))

    def _may_decode(self, s: Sequence) -> bool:
        """Below its max tokens and the capacity, counting tokens still on their way to the host."""
        return s.sampled < s.params.max_tokens and len(s.prompt_ids) + s.sampled < self.capacity

    def _rows_fitting(self, s: Sequence, free_pages: int) -> int:
        """How many more rows ``s`` can take with its own pages plus ``free_pages`` more."""
        held = self.cache.pages_spanned(s.slot) + free_pages
        return max(0, held * self.cache.page_size - s.computed)

    def _insert_running(self, seq: Sequence) -> None:
        i = len(self.running)
        while i > 0 and self.running[i - 1].arrival > seq.arrival:
            i -= 1
        self.running.insert(i, seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._free_slot(seq)
        seq.status = Status.WAITING
        seq.computed = seq.prefill_target = 0
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def _free_slot(self, seq: Sequence) -> None:
        self.cache.reset(seq.slot)
        self.slots.release(seq.slot)
        seq.slot = None
