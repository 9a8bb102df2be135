"""A request's generated text as it may be shown while streaming: detokenised incrementally, cut at
the first stop string, and holding back any tail that could still grow into one.

Without the hold-back, ``stop=("is: 2",)`` would stream "... answer is: " before the "2" arrives and
the final text ends "... answer " — the streamed pieces would not add up to the result. The shown
text only ever grows: a stop string that matches later starts inside the held-back tail (that tail
was a prefix of it), never inside text already shown.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from clusterfuse.models.tokenizer import StreamDecoder


class TextStream:
    """Feed token ids with `push`; `visible` is the text that may be shown now. ``prompt_ids`` seed the
    decoder (a SentencePiece tokenizer needs them to keep the first word's leading space)."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...], prompt_ids: Iterable[int] = ()) -> None:
        self._decoder = StreamDecoder(tokenizer, prompt_ids=prompt_ids)
        self._stop = stop
        self._text = ""  # every character decoded so far, cut at a stop string once one matched
        self._held = 0  # characters at the end of _text that could start a stop string
        self.stopped = False  # a stop string matched
        self.closed = False  # no more tokens: nothing is held back

    def push(self, token_id: int) -> bool:
        """Add one generated token; True when its text completes a stop string (the text is then cut
        where the stop string starts and the stream is closed)."""
        if self.closed:
            raise RuntimeError("TextStream: push after the stream was closed")
        self._append(self._decoder.push(token_id))
        return self.stopped

    def close(self) -> None:
        """The request ended: release the held-back text and any incomplete character."""
        if not self.closed:
            self._append(self._decoder.flush())
        self.closed = True
        self._held = 0

    @property
    def visible(self) -> str:
        return self._text[:len(self._text) - self._held]

    def _append(self, delta: str) -> None:
        if not delta:
            return
        before = len(self._text)
        self._text += delta
        matches = [i for s in self._stop if (i := self._text.find(s, max(0, before - len(s) + 1))) >= 0]
        if matches:
            self._text = self._text[:min(matches)]
            self.stopped = self.closed = True
            self._held = 0
            return
        self._held = max((k for s in self._stop for k in range(min(len(s) - 1, len(self._text)), 0, -1)
                          if self._text.endswith(s[:k])), default=0)
