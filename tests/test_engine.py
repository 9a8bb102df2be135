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
        return self.table[input_ids]


def make_engine(capacity: int = 64, max_batch: int = 4) -> Engine:
    tok = ByteTokenizer(VOCAB, bos_token_id=1, eos_token_ids=(EOS,))
    return Engine(BigramBackend(), tok, capacity=capacity, max_batch=max_batch)


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
    # prefill: one call per prompt; then decode steps shrink to the unfinished sequence
    calls = engine.backend.calls
    assert calls[0] == (2, [0]) and calls[1] == (2, [1])
    assert [c[1] for c in calls[2:]] == [[0, 1], [0, 1], [1], [1], [1], [1], [1]]
    # slots are freed and cache rows reset afterwards
    assert engine.slots.free == engine.max_batch
    assert sorted(engine.cache.resets) == [0, 1]


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
