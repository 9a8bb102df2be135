"""A byte-level stand-in tokenizer for presets, which have random weights and no vocabulary.

It lets `clusterfuse generate --model llama-2-7b` run end to end (the text is noise,
the timings are real): UTF-8 bytes map to ids 3..258, every other id decodes to a
visible placeholder.
"""

from __future__ import annotations

from collections.abc import Sequence

BYTE_OFFSET = 3


class ByteTokenizer:
    """Same interface as `Tokenizer` for the parts the engine uses."""

    def __init__(self, vocab_size: int, bos_token_id: int | None = None, eos_token_ids: Sequence[int] = ()) -> None:
        if vocab_size < BYTE_OFFSET + 256:
            raise ValueError(f"vocab_size: a byte tokenizer needs at least {BYTE_OFFSET + 256} ids, got {vocab_size}")
        self.vocab_size = vocab_size
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(eos_token_ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [b + BYTE_OFFSET for b in text.encode("utf-8")]
        if add_special_tokens and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        out = bytearray()
        for i in ids:
            if BYTE_OFFSET <= i < BYTE_OFFSET + 256:
                out.append(i - BYTE_OFFSET)
            elif not skip_special_tokens or i not in (self.bos_token_id, *self.eos_token_ids):
                out.extend(f"<{i}>".encode())
        return out.decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return text + ("assistant: " if add_generation_prompt else "")
