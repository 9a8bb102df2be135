"""Engine bookkeeping on the CPU: sampling, stop handling, batching, slots, cache limits.

A small deterministic backend (a bigram table over a byte vocabulary) stands in for a model
so each rule of the decode loop can be checked exactly; `test_generation_reference.py`
runs the same loop over the real reference backend.
"""

from __future__ import annotations

import pytest
import torch

from clusterfuse.engine.generate import Engine
from clusterfuse.engine.sampling import SamplingParams, filter_logits, sample
from clusterfuse.engine.slots import SlotAllocator
from clusterfuse.models.byte_tokenizer import BYTE_OFFSET, ByteTokenizer

VOCAB = 300
EOS = 2


class BigramCache:
    def __init__(self, max_batch: int) -> None:
        self.lengths = [0] * max_batch
        self.resets: list[int] = []
        self.most_rows = 0  # the most rows any slot has held

    def reset(self, slot: int) -> None:
        self.lengths[slot] = 0
        self.resets.append(slot)


class BigramBackend:
    """logits[next] = table[last token]: 'a'->'b'->'c'->... and 'z' -> EOS."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.table = torch.randn(VOCAB, VOCAB, generator=g)
        for ch in range(ord("a"), ord("z")):
            self.table[ch + BYTE_OFFSET, ch + 1 + BYTE_OFFSET] = 50.0
        self.table[ord("z") + BYTE_OFFSET, EOS] = 50.0
        self.calls: list[tuple[int, list[int]]] = []

    def new_cache(self, max_batch: int, capacity: int) -> BigramCache:
        return BigramCache(max_batch)

    def forward(self, input_ids, cache, slots=None):
        slots = list(range(input_ids.shape[0])) if slots is None else list(slots)
        self.calls.append((input_ids.shape[1], slots))
        for s in slots:
            cache.lengths[s] += input_ids.shape[1]
            cache.most_rows = max(cache.most_rows, cache.lengths[s])
        return self.table[input_ids]


def make_tokenizer() -> ByteTokenizer:
    return ByteTokenizer(VOCAB, bos_token_id=1, eos_token_ids=(EOS,))


def make_engine(capacity: int = 64, max_batch: int = 4) -> Engine:
    return Engine(BigramBackend(), make_tokenizer(), capacity=capacity, max_batch=max_batch)


def serial_generate(prompt: str, params: SamplingParams, capacity: int) -> tuple[str, list[int], str]:
    """What the engine must return for greedy decoding, written out plainly: one sequence, every
    token read before the next one is computed. Returns (text, token ids, finish reason)."""
    tok, table = make_tokenizer(), BigramBackend().table
    prompt_ids = tok.encode(prompt)
    generated: list[int] = []
    while True:
        token = int(table[(prompt_ids + generated)[-1]].argmax())
        if token == EOS:
            return tok.decode(generated), generated, "eos"
        generated.append(token)
        text = tok.decode(generated)
        for stop in params.stop:
            if stop in text:
                return text[:text.index(stop)], generated, "stop"
        if len(generated) >= params.max_tokens or len(prompt_ids) + len(generated) >= capacity:
            return text, generated, "length"


def test_greedy_follows_the_table_and_stops_on_eos():
    (res,) = make_engine().generate("w")
    assert res.text == "xyz"
    assert res.finish_reason == "eos"
    assert res.prompt_tokens == 2  # BOS + 'w'


def test_max_tokens_respected():
    (res,) = make_engine().generate("a", SamplingParams(max_tokens=5))
    assert res.text == "bcdef"
    assert len(res.token_ids) == 5
    assert res.finish_reason == "length"


def test_stop_string_stops_and_is_cut():
    (res,) = make_engine().generate("a", SamplingParams(stop=("ef",)))
    assert res.text == "bcd"
    assert res.finish_reason == "stop"


def test_streaming_callback_sees_the_final_text():
    pieces: list[str] = []
    (res,) = make_engine().generate("p", on_text=lambda i, t: pieces.append(t))
    assert "".join(pieces) == res.text == "qrstuvwxyz"


def test_batch_sequences_stop_on_their_own():
    engine = make_engine()
    res = engine.generate(["x", "a"], SamplingParams(max_tokens=8))
    assert [r.text for r in res] == ["yz", "bcdefghi"]
    assert [r.finish_reason for r in res] == ["eos", "length"]
    # prefill: one call per prompt; then decode steps shrink to the unfinished sequence. The
    # loop runs a step ahead of the host: "x" samples EOS in decode step 2, which is read only
    # after step 3 was queued, so slot 0 runs step 3 too and its token is dropped.
    calls = engine.backend.calls
    assert calls[0] == (2, [0]) and calls[1] == (2, [1])
    assert [c[1] for c in calls[2:]] == [[0, 1], [0, 1], [0, 1], [1], [1], [1], [1]]
    # slots are freed and cache rows reset afterwards
    assert engine.slots.free == engine.max_batch
    assert sorted(engine.cache.resets) == [0, 1]


# Prompts whose greedy continuations end every way: EOS ("w", "xy", "y", and "q", whose EOS is its
# 10th token), a stop string ("f" meets "kl", "w" meets "xyz", "a" meets "c"), max tokens ("a", "p"),
# the cache capacity ("mnopqrs": 8 prompt tokens, capacity 13).
ENDINGS_PROMPTS = ["w", "f", "a", "mnopqrs", "xy", "q", "p", "y"]


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=10, stop=("kl",)),
    SamplingParams(max_tokens=4, stop=("xyz", "c")),
    SamplingParams(max_tokens=1),
    SamplingParams(max_tokens=50),
])
@pytest.mark.parametrize("order", [slice(None), slice(None, None, -1), slice(2, 5)])
def test_pipelined_loop_equals_a_serial_loop_and_respects_the_limits(params, order):
    """The loop that runs a step ahead of the host gives exactly the serial loop's results; no
    sequence ever runs a step beyond its max tokens or the cache capacity, and only one that ended
    by EOS or a stop string runs one extra step."""
    capacity = 13
    prompts = ENDINGS_PROMPTS[order]
    engine = make_engine(capacity=capacity, max_batch=len(ENDINGS_PROMPTS))
    results = engine.generate(prompts, params)
    expected = [serial_generate(p, params, capacity) for p in prompts]
    assert [(r.text, r.token_ids, r.finish_reason) for r in results] == expected

    decode_calls = [slots for width, slots in engine.backend.calls if width == 1]
    for slot, (res, (_, ids, reason)) in enumerate(zip(results, expected, strict=True)):
        steps = sum(slot in slots for slots in decode_calls)
        serial_steps = len(ids) - (reason != "eos")  # every sampled token but the prefill's
        assert steps <= params.max_tokens - 1
        assert res.prompt_tokens + steps <= capacity
        assert steps - serial_steps in ((0, 1) if reason in ("eos", "stop") else (0,))
    assert engine.cache.most_rows <= capacity
    # the serial loop's step count: every step but an extra one read some sequence's token
    assert {r.decode_steps for r in results} == {max(len(ids) - (reason != "eos") for _, ids, reason in expected)}
    assert engine.slots.free == engine.max_batch


def test_serial_reference_meets_every_ending():
    params = SamplingParams(max_tokens=10, stop=("kl",))
    assert [serial_generate(p, params, capacity=13)[::2] for p in ENDINGS_PROMPTS] == [
        ("xyz", "eos"), ("ghij", "stop"), ("bcdefghijk", "length"), ("tuvwx", "length"),  # max tokens, capacity
        ("z", "eos"), ("rstuvwxyz", "eos"), ("qrstuvwxyz", "length"), ("z", "eos")]


def test_the_next_step_is_queued_before_a_token_is_handled():
    engine = make_engine()
    queued: list[int] = []  # backend calls made when each piece of text reached the callback
    (res,) = engine.generate("a", SamplingParams(max_tokens=5), on_text=lambda i, t: queued.append(
        len(engine.backend.calls)))
    assert res.text == "bcdef" and res.decode_steps == 4
    # the prefill's token 'b' arrives once decode step 1 is queued, and so on; 'f', the 5th token,
    # ends the sequence at max tokens, so no step follows it
    assert queued == [2, 3, 4, 5, 5]


def test_an_extra_step_after_eos_is_neither_counted_nor_kept():
    engine = make_engine()
    (res,) = engine.generate("w")
    assert res.text == "xyz" and res.token_ids == [ord(c) + BYTE_OFFSET for c in "xyz"]
    # decode steps sample 'y', 'z', EOS, then one more ran before the EOS was read
    assert [c[1] for c in engine.backend.calls] == [[0]] * 5
    assert res.decode_steps == 3
    assert engine.cache.resets == [0]


def test_seeded_sampling_is_reproducible_when_a_sequence_ends_early():
    """With sampling, a batch where one sequence ends by EOS first (so an extra step draws random
    numbers for it) still gives the same tokens for the same seed."""
    engine = make_engine()
    p = SamplingParams(temperature=1.0, max_tokens=12, seed=5)
    runs = [[r.token_ids for r in engine.generate(["x", "a"], p)] for _ in range(2)]
    assert runs[0] == runs[1]
    assert runs[0][0] == [ord("y") + BYTE_OFFSET, ord("z") + BYTE_OFFSET]


def test_seeded_sampling_is_reproducible_and_seed_matters():
    engine = make_engine()
    p = SamplingParams(temperature=50.0, max_tokens=20, seed=1234, ignore_eos=True)
    a = engine.generate("a", p)[0].token_ids
    b = engine.generate("a", p)[0].token_ids
    c = engine.generate("a", SamplingParams(temperature=50.0, max_tokens=20, seed=99, ignore_eos=True))[0].token_ids
    assert a == b
    assert a != c


def test_cache_capacity_ends_generation_and_rejects_long_prompts():
    engine = make_engine(capacity=6)
    (res,) = engine.generate("a", SamplingParams(max_tokens=50))
    assert res.finish_reason == "length" and res.prompt_tokens + len(res.token_ids) == 6
    with pytest.raises(ValueError, match=r"prompts\[0\]: 7 tokens do not fit the KV cache"):
        engine.generate("abcdef")
    # the engine keeps serving after the error
    assert engine.generate("x")[0].text == "yz"


def test_too_many_prompts_is_an_error():
    with pytest.raises(ValueError, match="max_batch"):
        make_engine(max_batch=2).generate(["a", "b", "c"])


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    assert torch.isinf(filter_logits(logits, 2, 1.0)).tolist() == [[False, False, True, True]]
    probs = torch.softmax(logits, -1)[0]
    # nucleus: keep the smallest prefix whose mass reaches top_p
    p = float(probs[0] + probs[1]) - 1e-4
    assert torch.isinf(filter_logits(logits, 0, p)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, 0, 0.01)).tolist() == [[False, True, True, True]]
    g = torch.Generator().manual_seed(0)
    draws = {int(sample(logits, SamplingParams(temperature=1.0, top_k=2), g)) for _ in range(200)}
    assert draws == {0, 1}


def test_sampling_draws_tokens_with_their_softmax_probabilities():
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0, float("-inf")])
    n = 40_000
    draws = sample(logits.expand(n, 5).contiguous(), SamplingParams(temperature=2.0), torch.Generator().manual_seed(3))
    freq = torch.bincount(draws, minlength=5).float() / n
    expect = torch.softmax(logits / 2.0, -1)
    # Binomial standard error of each frequency is <= 0.0025 here: 5 sigma, and -inf is never drawn.
    assert torch.all((freq - expect).abs() < 5 * (expect * (1 - expect) / n).sqrt() + 1e-9), (freq, expect)
    assert freq[4] == 0


@pytest.mark.parametrize("kwargs, name", [({"temperature": -1}, "temperature"), ({"top_p": 0.0}, "top_p"),
                                          ({"top_k": -2}, "top_k"), ({"max_tokens": 0}, "max_tokens")])
def test_sampling_params_validation(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_slot_allocator():
    slots = SlotAllocator(2)
    assert [slots.acquire(), slots.acquire()] == [0, 1]
    with pytest.raises(RuntimeError, match="in use"):
        slots.acquire()
    slots.release(0)
    assert slots.acquire() == 0
    with pytest.raises(ValueError, match="not in use"):
        slots.release(0) or slots.release(0)


def test_prepare_decode_runs_before_the_timed_decode_loop():
    class PreparingBackend(BigramBackend):
        def prepare_decode(self, cache, batch):
            self.calls.append(("prepare", batch))

    tok = ByteTokenizer(VOCAB, bos_token_id=1, eos_token_ids=(EOS,))
    backend = PreparingBackend()
    Engine(backend, tok, capacity=64, max_batch=4).generate(["a", "b"], SamplingParams(max_tokens=3))
    kinds = [c[0] for c in backend.calls]
    first_decode = next(i for i, c in enumerate(backend.calls) if c[0] == 1)
    assert kinds.index("prepare") < first_decode  # after the prefills, before the first decode step
    assert backend.calls[kinds.index("prepare")] == ("prepare", 2)
    assert all(isinstance(c[0], int) and c[0] > 1 for c in backend.calls[:kinds.index("prepare")])
