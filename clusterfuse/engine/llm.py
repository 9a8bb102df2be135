"""`LLM`: the synchronous Python API (``from clusterfuse import LLM, SamplingParams``).

    llm = LLM()                                   # the embedded SmolLM2-135M-Instruct
    out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=16))[0]
    print(out.text, out.finish_reason)
    for piece in llm.stream("Once upon a time"):  # RequestOutputs; print each delta_text
        print(piece.delta_text, end="", flush=True)
    print(llm.chat([{"role": "user", "content": "Hi!"}]).text)

Every call runs requests through the same continuous-batching `LLMEngine` in the caller's
thread: ``generate`` with several prompts batches them (up to ``max_num_seqs`` at once, more
wait their turn). For an asyncio server use `AsyncLLM`.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator, Sequence

from clusterfuse.engine.llm_engine import EngineFront, LLMEngine
from clusterfuse.engine.outputs import RequestOutput
from clusterfuse.engine.runtime import Runtime, open_runtime
from clusterfuse.engine.sampling import SamplingParams

Prompt = str | Sequence[int]


class LLM(EngineFront):
    """A loaded model and its engine. ``model``: None (the embedded SmolLM2), a preset name (random
    weights), a Hugging Face directory or a ``.gguf`` file; ``backend``: auto, fused, torch or reference;
    ``capacity``: prompt + generated tokens per request; ``max_num_seqs``: requests run at once;
    ``num_pages``: KV pages in the pool (default: sized to memory); ``seed``: random preset weights,
    and the sampling of requests without a seed of their own. ``engine``: use an existing `LLMEngine`
    instead of opening ``model``."""

    def __init__(self, model: str | None = None, *, device: str = "auto", dtype: str = "auto", backend: str = "auto",
                 capacity: int | None = None, max_num_seqs: int = 16, num_pages: int | None = None,
                 seed: int | None = None, progress: bool = True, engine: LLMEngine | None = None) -> None:
        #: How the model was opened (None when built around an existing ``engine``).
        self.runtime: Runtime | None = None
        if engine is None:
            self.runtime = open_runtime(model, device=device, dtype=dtype, backend=backend, capacity=capacity,
                                        max_num_seqs=max_num_seqs, num_pages=num_pages, seed=seed, progress=progress)
            engine = self.runtime.engine
        self.engine: LLMEngine = engine
        self.progress = progress
        self._ids = itertools.count()
        self._pending: dict[str, deque[RequestOutput]] = {}  # outputs not yet taken, by request

    # ------------------------------------------------------------------ API
    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """The final output of each prompt (text, or token ids), in order; ``params`` is one for all
        or one per prompt. Every prompt is checked before any runs."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise ValueError("prompts: expected at least one prompt")
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"params: expected one SamplingParams per prompt ({len(prompts)}), got {len(params)}")
        encoded = []
        for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
            ids = self.engine.encode_prompt(p)
            try:
                self.engine.check_request(ids, sp)
            except ValueError as e:
                if len(prompts) == 1:
                    raise
                raise ValueError(f"prompts[{i}]: {str(e).removeprefix('prompt: ')}") from None
            encoded.append(ids)
        rids = [self._add(ids, sp) for ids, sp in zip(encoded, params, strict=True)]
        bar = _progress_bar(len(rids)) if self.progress and len(rids) > 1 else None
        try:
            finals = {}
            while len(finals) < len(rids):
                for rid in rids:
                    if rid in finals:
                        continue
                    for out in self._take(rid):
                        if out.finished:
                            finals[rid] = out
                            if bar is not None:
                                bar.update(1)
                if len(finals) < len(rids):
                    self._step()
        finally:
            if bar is not None:
                bar.close()
            for rid in rids:
                if rid not in finals:
                    self._abort(rid)
        return [finals[rid] for rid in rids]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """The outputs of one request as they come (print each ``delta_text``); closing the iterator
        early aborts the request and frees its pages. A request that can never run raises
        ``ValueError`` here, before anything is queued."""
        ids = self.engine.encode_prompt(prompt)
        params = params or SamplingParams()
        self.engine.check_request(ids, params)
        return self._stream(self._add(ids, params))

    def _stream(self, rid: str) -> Iterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                for out in self._take(rid):
                    finished = out.finished
                    yield out
                if not finished:
                    self._step()
        finally:
            if not finished:
                self._abort(rid)

    def chat(self, messages: list[dict[str, str]], params: SamplingParams | None = None) -> RequestOutput:
        """The assistant's reply to ``messages`` (``[{"role": ..., "content": ...}]``), rendered with the
        model's chat template."""
        return self.generate([self.encode_chat(messages)], params)[0]

    # ------------------------------------------------------------------ plumbing
    def _add(self, ids: list[int], params: SamplingParams) -> str:
        rid = f"llm-{next(self._ids)}"
        self.engine.add_request(rid, ids, params)
        self._pending[rid] = deque()
        return rid

    def _take(self, rid: str) -> list[RequestOutput]:
        queue = self._pending[rid]
        outs = list(queue)
        queue.clear()
        if outs and outs[-1].finished:
            del self._pending[rid]
        return outs

    def _step(self) -> None:
        """One engine step; its outputs go to their requests' queues (several streams may interleave)."""
        for out in self.engine.step():
            if out.request_id in self._pending:
                self._pending[out.request_id].append(out)

    def _abort(self, rid: str) -> None:
        self.engine.abort_request(rid)
        self._pending.pop(rid, None)


def _progress_bar(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="requests", unit="req", leave=False)
