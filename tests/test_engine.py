"""Engine rules on the CPU: sampling, stop strings and streaming, continuous batching, chunked
prefill, on-demand pages, preemption, aborts, the one-step-ahead loop.

A small deterministic backend (a bigram table over a byte vocabulary, on a real `PagedKVCache`)
stands in for a model so each rule can be checked exactly; `test_engine_smollm2.py` runs the same
engine over the real reference backend.
"""

from __future__ import annotations

import math

import pytest
import torch

from clusterfuse.engine.llm_engine import LLMEngine
from clusterfuse.engine.paged_cache import PagedKVCache, pages_for
from clusterfuse.engine.sampling import SamplingParams, filter_logits, sample, sample_rows
from clusterfuse.engine.slots import SlotAllocator
from clusterfuse.engine.text_stream import TextStream
from clusterfuse.models.byte_tokenizer import BYTE_OFFSET, ByteTokenizer

VOCAB = 300
EOS = 2
PAGE = 4


class BigramBackend:
    """logits[next] = table[last token]: 'a'->'b'->'c'->... and 'z' -> EOS. Records every call as
    (tokens per row, slots)."""

    device = torch.device("cpu")

    def __init__(self, prefill_chunk: int = 64, max_decode_batch: int | None = None) -> None:
        g = torch.Generator().manual_seed(0)
        self.table = torch.randn(VOCAB, VOCAB, generator=g)
        for ch in range(ord("a"), ord("z")):
            self.table[ch + BYTE_OFFSET, ch + 1 + BYTE_OFFSET] = 50.0
        self.table[ord("z") + BYTE_OFFSET, EOS] = 50.0
        self.prefill_chunk = prefill_chunk
        self.max_decode_batch = max_decode_batch
        self.calls: list[tuple[int, list[int]]] = []

    def new_cache(self, max_batch: int, capacity: int, num_pages: int | None = None) -> PagedKVCache:
        return PagedKVCache(1, max_batch, capacity, 1, 1, page_size=PAGE,
                            num_pages=num_pages or max_batch * pages_for(capacity, PAGE), dtype=torch.float32,
                            device="cpu")

    def forward(self, input_ids, cache, slots=None, *, logits="all"):
        slots = list(slots)
        cache.check_room(slots, input_ids.shape[1])
        self.calls.append((input_ids.shape[1], slots))
        cache.advance(slots, input_ids.shape[1])
        out = self.table[input_ids]
        return out[:, -1:] if logits == "last" else out


def tokenizer() -> ByteTokenizer:
    return ByteTokenizer(VOCAB, bos_token_id=1, eos_token_ids=(EOS,))


def make_engine(capacity: int = 200, max_num_seqs: int = 4, **kw) -> LLMEngine:
    backend_kw = {k: kw.pop(k) for k in ("prefill_chunk", "max_decode_batch") if k in kw}
    return LLMEngine(BigramBackend(**backend_kw), tokenizer(), capacity=capacity, max_num_seqs=max_num_seqs, **kw)


def run(engine: LLMEngine, requests: dict[str, tuple[str, SamplingParams]]):
    """Add every request, step until done; returns ({id: final output}, {id: [every output]})."""
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    finals, history = {}, {rid: [] for rid in requests}
    while engine.has_unfinished():
        for out in engine.step():
            history[out.request_id].append(out)
            if out.finished:
                finals[out.request_id] = out
    return finals, history


def serial(prompt: str, params: SamplingParams) -> tuple[str, list[int], str]:
    """What greedy decoding must give, written out plainly: (text, token ids, finish reason)."""
    tok, table = tokenizer(), BigramBackend().table
    ids = tok.encode(prompt)
    generated: list[int] = []
    while True:
        token = int(table[(ids + generated)[-1]].argmax())
        if token == EOS:
            return tok.decode(generated), generated, "stop"
        generated.append(token)
        text = tok.decode(generated)
        hits = [text.index(s) for s in params.stop if s in text]
        if hits:
            return text[:min(hits)], generated, "stop"
        if len(generated) >= params.max_tokens:
            return text, generated, "length"


