"""What the engine hands back: one `RequestOutput` per request per step it progressed, and `EngineStats`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FinishReason = Literal["stop", "length", "abort"]


@dataclass
class RequestOutput:
    """A request's state after an engine step.

    ``text`` is all the text that may be shown so far and ``delta_text`` what was added since this
    request's previous output, so a streaming client that prints every ``delta_text`` prints exactly
    the final ``text``. While a request runs, text that could be the start of a stop string is held
    back (not in ``text`` yet); a matched stop string and what follows it never appear.
    ``token_ids`` are all generated tokens (an end-of-sequence token that ended the request is not
    one of them). EOS and stop strings both finish with ``"stop"``, as OpenAI's API does.
    Timings are ``time.monotonic()`` seconds.
    """

    request_id: str
    prompt_token_ids: list[int]
    text: str
    delta_text: str
    token_ids: list[int]
    delta_token_ids: list[int]
    finished: bool
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    arrival_s: float
    first_token_s: float | None = None
    finished_s: float | None = None


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine, taken after each step (safe to read from any thread)."""

    running: int = 0
    waiting: int = 0
    kv_pages_used: int = 0
    kv_pages_total: int = 0
    #: Requests preempted so far (their pages freed, recomputed later).
    preemptions: int = 0
    #: Prompt tokens prefilled, counted once per request.
    prompt_tokens: int = 0
    #: Tokens generated (sampled and read), end-of-sequence tokens included.
    generation_tokens: int = 0
    #: Tokens prefilled again after a preemption.
    recomputed_tokens: int = 0
