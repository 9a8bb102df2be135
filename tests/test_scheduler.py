"""The scheduler alone, on a real paged cache and no model: admission, the prefill budget, pages on
demand, preemption of the newest request, and re-admission only once its tokens are read."""

from __future__ import annotations

import torch

from clusterfuse.engine.paged_cache import PagedKVCache
from clusterfuse.engine.sampling import SamplingParams
from clusterfuse.engine.scheduler import Scheduler
from clusterfuse.engine.sequence import Sequence, Status
from clusterfuse.engine.text_stream import TextStream
from clusterfuse.models.byte_tokenizer import ByteTokenizer

PAGE = 4


def make(num_pages: int = 16, max_num_seqs: int = 4, budget: int = 8, capacity: int = 32) -> Scheduler:
    cache = PagedKVCache(1, max_num_seqs, capacity, 1, 1, page_size=PAGE, num_pages=num_pages,
                         dtype=torch.float32, device="cpu")
    return Scheduler(cache, max_num_seqs=max_num_seqs, capacity=capacity, prefill_budget=budget)


def seq(arrival: int, prompt_len: int, max_tokens: int = 16) -> Sequence:
    return Sequence(f"r{arrival}", list(range(3, 3 + prompt_len)), SamplingParams(max_tokens=max_tokens), arrival,
                    0.0, None, TextStream(ByteTokenizer(300), ()))


def read_all(s: Sequence, leave: int = 0) -> None:
    """What the engine does when a step's tokens are read: the sampled tokens arrive, but for the
    last ``leave`` (the engine reads a step after it has queued the next one)."""
    while s.read < s.sampled - leave:
        s.read += 1
        s.generated.append(100)


def test_admission_is_fifo_within_slots_and_prefill_budget():
    sch = make(max_num_seqs=2, budget=8)
    a, b, c = seq(0, 3), seq(1, 4), seq(2, 2)
    for s in (a, b, c):
        sch.add(s)
    step = sch.schedule()
    assert [(ch.seq, ch.start, ch.end, ch.samples) for ch in step.prefill] == [(a, 0, 3, True), (b, 0, 4, True)]
    assert list(sch.waiting) == [c] and [s.slot for s in sch.running] == [0, 1]  # no third slot
    read_all(a), read_all(b)
    step = sch.schedule()
    assert step.decode == [a, b] and not step.prefill and a.computed == 4 and a.sampled == 2


def test_a_long_prompt_is_prefilled_in_budget_sized_chunks_beside_the_decode_batch():
    sch = make(budget=8)
    a = seq(0, 2)
    sch.add(a)
    sch.schedule()
    long = seq(1, 19)
    sch.add(long)
    ends = []
    for _ in range(3):
        step = sch.schedule()
        assert step.decode == [a]
        ends.append([(ch.start, ch.end, ch.samples) for ch in step.prefill])
    assert ends == [[(0, 8, False)], [(8, 16, False)], [(16, 19, True)]]  # 8 prompt tokens a step
    assert long.computed == 19 and not long.prefilling


def test_pages_follow_the_rows_scheduled():
    sch = make(budget=16)
    a = seq(0, 5)
    sch.add(a)
    sch.schedule()
    assert sch.cache.pages_of(a.slot) == [0, 1]  # 5 rows: 2 pages
    for rows in range(6, 10):
        sch.schedule()
        assert a.computed == rows and len(sch.cache.pages_of(a.slot)) == -(-rows // PAGE)


def test_preemption_frees_the_newest_and_readmits_it_after_its_tokens_are_read():
    sch = make(num_pages=8, budget=32, capacity=32)  # 8 pages: one sequence of the full 32 rows
    old, new = seq(0, 12), seq(1, 12)
    sch.add(old), sch.add(new)
    sch.schedule()  # both prefilled: 3 pages each, 2 free
    assert sch.cache.free_pages == 2
    for _ in range(8):  # decode until the pool runs out, reading a step once the next one is planned
        read_all(old, leave=1), read_all(new, leave=1)
        step = sch.schedule()
        if step.preempted:
            break
    assert step.preempted == [new] and new.status is Status.WAITING and list(sch.waiting) == [new]
    assert sch.running == [old] and step.decode == [old] and new.slot is None and new.preemptions == 1
    tokens_before = new.sampled
    assert new.tokens_in_flight == 1  # the step that preempted it had not been read yet
    step = sch.schedule()  # its token is still on the way: not admitted, even with room
    assert new.status is Status.WAITING
    read_all(new), read_all(old)
    sch.finish(old)
    step = sch.schedule()
    assert [(ch.seq, ch.start, ch.end) for ch in step.prefill] == [(new, 0, 12 + tokens_before)]
    assert new.prefill_tokens()[12:] == new.generated and sch.preemptions == 1


def test_finish_releases_slot_and_pages_wherever_the_request_is():
    sch = make(max_num_seqs=1)
    a, b = seq(0, 6), seq(1, 3)
    sch.add(a), sch.add(b)
    sch.schedule()
    sch.finish(b)  # still waiting
    sch.finish(a)  # running
    assert not sch.has_work() and sch.cache.free_pages == 16 and sch.slots.free == 1
    assert a.status is b.status is Status.FINISHED
