"""One request's state inside the engine: its tokens, where it is in the cache, its text."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from clusterfuse.engine.outputs import FinishReason
from clusterfuse.engine.sampling import SamplingParams
from clusterfuse.engine.text_stream import TextStream


class Status(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and waiting to be recomputed
    RUNNING = "running"  # holds a cache slot: prefilling or decoding
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """A request as the scheduler and the engine see it.

    Counters, and what they mean while the engine runs one step ahead of the host:

    * ``generated``: tokens read back on the host, in order;
    * ``sampled``: tokens sampled so far, read or still on their way to the host (``read``: read);
    * ``computed``: rows of this sequence in its cache slot (its KV), as scheduled;
    * ``prefill_target``: rows to prefill before decoding: the prompt, or after a preemption the
      prompt plus every generated token (recomputed; the text already streamed is not re-emitted).

    A decoding sequence holds ``computed == len(prompt_ids) + sampled - 1`` rows: its last sampled
    token is the next decode step's input, taken on the device from ``last_ids[last_row]``.
    """

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: int  # arrival order: the newest running request is preempted first
    arrival_s: float
    generator: torch.Generator | None
    text: TextStream
    status: Status = Status.WAITING
    slot: int | None = None
    generated: list[int] = field(default_factory=list)
    sampled: int = 0
    read: int = 0  # tokens read back on the host (``generated``, plus an end-of-sequence token)
    computed: int = 0
    prefill_target: int = 0
    last_ids: torch.Tensor | None = None
    last_row: int = 0
    finish_reason: FinishReason | None = None
    first_token_s: float | None = None
    finished_s: float | None = None
    # What the previous output of this request carried.
    reported_tokens: int = 0
    reported_chars: int = 0
    preemptions: int = 0

    @property
    def prefilling(self) -> bool:
        return self.computed < self.prefill_target

    @property
    def tokens_in_flight(self) -> int:
        """Sampled tokens the host has not read yet (EOS counts: it was sampled)."""
        return self.sampled - self.read

    def prefill_tokens(self) -> list[int]:
        """The tokens to prefill: the prompt, then every generated token (after a preemption)."""
        return self.prompt_ids + self.generated