def test_greedy_follows_the_table_and_eos_is_a_stop():
    finals, _ = run(make_engine(), {"r": ("w", SamplingParams())})
    out = finals["r"]
    assert (out.text, out.finish_reason, out.prompt_tokens) == ("xyz", "stop", 2)  # BOS + 'w'
    assert out.token_ids == [ord(c) + BYTE_OFFSET for c in "xyz"]  # the EOS is not one of them
    assert out.completion_tokens == 3 and out.arrival_s <= out.first_token_s <= out.finished_s


def test_max_tokens_and_stop_strings():
    finals, _ = run(make_engine(), {"len": ("a", SamplingParams(max_tokens=5)),
                                    "stop": ("a", SamplingParams(stop=("ef", "xyz")))})
    assert (finals["len"].text, finals["len"].finish_reason) == ("bcdef", "length")
    assert (finals["stop"].text, finals["stop"].finish_reason) == ("bcd", "stop")


def test_streamed_deltas_add_up_and_hold_back_a_possible_stop_string():
    """Issue 39: with a stop string, text that may be its start is not streamed until it is known
    not to be; the deltas concatenated are the final text, every output's text a prefix of it."""
    finals, history = run(make_engine(), {"cut": ("a", SamplingParams(stop=("ef",))),
                                          "released": ("a", SamplingParams(max_tokens=6, stop=("eX",)))})
    cut = [o.text for o in history["cut"]]
    assert cut == ["b", "bc", "bcd", "bcd", "bcd"]  # 'e' held back, then the stop string cuts it
    released = [o.text for o in history["released"]]
    assert released == ["b", "bc", "bcd", "bcd", "bcdef", "bcdefg"]  # 'e' held, released by 'f'
    for rid, outs in history.items():
        assert "".join(o.delta_text for o in outs) == finals[rid].text
        assert sum((o.delta_token_ids for o in outs), []) == finals[rid].token_ids


def test_text_stream_hold_back():
    tok = tokenizer()
    s = TextStream(tok, ("is: 2",))
    shown = []
    for ch in "answer is: 2 and more":
        stopped = s.push(ord(ch) + BYTE_OFFSET)
        shown.append(s.visible)
        if stopped:
            break
    assert shown[-1] == "answer " and all(v in ("", "answer ") or "answer ".startswith(v) for v in shown)
    assert "answer is" not in "".join(shown)
    s = TextStream(tok, ("is: 2",))
    for ch in "this: 3":
        s.push(ord(ch) + BYTE_OFFSET)
    assert s.visible == "this: 3"
    s = TextStream(tok, ("is: 2",))
    for ch in "it is":
        s.push(ord(ch) + BYTE_OFFSET)
    assert s.visible == "it " and not s.stopped
    s.close()
    assert s.visible == "it is"  # the request ended some other way: the held text is released


# Prompts whose greedy continuations end every way: EOS ("w", "xy", "y", "q"), a stop string
# ("f" meets "kl", "a" meets "c"), max tokens ("a", "p", "mnopqrs").
PROMPTS = ["w", "f", "a", "mnopqrs", "xy", "q", "p", "y"]


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=10, stop=("kl",)),
    SamplingParams(max_tokens=4, stop=("xyz", "c")),
    SamplingParams(max_tokens=1),
    SamplingParams(max_tokens=40),
])
@pytest.mark.parametrize("max_num_seqs, prefill_chunk, num_pages", [(8, 64, None), (3, 4, None), (8, 5, 13)],
                         ids=["all-at-once", "3-slots-chunked", "tiny-pool"])
def test_continuous_batching_equals_serial(params, max_num_seqs, prefill_chunk, num_pages):
    """However requests are admitted, chunked and preempted, each gets exactly the serial result."""
    engine = make_engine(capacity=50, max_num_seqs=max_num_seqs, prefill_chunk=prefill_chunk, num_pages=num_pages)
    finals, history = run(engine, {str(i): (p, params) for i, p in enumerate(PROMPTS)})
    for i, p in enumerate(PROMPTS):
        out = finals[str(i)]
        assert (out.text, out.token_ids, out.finish_reason) == serial(p, params), p
        assert "".join(o.delta_text for o in history[str(i)]) == out.text
        assert [o.finished for o in history[str(i)]].count(True) == 1
    assert engine.cache.free_pages == engine.cache.num_pages and engine.scheduler.slots.free == max_num_seqs
    stats = engine.stats()
    assert (stats.running, stats.waiting, stats.kv_pages_used) == (0, 0, 0)
    if num_pages and params.max_tokens == 40:  # 8 requests of up to 48 tokens on 13 pages of 4
        assert stats.preemptions > 0
    assert stats.prompt_tokens == sum(len(tokenizer().encode(p)) for p in PROMPTS)


