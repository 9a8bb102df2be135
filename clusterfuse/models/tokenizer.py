"""Tokenizer: text ↔ ids, the chat template, and incremental decoding for streaming.

Built on the ``tokenizers`` library only (no ``transformers`` at run time):

* ``Tokenizer.from_hf_dir`` reads ``tokenizer.json`` (+ ``tokenizer_config.json``,
  ``chat_template.jinja``, ``generation_config.json``);
* ``Tokenizer.from_gguf`` rebuilds the tokenizer a GGUF file describes in its
  ``tokenizer.ggml.*`` metadata: byte-level BPE (``gpt2``; the pre-tokenizer split is chosen
  by ``tokenizer.ggml.pre``, as llama.cpp does) or SentencePiece-style BPE with byte
  fallback (``llama``; merges recovered from the token scores).

The chat template is rendered the way ``transformers`` does (sandboxed jinja2,
``trim_blocks``/``lstrip_blocks``, ``raise_exception``, a ``tojson`` that keeps non-ASCII),
so prompts are byte-identical to what the model was trained on.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from clusterfuse.models.chat_template import LimitedSandbox, render_limited
from clusterfuse.models.validate import ConfigError, read_json_object

if TYPE_CHECKING:
    from clusterfuse.models.byte_tokenizer import ByteTokenizer


class TokenizerError(ValueError):
    """A tokenizer that cannot be built (missing file, unsupported GGUF tokenizer model) or a template error."""


#: Tokens that end an assistant turn in common chat templates; one that the template uses and the
#: vocabulary holds is a stop token even when the model's ``eos_token`` is another one.
CHAT_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                   "<|end_of_text|>", "<｜end▁of▁sentence｜>", "</s>")

# ------------------------------------------------------------------------------------- pre-tokenizers
# Split regexes of llama.cpp's ``tokenizer.ggml.pre`` types (same as the tokenizer.json of the models).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {
    "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}
_IGNORE_MERGES = {"llama-bpe", "llama3", "llama-v3", "smaug-bpe"}  # whole-word vocab hits first, as in Llama-3


def _byte_level_pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    if pre == "smollm":  # SmolLM / SmolLM2: every digit on its own, then GPT-2 splitting
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in _SPLITS:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre not in (None, "default", "gpt2", "gpt-2"):
        warnings.warn(f"GGUF tokenizer.ggml.pre {pre!r} is not known to clusterfuse; splitting text like GPT-2, "
                      "which may tokenize some text differently from the original tokenizer", stacklevel=3)
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character table (the alphabet of byte-level BPE vocabularies)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


# GGUF token types (llama.cpp's llama_token_type)
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4


def _gguf_backend(meta: dict[str, Any]) -> Backend:
    """A ``tokenizers.Tokenizer`` from the ``tokenizer.ggml.*`` metadata in ``meta`` (keys without the prefix)."""
    kind = meta.get("model")
    tokens: list[str] = meta["tokens"]
    types: list[int] = meta.get("token_type") or [1] * len(tokens)
    if len(types) != len(tokens) or len(meta.get("scores") or tokens) != len(tokens):
        raise TokenizerError(f"GGUF tokenizer: {len(tokens)} tokens but {len(types)} token types / "
                             f"{len(meta.get('scores') or tokens)} scores")
    if kind == "gpt2":
        spelling = _bytes_to_unicode()
        alphabet = set(spelling.values())

        def spell(token: str, ttype: int) -> str:  # a few files store plain-text tokens: respell them in bytes
            if ttype in (_CONTROL, _USER_DEFINED) or set(token) <= alphabet:
                return token
            return "".join(spelling[b] for b in token.encode("utf-8"))

        vocab = {spell(t, ty): i for i, (t, ty) in enumerate(zip(tokens, types, strict=True))}
        merges = [tuple(m.split(" ", 1)) for m in meta.get("merges") or []]
        pre = meta.get("pre")
        backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False,
                                     ignore_merges=pre in _IGNORE_MERGES))
        backend.pre_tokenizer = _byte_level_pre_tokenizer(pre)
        backend.decoder = decoders.ByteLevel()
        specials = [t for t, ty in zip(tokens, types, strict=True) if ty == _CONTROL and set(t) <= alphabet]
    elif kind == "llama":
        scores: list[float] = meta.get("scores") or [0.0] * len(tokens)
        vocab = {t: i for i, t in enumerate(tokens)}
        unk_id = meta.get("unknown_token_id")
        backend = Backend(models.BPE(vocab=vocab, merges=_merges_from_scores(tokens, scores),
                                     unk_token=tokens[unk_id] if unk_id is not None else None,
                                     fuse_unk=True, byte_fallback=True))
        prefix = bool(meta.get("add_space_prefix", True))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if prefix else "never",
                                                         split=False)
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
        specials = [t for t, ty in zip(tokens, types, strict=True) if ty in (_CONTROL, _UNKNOWN)]
    else:
        raise TokenizerError(f"GGUF tokenizer.ggml.model: unsupported tokenizer model {kind!r} "
                             "(supported: gpt2 byte-level BPE, llama SentencePiece BPE)")
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    user = [t for t, ty in zip(tokens, types, strict=True) if ty == _USER_DEFINED]
    if user:
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    return backend


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two vocabulary
    tokens, best-scored result first (what ``transformers``' converter does)."""
    ids = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token, score in zip(tokens, scores, strict=True):
        local = [(token[:k], token[k:], score) for k in range(1, len(token)) if token[:k] in ids and token[k:] in ids]
        merges.extend(sorted(local, key=lambda m: (ids[m[0]], ids[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


# ------------------------------------------------------------------------------------- chat template
class _GenerationBlocks(Extension):
    """``{% generation %}...{% endgeneration %}`` (HF's assistant-mask markers): render the body as is."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise TokenizerError(f"chat template: {message}")


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    env = LimitedSandbox(trim_blocks=True, lstrip_blocks=True,
                         extensions=[_GenerationBlocks, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except (jinja2.TemplateError, RecursionError, MemoryError) as e:
        raise TokenizerError(f"chat template: not a valid jinja2 template ({str(e)[:200] or type(e).__name__})") from e


# ------------------------------------------------------------------------------------------ tokenizer
class Tokenizer:
    """Text ↔ token ids for one model, plus its chat template and stop tokens."""

    def __init__(self, backend: Backend, *, bos_token: str | None = None, eos_token: str | None = None,
                 chat_template: str | None = None, extra_eos_ids: Iterable[int] = ()) -> None:
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.chat_template = chat_template
        self.bos_token_id = self._id(bos_token)
        eos = [self._id(eos_token), *extra_eos_ids]
        eos += [self._id(t) for t in CHAT_END_TOKENS if chat_template and t in chat_template]
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(i for i in eos if i is not None))

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` adds what the model expects around it (e.g. BOS)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """The prompt string for ``messages`` (``[{"role": ..., "content": ...}]``), as the model's template
        writes it; encode it with ``add_special_tokens=False`` (the template places BOS itself)."""
        if not self.chat_template:
            raise TokenizerError("this tokenizer has no chat template")
        context = dict(messages=messages, add_generation_prompt=add_generation_prompt, tools=None, documents=None,
                       bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        context.update(kwargs)
        try:
            return render_limited(_compile_template(self.chat_template), context)
        except TokenizerError:
            raise
        except ValueError as e:  # TemplateLimitError: its message is the whole story
            raise TokenizerError(str(e)) from e
        except Exception as e:  # the template is the checkpoint author's code: whatever it raises is their error
            raise TokenizerError(f"chat template: rendering failed ({type(e).__name__}: {str(e)[:200]})") from e

    # ---------------------------------------------------------------------------------- constructors
    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """From a Hugging Face model directory: ``tokenizer.json`` and, where present,
        ``tokenizer_config.json`` (special tokens, chat template), ``chat_template.jinja`` and
        ``generation_config.json`` (extra stop ids, e.g. Llama-3's ``<|eot_id|>``)."""
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise TokenizerError(f"{path}: no tokenizer.json found")
        try:
            backend = Backend.from_file(str(tj))
        except Exception as e:
            raise TokenizerError(f"{tj}: cannot read tokenizer ({e})") from e
        cfg = _read_json(path / "tokenizer_config.json")
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: use "default"
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                            None)
        jinja_file = path / "chat_template.jinja"
        if jinja_file.is_file():
            template = jinja_file.read_text(errors="replace")
        if template is not None and not isinstance(template, str):
            raise TokenizerError(f"{path / 'tokenizer_config.json'}: chat_template: expected a string or a list of "
                                 f"{{name, template}} objects, got {type(template).__name__}")
        gen_eos = _read_json(path / "generation_config.json").get("eos_token_id")
        extra = gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else []
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in extra):
            raise TokenizerError(f"{path / 'generation_config.json'}: eos_token_id: expected token ids (integers), "
                                 f"got {gen_eos!r:.80}")
        bos, eos = (_token_text(cfg.get(k), path / "tokenizer_config.json", k) for k in ("bos_token", "eos_token"))
        if cfg.get("add_bos_token") is not None and not isinstance(cfg["add_bos_token"], bool):
            raise TokenizerError(f"{path / 'tokenizer_config.json'}: add_bos_token: expected true or false, got "
                                 f"{cfg['add_bos_token']!r:.80}")
        tok = cls(backend, bos_token=bos, eos_token=eos, chat_template=template, extra_eos_ids=extra)
        if cfg.get("add_bos_token") and tok.bos_token_id is not None and not _adds_bos(backend, tok.bos_token_id):
            backend.post_processor = _bos_processor(tok.bos_token, tok.bos_token_id)
        return tok

    @classmethod
    def from_gguf(cls, reader: Any) -> Tokenizer:
        """From the ``tokenizer.ggml.*`` metadata of a GGUF file (a ``gguf.GGUFReader`` or a path)."""
        from clusterfuse.models.gguf_loader import gguf_field, open_gguf  # keeps this module free of gguf

        if isinstance(reader, (str, Path)):
            reader = open_gguf(reader)
        prefix = "tokenizer.ggml."
        meta = {k[len(prefix):]: gguf_field(reader, k) for k in reader.fields if k.startswith(prefix)}
        if "tokens" not in meta:
            raise TokenizerError("GGUF: no tokenizer.ggml.tokens in the file (no tokenizer embedded)")
        _check_gguf_tokenizer_meta(meta)
        try:
            backend = _gguf_backend(meta)
        except TokenizerError:
            raise
        except Exception as e:  # the tokenizers library's own complaint about the vocabulary or merges
            raise TokenizerError(f"GGUF tokenizer.ggml.*: cannot build the tokenizer ({type(e).__name__}: "
                                 f"{str(e)[:200]})") from e
        tokens = meta["tokens"]

        def token(key: str) -> str | None:
            i = meta.get(key)
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        bos, bos_id = token("bos_token_id"), meta.get("bos_token_id")
        add_bos = meta.get("add_bos_token", meta.get("model") == "llama")  # llama.cpp's default for SentencePiece
        if add_bos and bos is not None:
            try:
                backend.post_processor = _bos_processor(bos, bos_id)
            except Exception as e:  # the tokenizers library's complaint about the BOS token
                raise TokenizerError(f"GGUF tokenizer.ggml.bos_token_id: cannot use token {bos!r:.40} as BOS "
                                     f"({e})") from e
        extra = [meta[k] for k in ("eot_token_id", "eom_token_id") if meta.get(k) is not None]
        template = gguf_field(reader, "tokenizer.chat_template", None)
        if template is not None and not isinstance(template, str):
            raise TokenizerError(f"GGUF tokenizer.chat_template: expected a string, got {template!r:.80}")
        return cls(backend, bos_token=bos, eos_token=token("eos_token_id"), chat_template=template,
                   extra_eos_ids=extra)


def _check_gguf_tokenizer_meta(meta: dict[str, Any]) -> None:
    """Types of the ``tokenizer.ggml.*`` values this module reads: one error naming the key, not a traceback."""
    def fail(key: str, expected: str) -> None:
        raise TokenizerError(f"GGUF tokenizer.ggml.{key}: expected {expected}, got {meta[key]!r:.80}")

    for key in ("tokens", "merges"):
        if key in meta and not (isinstance(meta[key], list) and all(isinstance(t, str) for t in meta[key])):
            fail(key, "an array of strings")
    for key in ("scores", "token_type"):
        if key in meta and not (isinstance(meta[key], list) and len(meta[key]) == len(meta["tokens"])
                                and all(isinstance(x, int | float) for x in meta[key])):
            fail(key, f"an array of {len(meta['tokens'])} numbers (one per token)")
    for key in ("bos_token_id", "eos_token_id", "eot_token_id", "eom_token_id", "padding_token_id",
                "unknown_token_id"):
        if key in meta and (isinstance(meta[key], bool) or not isinstance(meta[key], int) or meta[key] < 0):
            fail(key, "a token id (a non-negative integer)")
    for key in ("model", "pre"):
        if key in meta and not isinstance(meta[key], str):
            fail(key, "a string")
    if "add_bos_token" in meta and not isinstance(meta["add_bos_token"], bool):
        fail("add_bos_token", "true or false")


def _read_json(file: Path) -> dict[str, Any]:
    """The JSON object in ``file`` ({} if absent); anything else (a list, bad JSON) is a TokenizerError."""
    if not file.is_file():
        return {}
    try:
        return read_json_object(file)
    except ConfigError as e:
        raise TokenizerError(str(e)) from e


def _token_text(value: Any, file: Path | None = None, key: str = "") -> str | None:
    """``tokenizer_config.json`` writes special tokens as a string or as ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise TokenizerError(f"{file}: {key}: expected a token string or {{\"content\": ...}}, got {value!r:.80}")
    return value


def _adds_bos(backend: Backend, bos_id: int) -> bool:
    ids = backend.encode("a", add_special_tokens=True).ids
    return bool(ids) and ids[0] == bos_id


def _bos_processor(bos: str, bos_id: int) -> processors.TemplateProcessing:
    return processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                         special_tokens=[(bos, bos_id)])


# ------------------------------------------------------------------------------------------ streaming
class StreamDecoder:
    """Incremental detokenisation: feed ids one at a time, get back only the newly completed text.

    Decoding token by token is wrong in two ways: a character split over several byte tokens
    (emoji, CJK, SentencePiece ``<0xE2>`` byte fallback) would print as U+FFFD, and
    SentencePiece decoders strip the leading space of whatever they decode first, so the first
    generated word would lose its space (``…isParis``).  So the stream decodes a short window that
    starts in already-emitted text (seeded with the tail of the prompt's ids, ``prompt_ids``) and
    emits what the window adds, holding text back while it ends in an incomplete character.

    Where the ``tokenizers`` library has ``DecodeStream`` with prefill ids (0.21 and later) and the
    tokenizer is backed by it, that does the work; otherwise (the byte stand-in tokenizer, older
    ``tokenizers``) the same window is decoded here, as text-generation-inference does.  Both give
    ``decode(prompt + generated)[len(decode(prompt)):]`` when the pieces are joined.
    """

    #: Prompt ids kept as context: enough for a leading space or a character split over byte tokens.
    CONTEXT_IDS = 8

    def __init__(self, tokenizer: Tokenizer | ByteTokenizer, skip_special_tokens: bool = True,
                 prompt_ids: Iterable[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []  # the ids pushed so far (generated; the prompt is not in here)
        self._window = [int(i) for i in prompt_ids][-self.CONTEXT_IDS:]
        self._prefix = 0  # start of the decoding window (context for leading spaces)
        self._read = len(self._window)  # ids before this were already emitted (or are prompt)
        # A prompt that ends inside a character: its last bytes count as not yet emitted, so that the
        # first piece carries the whole character.
        while self._read and self._text(self._window[:self._read]).endswith("\ufffd"):
            self._read -= 1
        self._stream = _decode_stream(tokenizer, self._window[:self._read], skip_special_tokens)
        self._unsent = self._window[self._read:]  # ids the DecodeStream gets with the first push

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes ("" while a character is still incomplete)."""
        token_id = int(token_id)
        self.ids.append(token_id)
        self._window.append(token_id)
        if self._stream is not None:
            try:
                step = [*self._unsent, token_id] if self._unsent else token_id
                piece = self._stream.step(self.tokenizer.backend, step)
                self._unsent = []
            except Exception:  # a prefix DecodeStream cannot extend: decode the window here from now on
                self._stream = None
            else:
                if piece is None:
                    return ""
                self._emitted()
                return piece
        done = self._text(self._window[self._prefix:self._read])
        text = self._text(self._window[self._prefix:])
        if len(text) > len(done) and not text.endswith("\ufffd"):
            self._emitted()
            return text[len(done):]
        return ""

    def _emitted(self) -> None:
        """Everything pushed is out: the window now starts where the previous emission ended."""
        self._window = self._window[self._read:]
        self._prefix, self._read = 0, len(self._window)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD)."""
        done = self._text(self._window[self._prefix:self._read])
        text = self._text(self._window[self._prefix:])
        self._emitted()
        return text[len(done):]


def _decode_stream(tokenizer: Any, context: list[int], skip_special_tokens: bool) -> Any | None:
    """A ``tokenizers.decoders.DecodeStream`` seeded with ``context``, or None where the tokenizer is
    not a ``tokenizers`` one or the installed library has no DecodeStream taking prefill ids."""
    if not isinstance(getattr(tokenizer, "backend", None), Backend):
        return None
    try:
        from tokenizers.decoders import DecodeStream
    except ImportError:
        return None
    try:
        return DecodeStream(ids=list(context), skip_special_tokens=skip_special_tokens)
    except TypeError:  # a DecodeStream without prefill ids cannot keep the prompt's leading space
        return None
