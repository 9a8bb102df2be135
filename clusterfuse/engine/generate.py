"""Text generation: prefill, a decode loop over a batch of sequences, stop handling, streaming.

The engine drives any backend that implements the small `DecoderBackend` protocol
(``new_cache`` and ``forward``); the reference backend is one, the fused GPU backend
another.  Sequences of a batch may have prompts of different lengths: each is
prefilled into its own cache slot, then all unfinished ones decode together, one
token per step, and each stops on its own (EOS, a stop string, or max tokens).

The decode loop runs one step ahead of the host.  A step's sampled ids stay on the device
and are the next step's input; a non-blocking copy brings them to the host, which handles
them (EOS, stop strings, streaming) while the next step already runs.  So the next step's
sequences are chosen before this step's tokens are read: limits that are counts (max tokens,
cache capacity) are known ahead and never overrun, but an ending that depends on a token
(EOS, a stop string) is seen one step late, and that sequence runs one extra step whose token
is dropped.  Greedy results are the same as those of a loop that reads every token before the
next step (for sampling, see `Engine._launch`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from clusterfuse.engine.sampling import SamplingParams, make_generator, sample
from clusterfuse.engine.slots import SlotAllocator
from clusterfuse.models.byte_tokenizer import ByteTokenizer
from clusterfuse.models.tokenizer import StreamDecoder, Tokenizer
from clusterfuse.reference.kv_cache import host_tensor

#: Called with (index of the sequence in the batch, newly decoded text).
TextCallback = Callable[[int, str], None]


class DecoderBackend(Protocol):
    """What the engine needs from a model backend."""

    device: torch.device

    def new_cache(self, max_batch: int, capacity: int) -> Any: ...

    def forward(self, input_ids: torch.Tensor, cache: Any, slots: Sequence[int] | None = None) -> torch.Tensor:
        """Append ``input_ids`` [B, T] to the cache rows ``slots``; return fp32 logits [B, T, V].

        A decode step (T == 1) gets the previous step's sampled ids as they are on the device,
        before the host has read them: reading them on the host would stall the loop."""
        ...

    # Optional: ``prepare_decode(cache, batch)`` does one-time work for decoding up to ``batch``
    # sequences (the fused backend captures its CUDA graphs); the engine calls it before the
    # decode loop so that the reported time per output token is the steady state.


@dataclass
class GenerationResult:
    """One sequence's output and timings."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "eos", "stop" (a stop string), or "length"
    prompt_tokens: int
    #: From the start of the sequence's prefill until its first token is on the host.
    prefill_s: float = 0.0
    #: Wall time of the batch's decode loop: from the first decode step's launch until the tokens of
    #: the last counted step are on the host.
    decode_s: float = 0.0
    #: Decode steps of the batch whose tokens were used: a step that ran only sequences already
    #: ended (an extra step, see the module docstring) is neither counted nor waited for, so the
    #: count, and ``tpot_ms``, are those of a loop without the extra steps.
    decode_steps: int = 0

    @property
    def tpot_ms(self) -> float:
        """Time per output token during decoding, in milliseconds."""
        return 1e3 * self.decode_s / self.decode_steps if self.decode_steps else float("nan")

    @property
    def tokens_per_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s > 0 else float("nan")


@dataclass
class _Sequence:
    """Decoding state of one sequence of the batch."""

    index: int
    slot: int
    prompt_ids: list[int]
    stream: StreamDecoder
    generated: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    sampled: int = 0  # tokens sampled for it so far, read or still on their way to the host