def test_late_requests_join_a_running_batch():
    engine = make_engine(max_num_seqs=4)
    engine.add_request("first", "a", SamplingParams(max_tokens=12))
    outs = [engine.step() for _ in range(4)]
    assert [o.request_id for step in outs for o in step] == ["first"] * 3
    engine.add_request("late", "m", SamplingParams(max_tokens=3))
    seen = []
    while engine.has_unfinished():
        seen += [(o.request_id, o.finished) for o in engine.step()]
    assert ("late", True) in seen and seen.index(("late", True)) < seen.index(("first", True))
    decode_batches = [slots for width, slots in engine.backend.calls if width == 1]
    assert [0, 1] in decode_batches  # the late request decoded alongside the first one


def test_chunked_prefill_interleaves_with_decoding():
    """A 13-token prompt arriving while another request decodes is prefilled 4 tokens per step, and
    the running request decodes in every one of those steps."""
    engine = make_engine(prefill_chunk=4)
    engine.add_request("running", "a", SamplingParams(max_tokens=20))
    for _ in range(3):
        engine.step()
    engine.backend.calls.clear()
    engine.add_request("long", "abcdefghijkl", SamplingParams(max_tokens=2))
    for _ in range(4):
        engine.step()
    calls = engine.backend.calls
    assert calls == [(1, [0]), (4, [1]), (1, [0]), (4, [1]), (1, [0]), (4, [1]), (1, [0]), (1, [1])]
    #                decode + chunk 1   decode + chunk 2   decode + chunk 3   decode + last token
    # (the 13-token prompt: chunks of 4, 4, 4 and 1: the last one arrives with the fourth step)


def test_a_burst_of_short_prompts_is_prefilled_in_one_step():
    engine = make_engine(max_num_seqs=4, prefill_chunk=16)
    for i, p in enumerate(["ab", "cd", "ef", "gh"]):
        engine.add_request(str(i), p, SamplingParams(max_tokens=3))
    engine.step()
    assert engine.backend.calls == [(3, [0]), (3, [1]), (3, [2]), (3, [3])]


def test_pages_are_taken_on_demand_and_given_back():
    engine = make_engine(capacity=40, max_num_seqs=2)
    engine.add_request("r", "a", SamplingParams(max_tokens=10))  # 2 prompt tokens, then 10 more rows
    held = []
    while engine.has_unfinished():
        engine.step()
        held.append(engine.cache.num_pages - engine.cache.free_pages)
    assert held[0] == 1 and max(held) == pages_for(2 + 10 - 1, PAGE) and held[-1] == 0
    assert held == sorted(held[:-1]) + [0]  # grows a page at a time, all back at the end


def test_preemption_picks_the_newest_and_recomputes_it():
    """Three requests on a pool of 6 pages of 4 tokens: when the pages run out the newest running
    request is preempted, recomputed later from its prompt and generated tokens, and every result is
    the serial one; no text is streamed twice."""
    engine = make_engine(capacity=24, max_num_seqs=3, num_pages=6)
    params = SamplingParams(max_tokens=14)
    requests = {"old": ("a", params), "mid": ("b", params), "new": ("c", params)}
    for rid, (p, sp) in requests.items():
        engine.add_request(rid, p, sp)
    seqs = dict(engine._requests)
    finals, history = {}, {rid: [] for rid in requests}
    first_preempted = None
    while engine.has_unfinished():
        for out in engine.step():
            history[out.request_id].append(out)
            finals.update({out.request_id: out} if out.finished else {})
        if first_preempted is None and engine.scheduler.preemptions:
            first_preempted = next(rid for rid, s in seqs.items() if s.preemptions)
    assert engine.stats().preemptions >= 1 and first_preempted == "new"
    assert seqs["old"].preemptions == 0
    assert engine.stats().recomputed_tokens > 0
    for rid, (p, sp) in requests.items():
        assert (finals[rid].text, finals[rid].token_ids, finals[rid].finish_reason) == serial(p, sp)
        assert "".join(o.delta_text for o in history[rid]) == finals[rid].text


