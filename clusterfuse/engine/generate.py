"""Text generation: prefill, a decode loop over a batch of sequences, stop handling, streaming.

The engine drives any backend that implements the small `DecoderBackend` protocol
(``new_cache`` and ``forward``); the reference backend is one, the fused GPU backend
another.  Sequences of a batch may have prompts of different lengths: each is
prefilled into its own cache slot, then all unfinished ones decode together, one
token per step, and each stops on its own (EOS, a stop string, or max tokens).
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

#: Called with (index of the sequence in the batch, newly decoded text).
TextCallback = Callable[[int, str], None]


class DecoderBackend(Protocol):
    """What the engine needs from a model backend."""

    device: torch.device

    def new_cache(self, max_batch: int, capacity: int) -> Any: ...

    def forward(self, input_ids: torch.Tensor, cache: Any, slots: Sequence[int] | None = None) -> torch.Tensor:
        """Append ``input_ids`` [B, T] to the cache rows ``slots``; return fp32 logits [B, T, V]."""
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
    prefill_s: float = 0.0
    decode_s: float = 0.0
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
        next_ids: dict[int, int] = {}
        for s in seqs:
            t0 = time.perf_counter()
            ids = torch.tensor([s.prompt_ids], dtype=torch.long, device=self.backend.device)
            logits = self.backend.forward(ids, self.cache, [s.slot])[:, -1]
            next_ids[s.index] = int(sample(logits, params, generator)[0])
            prefill_s[s.index] = time.perf_counter() - t0

        prepare = getattr(self.backend, "prepare_decode", None)
        if prepare is not None:
            prepare(self.cache, len(seqs))
        decode_s = 0.0
        steps = 0
        active = list(seqs)
        while True:
            for s in active:
                self._accept(s, next_ids[s.index], params, on_text)
            active = [s for s in active if s.finish_reason is None]
            if not active:
                break
            t0 = time.perf_counter()
            ids = torch.tensor([[s.generated[-1]] for s in active], dtype=torch.long, device=self.backend.device)
            logits = self.backend.forward(ids, self.cache, [s.slot for s in active])[:, -1]
            sampled = sample(logits, params, generator).tolist()
            decode_s += time.perf_counter() - t0
            steps += 1
            next_ids = {s.index: tok for s, tok in zip(active, sampled, strict=True)}

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
        if s.finish_reason is None:
            if len(s.generated) >= params.max_tokens:
                s.finish_reason = "length"
            elif len(s.prompt_ids) + len(s.generated) >= self.capacity:
                s.finish_reason = "length"  # the KV cache is full
