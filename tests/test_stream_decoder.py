"""Streaming detokenisation: the joined pieces equal the full decode, leading spaces included.

A SentencePiece decoder strips the space of the first token it decodes, so a stream that starts
decoding at the first generated token prints ``…isParis``; seeded with the prompt it must not.
Each case runs through ``tokenizers``' DecodeStream (a ``Tokenizer``) and through the window
fallback (a tokenizer that only has ``decode``).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

from clusterfuse.models.byte_tokenizer import ByteTokenizer
from clusterfuse.models.tokenizer import StreamDecoder, Tokenizer
from tests.fixtures_models import smollm2_loaded


def llama_style_tokenizer() -> Tokenizer:
    """A Llama-2-style tokenizer (SentencePiece BPE: Metaspace, byte fallback, the leading-space strip)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for token in ["▁", "▁The", "▁capital", "▁of", "▁France", "▁is", "▁Paris", ".", "▁It", "'s", "▁big"]:
        vocab.setdefault(token, len(vocab))
    backend = Backend(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    return Tokenizer(backend, bos_token="<s>", eos_token="</s>")


def window_only(tok: Tokenizer) -> SimpleNamespace:
    """The same tokenizer seen without its ``tokenizers`` backend: the stream decodes windows itself."""
    return SimpleNamespace(decode=tok.decode)


def stream(tok, prompt: list[int], generated: list[int]) -> list[str]:
    decoder = StreamDecoder(tok, prompt_ids=prompt)
    return [decoder.push(i) for i in generated] + [decoder.flush()]


def check_stream(tok, prompt: list[int], generated: list[int]) -> str:
    full = tok.decode(prompt + generated)
    pieces = stream(tok, prompt, generated)
    joined = "".join(pieces)
    assert tok.decode(prompt) + joined == full
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p) > 1  # it did stream
    return joined


@pytest.mark.parametrize("view", [lambda t: t, window_only], ids=["decode_stream", "window"])
def test_sentencepiece_keeps_the_first_space(view):
    tok = llama_style_tokenizer()
    ids = tok.backend.token_to_id
    prompt = [1, ids("▁The"), ids("▁capital"), ids("▁of"), ids("▁France"), ids("▁is")]
    snowman = [3 + b for b in "☃".encode()]  # a character split over three byte-fallback tokens
    generated = [ids("▁Paris"), ids("."), ids("▁It"), ids("'s"), ids("▁"), *snowman, ids("▁big"), 2]
    assert check_stream(view(tok), prompt, generated) == " Paris. It's ☃ big"


@pytest.mark.parametrize("view", [lambda t: t, window_only], ids=["decode_stream", "window"])
@pytest.mark.parametrize("reply", [" Paris is the capital.", " emojis 🎉🚀 and 👩‍👩‍👧, 日本語 ok"])
def test_smollm2_stream_equals_full_decode(view, reply):
    tok = smollm2_loaded().tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]),
                        add_special_tokens=False)
    generated = tok.encode(reply, add_special_tokens=False)
    assert check_stream(view(tok), prompt, generated) == reply


def test_prompt_ending_mid_character():
    # The prompt's ids end inside a character: the stream's first piece completes it.
    tok = llama_style_tokenizer()
    snowman = [3 + b for b in "☃".encode()]
    prompt = [1, tok.backend.token_to_id("▁is"), *snowman[:1]]
    generated = [*snowman[1:], tok.backend.token_to_id("▁Paris")]
    for view in (tok, window_only(tok)):
        pieces = stream(view, prompt, generated)
        assert "".join(pieces) == tok.decode(prompt + generated)[len("is"):] == "☃ Paris"


def test_byte_tokenizer_streams_through_the_window():
    tok = ByteTokenizer(300, bos_token_id=1, eos_token_ids=(2,))
    prompt = tok.encode("Capital: ")
    assert check_stream(tok, prompt, tok.encode("Paris ☃", add_special_tokens=False)) == "Paris ☃"


def test_without_prompt_the_stream_is_the_plain_decode():
    tok = llama_style_tokenizer()
    generated = [tok.backend.token_to_id(t) for t in ("▁Paris", ".", "▁big")]
    assert "".join(stream(tok, [], generated)) == tok.decode(generated) == "Paris. big"


def test_engine_text_stream_is_seeded_with_the_prompt():
    """The engine's per-request stream (TextStream) gets the prompt's ids, so a SentencePiece model's
    first generated word keeps its space, with a stop string held back as usual."""
    from clusterfuse.engine.text_stream import TextStream

    tok = llama_style_tokenizer()
    ids = tok.backend.token_to_id
    prompt = [1, ids("▁The"), ids("▁capital"), ids("▁of"), ids("▁France"), ids("▁is")]
    text = TextStream(tok, ("big",), prompt)
    shown = []
    for i in [ids("▁Paris"), ids("."), ids("▁It"), ids("'s"), ids("▁big")]:
        before = text.visible
        stopped = text.push(i)
        shown.append(text.visible[len(before):])
        if stopped:
            break
    assert text.stopped and text.visible == " Paris. It's "
    assert "".join(shown) == text.visible
