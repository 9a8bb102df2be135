"""`LLMEngine`: requests in, one scheduler step at a time, `RequestOutput`\\ s out.

Each `step` queues the next step's work on the backend *before* it reads the previous step's
tokens: a decode step's input ids are the previous step's sampled ids as they are on the device,
and a non-blocking copy brings those ids to the host, which handles them (EOS, stop strings, text,
outputs) while the GPU already runs the next step. So a decode step never waits for the GPU. The
price (see `scheduler`): an ending that depends on a token's value (EOS, a stop string) is seen one
step late, and that request runs one extra step whose token is dropped.

Sampling is per request: each sampled (temperature > 0) request draws from its own generator,
seeded by its ``seed`` (or from the engine's seed), so a seeded request gives the same tokens alone
or in any batch.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Sequence as Seq
from typing import Any

import torch

from clusterfuse.engine.backend_protocol import DecoderBackend
from clusterfuse.engine.outputs import EngineStats, FinishReason, RequestOutput
from clusterfuse.engine.paged_cache import pages_for
from clusterfuse.engine.sampling import SamplingParams, make_generator, sample_rows
from clusterfuse.engine.scheduler import ScheduledStep, Scheduler
from clusterfuse.engine.sequence import Sequence, Status
from clusterfuse.engine.text_stream import TextStream
from clusterfuse.reference.kv_cache import host_tensor

log = logging.getLogger("clusterfuse")


class _TokensToHost:
    """Sampled ids on their way to the host: on a GPU a non-blocking copy into pinned memory and an
    event that marks its end, elsewhere a plain copy. Each step gets its own pinned buffer (the next
    step's copy is queued before this one is read); torch's caching host allocator recycles them."""

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
        """The ids, once on the host (waits for this copy only, not for later steps)."""
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()


class _InFlight:
    """A launched step whose sampled tokens (one per sequence of ``seqs``) are not read yet."""

    def __init__(self, seqs: list[Sequence], ids: torch.Tensor) -> None:
        self.seqs = seqs
        self.tokens = _TokensToHost(ids)


class LLMEngine:
    """Continuous-batching generation over a `DecoderBackend` (see the module docstring).

    ``capacity``: prompt + generated tokens one request may hold. ``max_num_seqs``: requests running
    at once (cache slots); may exceed the backend's ``max_decode_batch`` (a decode step then makes
    several forward calls). ``num_pages``: KV pages in the pool (None: the backend's default).
    ``prefill_chunk``: prompt tokens prefilled per step (None: the backend's ``prefill_chunk``).
    ``seed``: seeds the requests that sample without a seed of their own (None: random).
    ``free_window_pages``: where every layer of the model attends within a sliding window (the
    backend's ``kv_window``), return each request's pages once they fall out of it (`scheduler`), so
    that a long generation holds O(window) pages; False keeps every page until the request ends.
    """

    def __init__(self, backend: DecoderBackend, tokenizer: Any, *, capacity: int, max_num_seqs: int = 16,
                 num_pages: int | None = None, prefill_chunk: int | None = None, eos_token_ids: Seq[int] = (),
                 seed: int | None = None, model_name: str = "model", backend_name: str = "",
                 free_window_pages: bool = True) -> None:
        if capacity < 2:
            raise ValueError(f"capacity: expected at least 2 tokens, got {capacity}")
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs: expected a positive integer, got {max_num_seqs}")
        self.backend = backend
        self.tokenizer = tokenizer
        self.capacity = capacity
        self.max_num_seqs = max_num_seqs
        self.model_name = model_name
        self.backend_name = backend_name
        self.eos_token_ids = frozenset(eos_token_ids) | frozenset(getattr(tokenizer, "eos_token_ids", ()))
        self.max_decode_batch = getattr(backend, "max_decode_batch", None) or max_num_seqs
        self.cache = backend.new_cache(max_num_seqs, capacity) if num_pages is None else \
            backend.new_cache(max_num_seqs, capacity, num_pages=num_pages)
        window = getattr(backend, "kv_window", None) if free_window_pages else None
        self.scheduler = Scheduler(self.cache, max_num_seqs=max_num_seqs, capacity=capacity,
                                   prefill_budget=prefill_chunk or backend.prefill_chunk, window=window)
        self._pages_total = self.cache.num_pages
        self._pages_reserved = self.cache.num_pages - self.cache.free_pages  # e.g. the fused scratch page
        per_seq = pages_for(capacity, self.cache.page_size)
        if self.cache.free_pages < per_seq:  # else the oldest request could not always go on: no progress
            raise ValueError(f"num_pages: {self.cache.free_pages} free KV pages of {self.cache.page_size} tokens "
                             f"cannot hold one sequence of capacity {capacity} ({per_seq} pages)")
        prepare = getattr(backend, "prepare_decode", None)
        if prepare is not None:  # capture the decode graphs now, so that no request pays for them
            prepare(self.cache, min(max_num_seqs, self.max_decode_batch))
        self._seeds = random.Random(seed) if seed is not None else None
        self._arrivals = itertools.count()
        self._requests: dict[str, Sequence] = {}  # unfinished requests by id
        self._in_flight: _InFlight | None = None
        self._aborted: list[Sequence] = []  # aborted since the last step: their final outputs are due
        self._counters = {"prompt_tokens": 0, "generation_tokens": 0, "recomputed_tokens": 0}
        self._stats = self._snapshot()

    # ------------------------------------------------------------------ requests
    def encode_prompt(self, prompt: str | Seq[int]) -> list[int]:
        """Token ids of ``prompt``: text is tokenised with the model's special tokens (e.g. BOS)."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        ids = [int(t) for t in prompt]
        vocab = getattr(self.tokenizer, "vocab_size", None)
        bad = [t for t in ids if t < 0 or (vocab is not None and t >= vocab)]
        if bad:
            raise ValueError(f"prompt: token ids {bad[:5]} outside the vocabulary [0, {vocab})")
        return ids

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation rendered with the model's chat template."""
        return self.tokenizer.encode(self.apply_chat_template(messages), add_special_tokens=False)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def check_request(self, prompt_ids: Seq[int], params: SamplingParams) -> None:
        """Raise ``ValueError`` for a request that can never run: empty, or prompt + max_tokens over
        the capacity. Touches no engine state (callable from any thread)."""
        if not prompt_ids:
            raise ValueError("prompt: empty after tokenisation")
        if len(prompt_ids) + params.max_tokens > self.capacity:
            raise ValueError(f"prompt: {len(prompt_ids)} tokens + max_tokens {params.max_tokens} exceed the capacity "
                             f"of {self.capacity} tokens per sequence")

    def add_request(self, request_id: str, prompt: str | Seq[int], params: SamplingParams | None = None) -> None:
        """Queue a request; its outputs come from later `step` calls."""
        params = params or SamplingParams()
        if request_id in self._requests:
            raise ValueError(f"request_id: {request_id!r} is already running")
        ids = self.encode_prompt(prompt)
        self.check_request(ids, params)
        generator = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else \
                self._seeds.getrandbits(63) if self._seeds is not None else None
            generator = make_generator(seed, self.backend.device)
        seq = Sequence(request_id, ids, params, next(self._arrivals), time.monotonic(), generator,
                       TextStream(self.tokenizer, params.stop, ids))
        self._requests[request_id] = seq
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> None:
        """Stop a request and free its slot and pages now; its final output (``"abort"``) comes with
        the next step. Unknown or finished requests are ignored."""
        seq = self._requests.get(request_id)
        if seq is not None:
            self._finish(seq, "abort")
            self._aborted.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self._requests or self._in_flight or self._aborted)

    def stats(self) -> EngineStats:
        """The snapshot taken after the last step (a plain read: safe from any thread)."""
        return self._stats

    # ------------------------------------------------------------------ stepping
    def step(self) -> list[RequestOutput]:
        """Queue the next step, then read the previous one: an output for every request that got a
        token or finished (aborted ones included)."""
        scheduled = self.scheduler.schedule()
        launched = self._launch(scheduled) if not scheduled.empty else None
        previous, self._in_flight = self._in_flight, launched
        touched = self._read(previous) if previous is not None else []
        touched += [s for s in self._aborted if s not in touched]
        self._aborted.clear()
        self._stats = self._snapshot()
        return [self._output(s) for s in touched]

    def _launch(self, step: ScheduledStep) -> _InFlight | None:
        """Queue ``step``'s forward calls and sampling; nothing here waits for the device."""
        parts: list[torch.Tensor] = []
        owners: list[Sequence] = []
        for i in range(0, len(step.decode), self.max_decode_batch):
            group = step.decode[i:i + self.max_decode_batch]
            ids = self._decode_inputs(group)
            logits = self.backend.forward(ids[:, None], self.cache, [s.slot for s in group], logits="last")[:, -1]
            parts.append(sample_rows(logits, [s.params for s in group], [s.generator for s in group]))
            owners += group
        for chunk in step.prefill:
            s = chunk.seq
            tokens = s.prefill_tokens()[chunk.start:chunk.end]
            ids = host_tensor(tokens, torch.long, self.backend.device).to(self.backend.device, non_blocking=True)
            logits = self.backend.forward(ids[None], self.cache, [s.slot], logits="last")[:, -1]
            # A first prefill covers exactly the prompt; after a preemption it is recomputation.
            self._counters["recomputed_tokens" if s.preemptions else "prompt_tokens"] += chunk.end - chunk.start
            if chunk.samples:
                parts.append(sample_rows(logits, [s.params], [s.generator]))
                owners.append(s)
        if not parts:
            return None
        ids = parts[0] if len(parts) == 1 else torch.cat(parts)
        for row, s in enumerate(owners):
            s.last_ids, s.last_row = ids, row
        return _InFlight(owners, ids)

    def _decode_inputs(self, group: list[Sequence]) -> torch.Tensor:
        """The decode inputs [B] on the device: each sequence's last sampled id, where it was sampled.
        In the steady state those are consecutive rows of the previous step's sampled ids: a view of them."""
        first, start = group[0].last_ids, group[0].last_row
        if all(s.last_ids is first and s.last_row == start + r for r, s in enumerate(group)):
            return first[start:start + len(group)]
        return torch.cat([s.last_ids[s.last_row:s.last_row + 1] for s in group])

    def _read(self, step: _InFlight) -> list[Sequence]:
        """Read a launched step's tokens and take them in: text, stop conditions, finishing."""
        touched: list[Sequence] = []
        for s, token in zip(step.seqs, step.tokens.tolist(), strict=True):
            if s.status is Status.FINISHED:  # ended by an earlier token: an extra step's token
                continue
            self._accept(s, token)
            touched.append(s)
        return touched

    def _accept(self, s: Sequence, token: int) -> None:
        s.read += 1
        self._counters["generation_tokens"] += 1
        if s.first_token_s is None:
            s.first_token_s = time.monotonic()
        if token in self.eos_token_ids and not s.params.ignore_eos:
            self._finish(s, "stop")
            return
        s.generated.append(token)
        if s.text.push(token):
            self._finish(s, "stop")
        elif len(s.generated) >= s.params.max_tokens or len(s.prompt_ids) + len(s.generated) >= self.capacity:
            self._finish(s, "length")

    def _finish(self, s: Sequence, reason: FinishReason) -> None:
        self.scheduler.finish(s)
        s.text.close()
        s.finish_reason = reason
        s.finished_s = time.monotonic()
        del self._requests[s.request_id]

    def _output(self, s: Sequence) -> RequestOutput:
        text = s.text.visible
        out = RequestOutput(
            request_id=s.request_id, prompt_token_ids=s.prompt_ids, text=text, delta_text=text[s.reported_chars:],
            token_ids=list(s.generated), delta_token_ids=s.generated[s.reported_tokens:],
            finished=s.status is Status.FINISHED, finish_reason=s.finish_reason, prompt_tokens=len(s.prompt_ids),
            completion_tokens=len(s.generated), arrival_s=s.arrival_s, first_token_s=s.first_token_s,
            finished_s=s.finished_s)
        s.reported_chars, s.reported_tokens = len(text), len(s.generated)
        return out

    def _snapshot(self) -> EngineStats:
        free = self.cache.free_pages
        return EngineStats(running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
                           kv_pages_used=self._pages_total - free - self._pages_reserved,
                           kv_pages_total=self._pages_total - self._pages_reserved,
                           preemptions=self.scheduler.preemptions, **self._counters)


class EngineFront:
    """What the `LLM` and `AsyncLLM` fronts show of their ``engine``: the model and its tokenizer."""

    engine: LLMEngine

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def backend(self) -> str:
        """The backend's name: reference, fused, ..."""
        return self.engine.backend_name

    @property
    def capacity(self) -> int:
        """Prompt + generated tokens one request may hold."""
        return self.engine.capacity

    def stats(self) -> EngineStats:
        """The engine's snapshot after its last step (a plain read, from any thread)."""
        return self.engine.stats()

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        """The prompt text of ``messages`` in the model's chat template."""
        return self.engine.apply_chat_template(messages)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of ``messages`` in the chat template (the template places BOS itself)."""
        return self.engine.encode_chat(messages)