def test_decode_batch_beyond_the_backend_limit_runs_several_calls():
    engine = make_engine(max_num_seqs=6, max_decode_batch=4)
    finals, _ = run(engine, {str(i): (p, SamplingParams(max_tokens=5)) for i, p in enumerate("abcdef")})
    decode_calls = [slots for width, slots in engine.backend.calls if width == 1]
    assert max(len(s) for s in decode_calls) == 4 and [0, 1, 2, 3] in decode_calls and [4, 5] in decode_calls
    assert [finals[str(i)].text for i in range(6)] == [serial(p, SamplingParams(max_tokens=5))[0] for p in "abcdef"]


def test_the_next_step_is_queued_before_a_token_is_read():
    engine = make_engine()
    engine.add_request("r", "w", SamplingParams())
    texts = []
    while engine.has_unfinished():
        out = engine.step()
        texts.append((len(engine.backend.calls), [o.text for o in out]))
    # step 1 prefills; each later step queues a decode, then reads the previous step's token. Decode
    # 3 samples EOS, which is read (the final output) after decode 4, an extra step, was queued; the
    # last step only reads that extra step's token, and drops it.
    assert texts == [(1, []), (2, ["x"]), (3, ["xy"]), (4, ["xyz"]), (5, ["xyz"]), (5, [])]
    assert [c[0] for c in engine.backend.calls] == [2, 1, 1, 1, 1]


def test_abort_frees_slot_and_pages_and_reports_once():
    engine = make_engine(max_num_seqs=2)
    engine.add_request("a", "a", SamplingParams(max_tokens=20))
    engine.add_request("b", "b", SamplingParams(max_tokens=3))
    for _ in range(3):
        engine.step()
    engine.abort_request("a")
    assert engine.stats().running == 2  # the snapshot is taken after each step
    outs = engine.step()
    assert [(o.request_id, o.finished, o.finish_reason) for o in outs if o.request_id == "a"] == [("a", True, "abort")]
    while engine.has_unfinished():
        assert all(o.request_id != "a" for o in engine.step())
    engine.abort_request("a")  # finished or unknown: ignored
    assert engine.cache.free_pages == engine.cache.num_pages and not engine.has_unfinished()


def test_a_pool_smaller_than_one_sequence_is_refused():
    with pytest.raises(ValueError, match="num_pages: 5 free KV pages"):
        make_engine(capacity=24, num_pages=5)


def test_requests_that_can_never_run_are_refused_and_the_engine_goes_on():
    engine = make_engine(capacity=8)
    with pytest.raises(ValueError, match=r"prompt: 7 tokens \+ max_tokens 2 exceed the capacity of 8"):
        engine.add_request("long", "abcdef", SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="prompt: empty"):
        engine.add_request("empty", [], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="prompt: token ids"):
        engine.add_request("bad", [1, VOCAB + 5], SamplingParams(max_tokens=2))
    engine.add_request("ok", "x", SamplingParams(max_tokens=5))
    with pytest.raises(ValueError, match="request_id"):
        engine.add_request("ok", "x", SamplingParams(max_tokens=5))
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert outs[-1].text == "yz" and outs[-1].finish_reason == "stop"
    assert engine.stats().generation_tokens == 3  # 'y', 'z', EOS


def test_seeded_sampling_is_the_same_alone_and_in_a_batch():
    p = SamplingParams(temperature=50.0, max_tokens=12, seed=1234, ignore_eos=True)
    alone, _ = run(make_engine(), {"s": ("a", p)})
    others = {f"o{i}": ("b", SamplingParams(temperature=30.0, max_tokens=5 + i, seed=i)) for i in range(3)}
    batched, _ = run(make_engine(max_num_seqs=4), {**others, "s": ("a", p), "g": ("c", SamplingParams(max_tokens=9))})
    assert batched["s"].token_ids == alone["s"].token_ids
    other_seed, _ = run(make_engine(), {"s": ("a", SamplingParams(temperature=50.0, max_tokens=12, seed=99,
                                                                  ignore_eos=True))})
    assert other_seed["s"].token_ids != alone["s"].token_ids