class _TokensToHost:
    """Sampled ids on their way to the host: on a GPU a non-blocking copy into pinned memory and
    an event that marks its end, elsewhere a plain copy.

    Each step gets its own pinned buffer: the next step's copy is queued before this one is read,
    so a shared buffer could be overwritten first.  torch's caching host allocator recycles them.
    """

    def __init__(self, ids: torch.Tensor) -> None:
        self._event: torch.cuda.Event | None = None
        if ids.is_cuda:
            self._host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
            self._host.copy_(ids, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = ids.cpu()

    def tolist(self) -> list[int]:
        """The ids, once they are on the host (waits for this copy only, not for later steps)."""
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()


@dataclass
class _Step:
    """A step queued on the backend: its sequences in row order, their sampled ids [B] on the
    device (the next step's input) and the same ids on their way to the host."""

    seqs: list[_Sequence]
    ids: torch.Tensor
    tokens: _TokensToHost


class Engine:
    """Generates text from a tokenizer and a backend, one batch of prompts at a time."""

    def __init__(self, backend: DecoderBackend, tokenizer: Tokenizer | ByteTokenizer, *,
                 eos_token_ids: Sequence[int] = (),
                 capacity: int, max_batch: int = 16) -> None:
        if capacity < 2:
            raise ValueError(f"capacity: expected at least 2 tokens, got {capacity}")
        self.backend = backend
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids) | frozenset(tokenizer.eos_token_ids)
        self.capacity = capacity
        self.max_batch = max_batch
        self.cache = backend.new_cache(max_batch, capacity)
        self.slots = SlotAllocator(max_batch)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation rendered with the model's chat template."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def generate(self, prompts: str | Sequence[str], params: SamplingParams | None = None, *,
                 on_text: TextCallback | None = None) -> list[GenerationResult]:
        """Generate a continuation of each prompt (plain text, tokenised with special tokens)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        return self.generate_ids([self.tokenizer.encode(p) for p in prompts], params, on_text=on_text)

    def generate_ids(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams | None = None, *,
                     on_text: TextCallback | None = None) -> list[GenerationResult]:
        """Generate from already tokenised prompts; the core loop under `generate` and chat."""
        params = params or SamplingParams()
        if not prompt_ids:
            raise ValueError("prompts: expected at least one prompt")
        if len(prompt_ids) > self.max_batch:
            raise ValueError(f"prompts: {len(prompt_ids)} prompts exceed the engine's max_batch {self.max_batch}")
        for i, ids in enumerate(prompt_ids):
            if not ids:
                raise ValueError(f"prompts[{i}]: empty after tokenisation")
            if len(ids) >= self.capacity:
                raise ValueError(f"prompts[{i}]: {len(ids)} tokens do not fit the KV cache "
                                 f"(capacity {self.capacity} tokens, one more needed for decoding)")
        generator = make_generator(params.seed, self.backend.device)
        seqs = [_Sequence(i, self.slots.acquire(), list(ids), StreamDecoder(self.tokenizer))
                for i, ids in enumerate(prompt_ids)]
        try:
            return self._run(seqs, params, generator, on_text)
        finally:
            for s in seqs:
                self.slots.release(s.slot)
                self.cache.reset(s.slot)

    # ------------------------------------------------------------------ internals
    def _run(self, seqs: list[_Sequence], params: SamplingParams, generator: torch.Generator,
             on_text: TextCallback | None) -> list[GenerationResult]:
        prefill_s = [0.0] * len(seqs)
        first_ids: list[torch.Tensor] = []  # each prefill's sampled token [1], on the device
        first_tokens: list[torch.Tensor] = []  # the same on the host
        for s in seqs:
            t0 = time.perf_counter()
            ids = torch.tensor([s.prompt_ids], dtype=torch.long, device=self.backend.device)
            logits = self.backend.forward(ids, self.cache, [s.slot])[:, -1]
            first_ids.append(sample(logits, params, generator))
            first_tokens.append(first_ids[-1].cpu())  # waits: the prefill's time includes its first token
            s.sampled = 1
            prefill_s[s.index] = time.perf_counter() - t0
        # The prefills' tokens as "step 0": the first decode step reads its input ids on the device.
        prefilled = _Step(list(seqs), torch.cat(first_ids), _TokensToHost(torch.cat(first_tokens)))

        prepare = getattr(self.backend, "prepare_decode", None)
        if prepare is not None:
            prepare(self.cache, len(seqs))
        decode_s = 0.0
        steps = 0
        step: _Step | None = prefilled
        t0 = time.perf_counter()
        while step is not None:
            following = self._launch(step, params, generator)  # queued before this step's tokens are read
            if any(s.finish_reason is None for s in step.seqs):  # else nobody needs its tokens
                tokens = step.tokens.tolist()
                if step is not prefilled:
                    decode_s = time.perf_counter() - t0
                    steps += 1
                for s, token in zip(step.seqs, tokens, strict=True):
                    if s.finish_reason is None:  # else it ended one step earlier: an extra step's token
                        self._accept(s, token, params, on_text)
            step = following

        for s in seqs:
            if s.finish_reason != "stop":  # a stop string already cut the text
                tail = s.stream.flush()
                s.text += tail
                if tail and on_text is not None:
                    on_text(s.index, tail)
        return [GenerationResult(text=s.text, token_ids=s.generated, finish_reason=s.finish_reason or "length",
                                 prompt_tokens=len(s.prompt_ids), prefill_s=prefill_s[s.index],
                                 decode_s=decode_s, decode_steps=steps)
                for s in seqs]

    def _launch(self, step: _Step, params: SamplingParams, generator: torch.Generator) -> _Step | None:
        """Queue the decode step after ``step`` for its sequences that go on, before ``step``'s tokens
        are read: those not ended by any token read so far and below their count limits.  None when
        no sequence goes on.

        With sampling (temperature > 0), an extra step also draws random numbers for a sequence that
        has already ended, so in a batch where one sequence ends by EOS or a stop string before the
        others, the others' later tokens may differ from those of a loop without extra steps; the
        same seed still gives the same tokens on every run."""
        rows = [i for i, s in enumerate(step.seqs)
                if s.finish_reason is None and self._below_limits(s, s.sampled, params)]
        if not rows:
            return None
        seqs = [step.seqs[i] for i in rows]
        ids = step.ids
        if len(rows) < len(step.seqs):  # the batch shrinks: pick the survivors' ids on the device
            ids = ids[host_tensor(rows, torch.long, ids.device).to(ids.device, non_blocking=True)]
        logits = self.backend.forward(ids[:, None], self.cache, [s.slot for s in seqs])[:, -1]
        sampled = sample(logits, params, generator)
        for s in seqs:
            s.sampled += 1
        return _Step(seqs, sampled, _TokensToHost(sampled))

    def _below_limits(self, s: _Sequence, tokens: int, params: SamplingParams) -> bool:
        """Whether a sequence that has ``tokens`` generated tokens may have another: it has fewer than
        ``max_tokens``, and its prompt and generated tokens stay below the KV cache's capacity."""
        return tokens < params.max_tokens and len(s.prompt_ids) + tokens < self.capacity

    def _accept(self, s: _Sequence, token: int, params: SamplingParams, on_text: TextCallback | None) -> None:
        """Record a sampled token and decide whether the sequence is finished."""
        if token in self.eos_token_ids and not params.ignore_eos:
            s.finish_reason = "eos"
            return
        s.generated.append(token)
        delta = s.stream.push(token)
        new_text = s.text + delta
        for stop in params.stop:
            cut = new_text.find(stop, max(0, len(s.text) - len(stop)))
            if cut >= 0:
                delta = new_text[len(s.text):cut] if cut > len(s.text) else ""
                new_text = new_text[:cut]
                s.finish_reason = "stop"
                break
        s.text = new_text
        if delta and on_text is not None:
            on_text(s.index, delta)
        if s.finish_reason is None and not self._below_limits(s, len(s.generated), params):
            s.finish_reason = "length"  # max tokens, or the KV cache is full
