"""Tokenizer: ids identical to transformers' for the same files, chat templates, stop tokens, streaming."""

from __future__ import annotations

import pytest
import torch

from clusterfuse.models.config import ModelConfig
from clusterfuse.models.gguf_loader import open_gguf
from clusterfuse.models.random_init import random_weights
from clusterfuse.models.tokenizer import StreamDecoder, Tokenizer, TokenizerError
from tests.fixtures_models import (
    smollm2_gguf,
    smollm2_hf_tokenizer,
    smollm2_loaded,
    write_gguf,
    write_sentencepiece_metadata,
)

TEXTS = [
    "Hello world",
    "The year 2024 had 366 days; x = 12345 + 678.90",
    "  leading and trailing spaces  \n\n\ttabs",
    "café, naïve, Straße, Ωμέγα, привет, 日本語のテキスト, 한국어",
    "emojis 🎉🚀 and 👩‍👩‍👧 family, flags 🇫🇷",
    "<|im_start|>user\nspecial tokens inline<|im_end|>\n",
    "def f(x):\n    return x**2  # code\n",
    "",
]

CHATS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 👋"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Tell me a joke."}],
]


@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    return smollm2_loaded().tokenizer


@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_encode_matches_transformers(ours, text):
    ref = smollm2_hf_tokenizer()
    assert ours.encode(text) == ref.encode(text)
    assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_decode_round_trip(ours, text):
    ids = ours.encode(text)
    assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.decode(ids, skip_special_tokens=False) == smollm2_hf_tokenizer().decode(ids)


def test_smollm2_special_tokens(ours):
    assert ours.vocab_size == 49152
    assert ours.bos_token_id == 1 and ours.bos_token == "<|im_start|>"
    assert 2 in ours.eos_token_ids and ours.backend.id_to_token(2) == "<|im_end|>"
    assert ours.decode(ours.encode("<|im_start|>hi<|im_end|>")) == "hi"  # skip_special_tokens by default


@pytest.mark.parametrize("messages", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_chat_template_matches_transformers(ours, messages, add_generation_prompt):
    ref = smollm2_hf_tokenizer()
    text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    ids = ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ours.encode(text, add_special_tokens=False) == list(ids)


def test_from_hf_dir(tmp_path, ours):
    smollm2_hf_tokenizer().save_pretrained(tmp_path)
    tok = Tokenizer.from_hf_dir(tmp_path)
    for text in TEXTS:
        assert tok.encode(text) == ours.encode(text)
    assert tok.apply_chat_template(CHATS[1]) == ours.apply_chat_template(CHATS[1])
    assert tok.eos_token_ids[0] == 2 and tok.vocab_size == ours.vocab_size


def test_from_gguf_path():
    tok = Tokenizer.from_gguf(smollm2_gguf())
    assert tok.encode("Hello world") == [19556, 905]


def test_chat_template_raise_exception():
    tok = Tokenizer(smollm2_loaded().tokenizer.backend,
                    chat_template="{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}"
                                  "{% endif %}{{ messages[0]['content'] | tojson }}")
    assert tok.apply_chat_template([{"role": "user", "content": "é"}]) == '"é"'
    with pytest.raises(TokenizerError, match="chat template: first must be user"):
        tok.apply_chat_template([{"role": "system", "content": "x"}])
    with pytest.raises(TokenizerError, match="no chat template"):
        Tokenizer(tok.backend).apply_chat_template([])


@pytest.mark.parametrize("text", TEXTS[2:5])
def test_stream_decoder(ours, text):
    ids = ours.encode(text)
    stream = StreamDecoder(ours)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == ours.decode(ids)
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p) > 1  # it did stream


# -------------------------------------------------------------------------- SentencePiece-style GGUF
SP_TEXTS = ["hello world", "the cat sat", " and the world is", "hello <tag> world", "naïve ☃ 日本",
            "a\nb", "</s>the"]


@pytest.fixture(scope="module")
def sp_gguf(tmp_path_factory):
    cfg = ModelConfig(family="llama", architecture="LlamaForCausalLM", vocab_size=300, hidden_size=64,
                      intermediate_size=96, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                      head_dim=16)
    path = tmp_path_factory.mktemp("sp") / "sp.gguf"
    write_gguf(path, cfg, random_weights(cfg, dtype=torch.float32), metadata=write_sentencepiece_metadata)
    return path


def test_sentencepiece_gguf_matches_transformers(sp_gguf):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(sp_gguf.parent), gguf_file=sp_gguf.name)
    ours = Tokenizer.from_gguf(open_gguf(sp_gguf))
    assert ours.bos_token_id == 1 and ours.eos_token_ids == (2,) and ours.vocab_size == 300
    for text in SP_TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        assert ids[0] == 1  # add_bos_token
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
    assert ours.decode(ours.encode("naïve ☃ 日本")) == "naïve ☃ 日本"  # byte fallback round trip
    msgs = [{"role": "user", "content": "hello"}]
    assert ours.apply_chat_template(msgs) == ref.apply_chat_template(msgs, tokenize=False) == "<s>[user] hello</s>"


def test_sentencepiece_stream_decoder(sp_gguf):
    tok = Tokenizer.from_gguf(sp_gguf)
    ids = tok.encode("hello naïve ☃ the world")
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tok.decode(ids) == "hello naïve ☃ the world"
    assert not any("\ufffd" in p for p in pieces)