def test_unseeded_sampling_follows_the_engine_seed():
    p = SamplingParams(temperature=50.0, max_tokens=10, ignore_eos=True)
    a, b = (run(make_engine(seed=7), {"s": ("a", p)})[0]["s"].token_ids for _ in range(2))
    assert a == b


def test_sample_rows_draws_each_row_from_its_own_generator():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    hot = SamplingParams(temperature=2.0)
    rows = sample_rows(logits, [hot, SamplingParams(), hot], [torch.Generator().manual_seed(5), None,
                                                              torch.Generator().manual_seed(6)])
    assert int(rows[1]) == int(logits[1].argmax())
    assert int(rows[0]) == int(sample(logits[0:1], hot, torch.Generator().manual_seed(5)))
    assert int(rows[2]) == int(sample(logits[2:3], hot, torch.Generator().manual_seed(6)))


def test_sample_rows_gives_each_row_the_token_it_gets_alone():
    """Rows with different temperatures, top-k and top-p (and greedy rows) in one batch: each row's
    token is the one its request would draw alone from its own generator, whatever its neighbours."""
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(1)) * 3
    params = [SamplingParams(temperature=0.7, top_p=0.8), SamplingParams(),
              SamplingParams(temperature=1.5, top_k=5), SamplingParams(temperature=1.0, top_k=40, top_p=0.5),
              SamplingParams(temperature=0.7), SamplingParams(temperature=2.0, top_k=299, top_p=0.95)]
    for draw in range(20):
        seeds = [100 * draw + i for i in range(len(params))]
        rows = sample_rows(logits, params, [torch.Generator().manual_seed(s) for s in seeds])
        for i, (p, seed) in enumerate(zip(params, seeds, strict=True)):
            alone = sample(logits[i:i + 1], p, torch.Generator().manual_seed(seed))
            assert int(rows[i]) == int(alone), (draw, i, p)


