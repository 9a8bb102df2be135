"""The engine over the real reference backend with the embedded SmolLM2-135M on the CPU:
continuous batching gives each request what it gets alone, preemption under a tiny page pool
changes nothing, seeds hold in a batch, `AsyncLLM` streams, aborts and drains, and the `LLM` API
and the CLI's chat history rules. Prompts are short and outputs a few tokens (CPU time)."""

from __future__ import annotations

import asyncio

import pytest

from clusterfuse.cli import commands
from clusterfuse.cli.main import main
from clusterfuse.engine.async_engine import AsyncLLM
from clusterfuse.engine.llm import LLM
from clusterfuse.engine.llm_engine import LLMEngine
from clusterfuse.engine.reference_backend import ReferenceBackend
from clusterfuse.engine.sampling import SamplingParams

PROMPTS = ["Hello, my name is", "The capital of France is", "1, 2, 3,", "def add(a, b):", "Once upon a time",
           "The sky is", "Water boils at", "My favourite food is", "In 1492,", "The cat sat on the",
           "Roses are red,", "To be or not to be,", "The quick brown fox", "Python is a", "I like to", "Dear Sir,"]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(None, device="cpu", dtype="fp32", backend="reference", capacity=64, max_num_seqs=16, progress=False)


def engine_like(llm: LLM, **kw) -> LLMEngine:
    """Another engine over the same model (own cache and scheduler)."""
    kw.setdefault("capacity", 64)
    return LLMEngine(llm.engine.backend, llm.tokenizer, eos_token_ids=llm.engine.eos_token_ids, **kw)


def run(engine: LLMEngine, requests: dict[str, tuple[str, SamplingParams]]) -> dict:
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    finals, streamed = {}, {rid: "" for rid in requests}
    while engine.has_unfinished():
        for out in engine.step():
            streamed[out.request_id] += out.delta_text
            if out.finished:
                finals[out.request_id] = out
    assert all(streamed[rid] == finals[rid].text for rid in requests)
    return finals


def mixed_requests() -> dict[str, tuple[str, SamplingParams]]:
    """16 requests: different prompts, lengths, stop strings; three sample with their own seeds."""
    out = {}
    for i, prompt in enumerate(PROMPTS):
        if i % 5 == 4:
            params = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, seed=100 + i, max_tokens=5, ignore_eos=True)
        else:
            params = SamplingParams(max_tokens=3 + i % 4, stop=("\n",) if i % 3 == 0 else (), ignore_eos=i % 2 == 0)
        out[f"r{i}"] = (prompt, params)
    return out


@pytest.fixture(scope="module")
def alone(llm) -> dict:
    """Each request of `mixed_requests` run on its own."""
    engine = engine_like(llm, max_num_seqs=1)
    return {rid: run(engine, {rid: req})[rid] for rid, req in mixed_requests().items()}


def test_16_concurrent_requests_each_equal_the_request_alone(llm, alone):
    """All 16 at once, their prompts prefilled in chunks of 8 tokens (so prompts are split unlike
    when alone): greedy and seeded results equal those of the request run alone."""
    batched = run(engine_like(llm, max_num_seqs=16, prefill_chunk=8), mixed_requests())
    for rid, out in alone.items():
        assert (batched[rid].token_ids, batched[rid].text, batched[rid].finish_reason) == \
            (out.token_ids, out.text, out.finish_reason), rid


def test_a_tiny_page_pool_preempts_and_still_gives_every_request_its_text(llm):
    """8 requests of up to 18 rows on 8 pages of 4 tokens (the least for capacity 32): requests are
    preempted and recomputed, and each still gets exactly the text it gets with a roomy pool (which
    the test above ties to the request alone)."""
    requests = {f"r{i}": (p, SamplingParams(max_tokens=10, ignore_eos=True)) for i, p in enumerate(PROMPTS[:8])}
    roomy = run(engine_like(llm, max_num_seqs=8), requests)
    backend = ReferenceBackend(llm.engine.backend.model, page_size=4)
    engine = LLMEngine(backend, llm.tokenizer, eos_token_ids=llm.engine.eos_token_ids, capacity=32, max_num_seqs=8,
                       num_pages=8)
    tight = run(engine, requests)
    assert engine.stats().preemptions > 0 and engine.stats().recomputed_tokens > 0
    for rid in requests:
        assert (tight[rid].token_ids, tight[rid].text) == (roomy[rid].token_ids, roomy[rid].text), rid
    assert engine.stats().kv_pages_used == 0


def test_llm_generate_stream_and_chat(llm):
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    (final,) = llm.generate(["The capital of France is"], params)
    pieces = list(llm.stream("The capital of France is", params))
    assert "".join(p.delta_text for p in pieces) == final.text and pieces[-1].token_ids == final.token_ids
    assert pieces[-1].finished and not any(p.finished for p in pieces[:-1])
    stream = llm.stream("Once upon a time", SamplingParams(max_tokens=20, ignore_eos=True))
    next(stream)
    stream.close()  # early close: the request is aborted, its pages freed
    llm.engine.step()
    assert llm.engine.stats().kv_pages_used == 0 and not llm.engine.has_unfinished()
    reply = llm.chat([{"role": "user", "content": "What is the capital of France?"}], SamplingParams(max_tokens=16))
    assert "Paris" in reply.text
    with pytest.raises(ValueError, match="prompts\\[1\\]: empty after tokenisation"):
        llm.generate(["ok", ""], params)


def test_async_llm_streams_aborts_on_close_and_drains(llm):
    async def scenario():
        engine = engine_like(llm, max_num_seqs=4)
        allm = AsyncLLM(engine=engine)
        with pytest.raises(ValueError, match="exceed the capacity"):
            await allm.generate("word " * 80, SamplingParams(max_tokens=8)).__anext__()

        async def consume(prompt, params, stop_after=None):
            text, n = "", 0
            it = allm.generate(prompt, params)
            async for out in it:
                text += out.delta_text
                n += 1
                if stop_after is not None and n == stop_after:
                    await it.aclose()  # a client that disconnects
                    return None
            return text

        full = asyncio.create_task(consume("Hello, my name is", SamplingParams(max_tokens=6, ignore_eos=True)))
        dropped = asyncio.create_task(consume("Once upon a time", SamplingParams(max_tokens=30, ignore_eos=True), 2))
        text, gone = await asyncio.gather(full, dropped)
        for _ in range(100):  # the abort reaches the engine thread at its next command
            if allm.stats().running == 0:
                break
            await asyncio.sleep(0.05)
        stats = allm.stats()
        assert (stats.running, stats.kv_pages_used) == (0, 0) and gone is None
        assert stats.generation_tokens < 6 + 30
        last = asyncio.create_task(consume("The sky is", SamplingParams(max_tokens=4, ignore_eos=True)))
        await asyncio.sleep(0)
        await allm.shutdown(drain=True)
        with pytest.raises(RuntimeError, match="shutting down"):
            await allm.generate("x").__anext__()
        return text, await last

    text, last = asyncio.run(scenario())
    expected = llm.generate(["Hello, my name is", "The sky is"], [SamplingParams(max_tokens=6, ignore_eos=True),
                                                                  SamplingParams(max_tokens=4, ignore_eos=True)])
    assert [text, last] == [e.text for e in expected]


def test_chat_history_is_trimmed_by_whole_turns_and_a_long_message_is_refused(llm, capsys):
    """Issue 39: the history drops the oldest user/assistant pair until the conversation fits, so it
    never starts with an assistant turn; a message that cannot fit even alone is refused with one line."""
    turns = [(f"q{i}", f"a{i}") for i in range(4)]
    last_two = [{"role": r, "content": f"{c}{i}"} for i in (2, 3) for r, c in (("user", "q"), ("assistant", "a"))]
    room = llm.capacity - len(llm.encode_chat([*last_two, {"role": "user", "content": "and now?"}]))
    ids = commands._fit_history(llm, [], turns, "and now?", max_tokens=room)
    assert turns == [("q2", "a2"), ("q3", "a3")] and len(ids) + room == llm.capacity  # two whole pairs dropped
    assert commands._fit_history(llm, [], [], "word " * 80, max_tokens=16) is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "message not sent" in err and "capacity of 64" in err


def test_cli_does_not_echo_a_prompt_that_cannot_fit(capsys):
    assert main(["generate", "word " * 80, "--capacity", "64", "--device", "cpu", "-n", "8", "--quiet"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "exceed the capacity of 64" in captured.err


def test_capacity_beyond_the_models_context_is_refused(capsys):
    """SmolLM2 was trained on 8192 positions: a larger --capacity is one error line, exit 2."""
    assert main(["generate", "hi", "--capacity", "8193", "--device", "cpu", "-n", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "capacity: 8193 tokens exceed the model's context of 8192" in err


def test_report_counts_generated_tokens_only(llm, capsys):
    outs = llm.generate(["Hello", "1, 2, 3,"], SamplingParams(max_tokens=5, ignore_eos=True))
    commands._report(outs, llm)
    err = capsys.readouterr().err
    decoded = sum(o.completion_tokens - 1 for o in outs)
    span = max(o.finished_s for o in outs) - min(o.first_token_s for o in outs)
    assert f"{sum(o.prompt_tokens for o in outs)} tokens, first token" in err
    assert f"10 tokens generated, {decoded / span:.1f} tokens/s, {1e3 * span / decoded:.1f} ms per output token" in err