def test_sample_rows_is_batched():
    """A sampled batch costs a fixed number of torch ops (GPU kernel launches) plus one noise draw
    per row, not a whole draw per row (242 ops at batch 16 with top-p before)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += not func.is_view
            return func(*args, **(kwargs or {}))

    def ops(batch: int, params: list[SamplingParams]) -> int:
        with CountOps() as count:
            sample_rows(torch.randn(batch, 1000), params, [torch.Generator().manual_seed(i) for i in range(batch)])
        return count.ops

    nucleus = SamplingParams(temperature=0.8, top_p=0.9)
    assert ops(16, [nucleus] * 16) - ops(1, [nucleus]) == 15  # the rows' noise draws
    mixed = [SamplingParams(temperature=0.5 + i / 10, top_k=i, top_p=1 - i / 40) for i in range(16)]
    assert ops(16, mixed) <= ops(1, [nucleus]) + 15 + 8  # + the per-row parameters and top-k


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    assert torch.isinf(filter_logits(logits, 2, 1.0)).tolist() == [[False, False, True, True]]
    probs = torch.softmax(logits, -1)[0]
    p = float(probs[0] + probs[1]) - 1e-4  # nucleus: the smallest prefix whose mass reaches top_p
    assert torch.isinf(filter_logits(logits, 0, p)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, 0, 0.01)).tolist() == [[False, True, True, True]]
    # Per row ([B, 1] effective values): k = V and p = inf keep every token; ties with the k-th stay.
    rows = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 2.0, 0.0], [4.0, 3.0, 2.0, 1.0]])
    kept = ~torch.isinf(filter_logits(rows, torch.tensor([[2], [2], [4]]), torch.tensor([[math.inf], [math.inf], [p]])))
    assert kept.tolist() == [[True, True, False, False], [False, True, True, False], [True, True, False, False]]
    g = torch.Generator().manual_seed(0)
    assert {int(sample(logits, SamplingParams(temperature=1.0, top_k=2), g)) for _ in range(200)} == {0, 1}


def test_sampling_draws_tokens_with_their_softmax_probabilities():
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0, float("-inf")])
    n = 40_000
    draws = sample(logits.expand(n, 5).contiguous(), SamplingParams(temperature=2.0), torch.Generator().manual_seed(3))
    freq = torch.bincount(draws, minlength=5).float() / n
    expect = torch.softmax(logits / 2.0, -1)
    # Binomial standard error of each frequency is <= 0.0025 here: 5 sigma, and -inf is never drawn.
    assert torch.all((freq - expect).abs() < 5 * (expect * (1 - expect) / n).sqrt() + 1e-9), (freq, expect)
    assert freq[4] == 0


@pytest.mark.parametrize("kwargs, name", [
    ({"temperature": -1}, "temperature"), ({"temperature": math.nan}, "temperature"), ({"top_p": 0.0}, "top_p"),
    ({"top_k": -2}, "top_k"), ({"max_tokens": 0}, "max_tokens"), ({"stop": ("",)}, "stop"),
    ({"seed": 1.5}, "seed")])
def test_sampling_params_validation(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_a_lone_stop_string_is_one_stop_string():
    assert SamplingParams(stop="ab").stop == ("ab",) and SamplingParams(stop=["a", "b"]).stop == ("a", "b")


def test_slot_allocator():
    slots = SlotAllocator(2)
    assert [slots.acquire(), slots.acquire()] == [0, 1]
    with pytest.raises(RuntimeError, match="in use"):
        slots.acquire()
    slots.release(0)
    assert slots.acquire() == 0
    with pytest.raises(ValueError, match="not in use"):
        slots.release(0) or slots.release(0)


def test_prepare_decode_runs_when_the_engine_is_built():
    class PreparingBackend(BigramBackend):
        def prepare_decode(self, cache, batch):
            self.calls.append(("prepare", batch))

    backend = PreparingBackend(max_decode_batch=4)
    LLMEngine(backend, tokenizer(), capacity=64, max_num_seqs=6)
    assert backend.calls == [("prepare", 4)]


def test_async_llm_many_streams_then_shutdown_without_drain_aborts_the_rest():
    import asyncio
    import time

    from clusterfuse.engine.async_engine import AsyncLLM

    class SlowBigram(BigramBackend):  # 2 ms a call: the long request is still running at the shutdown
        def forward(self, *args, **kw):
            time.sleep(0.002)
            return super().forward(*args, **kw)

    async def scenario():
        allm = AsyncLLM(engine=LLMEngine(SlowBigram(), tokenizer(), capacity=200, max_num_seqs=3))

        async def consume(prompt, params):
            outs = [o async for o in allm.generate(prompt, params)]
            return "".join(o.delta_text for o in outs), outs[-1]

        short = await asyncio.gather(*(consume(p, SamplingParams(max_tokens=6)) for p in "abcdefgh"))
        before = allm.stats().generation_tokens
        endless = asyncio.create_task(consume("a", SamplingParams(max_tokens=150, ignore_eos=True)))
        while allm.stats().generation_tokens < before + 20:  # let it run a while
            await asyncio.sleep(0.001)
        await allm.shutdown(drain=False)
        return short, await endless, allm.stats()

    short, (text, last), stats = asyncio.run(scenario())
    expected = [serial(p, SamplingParams(max_tokens=6))[::2] for p in "abcdefgh"]
    assert [(t, o.finish_reason) for t, o in short] == expected
    assert last.finish_reason == "abort" and last.finished and text == last.text and len(last.token_ids) < 150
    assert (stats.running, stats.waiting, stats.kv_pages_used) == (0, 0, 0)


def test_top_level_api_is_exported_lazily():
    import subprocess
    import sys

    code = ("import sys, clusterfuse; assert 'torch' not in sys.modules; "
            "from clusterfuse import LLM, AsyncLLM, SamplingParams, RequestOutput, EngineStats, LLMEngine; "
            "assert LLM.__module__ == 'clusterfuse.engine.llm' and 'LLM' in dir(clusterfuse)")
    subprocess.run([sys.executable, "-c", code], check=True)
