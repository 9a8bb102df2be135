"""Worker of the fuzz suite (tests/test_fuzz.py): runs one class of seeded cases in-process, under limits.

    python tests/fuzz_worker.py CLASS SEED COUNT FIRST WORKDIR [CASE_SECONDS]

Starting Python and torch takes seconds, so one worker runs many cases: under an address-space and
CPU-time rlimit for the whole process and a per-case alarm, it writes one JSON line per case to
stdout — ``{"case": i, "event": "start", "what": ...}`` before running it, then ``{"case": i,
"event": "end", "outcome": ..., "detail": ...}``.  Outcomes: ``ok`` (a correct run), ``clear`` (a
one-line user error), and the failures ``unclear`` (an error of the right type but empty or several
lines), ``crash`` (any other exception: a traceback), ``timeout``, ``memory``.  A case that kills the
worker leaves a ``start`` without an ``end``: the parent reports it and starts a new worker after it.

The cases are seeded mutations of tiny files written here with the gguf / safetensors packages: GGUF
files, safetensors headers, config.json, tokenizer_config.json (chat templates included) and CLI
argument vectors; and config.json / GGUF mutations of the families added later (Qwen3, Phi-3,
Mistral, DeepSeek-V2), run through generation when they load.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import random
import resource
import signal
import struct
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

ADDRESS_SPACE = 3 << 30  # torch alone maps ~0.7 GiB; a tiny model needs little more
CPU_SECONDS = 240
CASE_SECONDS = 15  # above the chat template's own 5 s limit
CLASSES = ("gguf", "safetensors", "config", "tokenizer", "cli", "families")


class CaseTimeout(BaseException):
    """Raised by the per-case alarm (a BaseException: no `except Exception` in the code under test eats it)."""


def _alarm(_signum: int, _frame: object) -> None:
    raise CaseTimeout


# ----------------------------------------------------------------------------------- base artifacts
def tiny_config():
    from clusterfuse.models.config import ModelConfig, RopeConfig

    return ModelConfig(family="llama", architecture="LlamaForCausalLM", vocab_size=300, hidden_size=32,
                       intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=8, rms_norm_eps=1e-6, rope=RopeConfig(theta=10000.0), max_position_embeddings=64,
                       bos_token_id=1, eos_token_ids=(2,))


def write_base(work: Path) -> dict[str, Path]:
    """A tiny GGUF (with a SentencePiece tokenizer) and a tiny HF directory (config, safetensors, tokenizer)."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fixtures_models import SP_PIECES, write_gguf, write_sentencepiece_metadata

    from clusterfuse.models.random_init import random_weights

    cfg = tiny_config()
    vocab = 3 + 256 + len(SP_PIECES)
    cfg = cfg.replace(vocab_size=vocab)
    weights = random_weights(cfg, dtype=torch.float32, seed=0)
    gguf_path = work / "base.gguf"
    write_gguf(gguf_path, cfg, weights, metadata=write_sentencepiece_metadata)

    hf = work / "hf"
    hf.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(hf / "model.safetensors"))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
              "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
              "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
              "num_key_value_heads": cfg.num_key_value_heads, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
              "max_position_embeddings": 64, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}
    (hf / "config.json").write_text(json.dumps(config))
    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(vocab - 3)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(hf / "tokenizer.json"))
    tok_cfg = {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "add_bos_token": True,
               "chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"}
    (hf / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    return {"gguf": gguf_path, "hf": hf}


# -------------------------------------------------------------------------------------- mutations
INTERESTING = [0, 1, -1, 2, 7, 255, 1 << 16, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 40, (1 << 63) - 1,
               (1 << 64) - 1]
JSON_VALUES = [0, -1, 1, 3, 1e9, 10**9, 1.5, -0.0, 1e-300, 1e308, float("nan"), float("inf"), "x", "", [], [1, 2],
               {}, {"a": 1}, None, True, False, 2**31, 2**64, 10**30]


def mutate_bytes(rng: random.Random, data: bytes, header_end: int) -> tuple[bytes, str]:
    b = bytearray(data)
    how = rng.choice(["flip", "u64", "u32", "truncate", "splice"])
    at = rng.randrange(0, max(header_end, 8))
    if how == "flip":
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(0, header_end)] ^= 1 << rng.randrange(8)
    elif how in ("u64", "u32"):
        fmt = "<Q" if how == "u64" else "<I"
        v = rng.choice(INTERESTING) % (1 << (64 if how == "u64" else 32))
        n = struct.calcsize(fmt)
        at = min(at, len(b) - n)
        b[at:at + n] = struct.pack(fmt, v)
    elif how == "truncate":
        del b[rng.randrange(0, len(b)):]
    else:
        src = rng.randrange(0, header_end)
        n = rng.randint(1, 64)
        b[at:at + n] = data[src:src + n]
    return bytes(b), f"{how}@{at}"


def hostile_gguf(rng: random.Random, path: Path) -> str:
    """A GGUF written field by field with one hostile metadata value or tensor layout."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    fields = {"block_count": 1, "context_length": 64, "embedding_length": 32, "feed_forward_length": 48,
              "head_count": 4, "head_count_kv": 2, "rope_freq_base": 10000.0, "layer_norm_rms_eps": 1e-6,
              "vocab_size": 16}
    victim = rng.choice([*fields, "tokens", "alignment", "bos"])
    value = rng.choice([0, -1, 10**9, 2**32 - 1, 1.5, float("nan"), -1.0, [4, 4], "x", True])
    what = f"{victim}={value!r}"
    for k, v in fields.items():
        if k == victim:
            v = value
        key = f"llama.{k}" if k not in ("vocab_size",) else "llama.vocab_size"
        if k in ("head_count", "head_count_kv") and isinstance(v, list):
            w.add_array(f"llama.attention.{k}", v)
            continue
        if k == "rope_freq_base":
            key = "llama.rope.freq_base"
        if k == "layer_norm_rms_eps":
            key = "llama.attention.layer_norm_rms_eps"
        if k in ("head_count", "head_count_kv"):
            key = f"llama.attention.{k}"
        if isinstance(v, bool):
            w.add_bool(key, v)
        elif isinstance(v, int):
            (w.add_uint32 if 0 <= v < 2**32 else w.add_int64)(key, v)
        elif isinstance(v, float):
            w.add_float32(key, v)
        elif isinstance(v, str):
            w.add_string(key, v)
        else:
            w.add_array(key, v)
    if victim == "tokens":
        w.add_token_list(rng.choice([[], ["a"] * 3, [str(i) for i in range(16)]]))
    if victim == "bos":
        w.add_token_list([str(i) for i in range(16)])
        bos = rng.choice([[], [1, 2], -1, 99, "x", 1.5])
        if isinstance(bos, list):
            w.add_array("tokenizer.ggml.bos_token_id", bos)
        elif isinstance(bos, str):
            w.add_string("tokenizer.ggml.bos_token_id", bos)
        elif isinstance(bos, float):
            w.add_float32("tokenizer.ggml.bos_token_id", bos)
        else:
            w.add_int32("tokenizer.ggml.bos_token_id", bos)
        what += f" bos={bos!r}"
    if victim == "alignment":
        w.add_uint32("general.alignment", rng.choice([0, 3, 1 << 30, 64]))
    cfg_shapes = {"token_embd.weight": (16, 32), "output_norm.weight": (32,)}
    for name, shape in cfg_shapes.items():
        w.add_tensor(name, np.ones(shape, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return what


def gguf_case(rng: random.Random, base: dict[str, Path], work: Path, i: int) -> tuple[str, Callable]:
    from clusterfuse.models.loader import load_model

    path = work / f"case{i}.gguf"
    kind = rng.random()
    if kind < 0.15:
        what = "hostile " + hostile_gguf(rng, path)
    elif kind < 0.2:  # the 192-byte file: one metadata array of 2^40 elements
        data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 4) + b"x.ar" + struct.pack("<IIQ", 9, 0,
                                                                                                        1 << 40)
        path.write_bytes(data + b"\0" * (192 - len(data)))
        what = "2^40-element array"
    elif kind < 0.3:  # tensors sharing one data block: patch every tensor offset to 0
        data = bytearray(base["gguf"].read_bytes())
        import gguf

        r = gguf.GGUFReader(base["gguf"])
        for t in r.tensors:
            off_field = t.field.parts[-1]
            pos = t.field.offset + sum(p.nbytes for p in t.field.parts[:-1])
            assert off_field.nbytes == 8
            data[pos:pos + 8] = struct.pack("<Q", 0)
        path.write_bytes(bytes(data))
        what = "all tensors at offset 0 (shared data)"
    else:
        data = base["gguf"].read_bytes()
        mutated, what = mutate_bytes(rng, data, _BASE_HEADER_END["gguf"])
        path.write_bytes(mutated)
    return what, lambda: load_model(str(path), device="cpu", progress=False)


_BASE_HEADER_END: dict[str, int] = {}


def safetensors_case(rng: random.Random, base: dict[str, Path], work: Path, i: int) -> tuple[str, Callable]:
    from clusterfuse.models.loader import load_model

    d = work / f"st{i}"
    d.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (d / f).write_bytes((base["hf"] / f).read_bytes())
    data = (base["hf"] / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    body = data[8 + n:]
    kind = rng.random()
    if kind < 0.6:
        names = [k for k in header if k != "__metadata__"]
        name = rng.choice(names)
        field = rng.choice(["dtype", "shape", "data_offsets", "entry", "meta"])
        h = copy.deepcopy(header)
        if field == "dtype":
            h[name]["dtype"] = rng.choice(["F16", "I64", "BF16", "Q4", 5, None])
        elif field == "shape":
            h[name]["shape"] = rng.choice([[], [0], [-1, 4], [2**40, 2**40], ["a"], [1.5], "x", [1] * 20])
        elif field == "data_offsets":
            other = h[rng.choice(names)]["data_offsets"]
            h[name]["data_offsets"] = rng.choice([other, [0, 2**62], [-8, 0], [5], "x", [other[0], other[1] + 4]])
        elif field == "entry":
            h[name] = rng.choice([[], "x", None, {}])
        else:
            h["__metadata__"] = rng.choice([[], {"a": 1}, "x"])
        raw = json.dumps(h).encode()
        blob = struct.pack("<Q", len(raw)) + raw + body
        what = f"{name}.{field}"
    elif kind < 0.75:
        blob = struct.pack("<Q", rng.choice([0, 2, 1 << 40, (1 << 64) - 1, n + 1000])) + data[8:]
        what = "header size"
    elif kind < 0.85:
        raw = rng.choice([b"[]", b"\"x\"", b"{", b"\xff\xfe", b"{\"a\": " * 100000 + b"1" + b"}" * 100000])
        blob = struct.pack("<Q", len(raw)) + raw + body
        what = "header JSON"
    else:
        blob, what = mutate_bytes(rng, data, 8 + n)
    (d / "model.safetensors").write_bytes(blob)
    return what, lambda: load_model(str(d), device="cpu", progress=False)


def config_case(rng: random.Random, base: dict[str, Path], work: Path, i: int) -> tuple[str, Callable]:
    from clusterfuse.models.loader import load_model

    d = work / f"cfg{i}"
    d.mkdir()
    for f in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (d / f).symlink_to(base["hf"] / f)
    cfg = json.loads((base["hf"] / "config.json").read_text())
    kind = rng.random()
    if kind < 0.08:
        cfg = rng.choice([[], [cfg], "x", 3, None])
        what = f"config is {type(cfg).__name__}"
    else:
        keys = [*cfg, "head_dim", "rope_scaling", "rope_parameters", "architectures", "q_lora_rank",
                "num_key_value_heads", "bos_token_id", "eos_token_id"]
        what = []
        for _ in range(rng.randint(1, 3)):
            key = rng.choice(keys)
            if rng.random() < 0.15:
                cfg.pop(key, None)
                what.append(f"-{key}")
                continue
            if key in ("rope_scaling", "rope_parameters"):
                value = rng.choice([[], "x", {"rope_type": "llama3", "factor": rng.choice(JSON_VALUES)},
                                    {"type": "yarn", "factor": 2.0, "beta_fast": rng.choice(JSON_VALUES)},
                                    {"rope_type": rng.choice(JSON_VALUES)}])
            elif key in ("bos_token_id", "eos_token_id"):
                value = rng.choice([[], [1, 2], [[1]], ["x"], [1.5], -1, 2**40, "x", None])
            elif key == "architectures":
                value = rng.choice([[], "LlamaForCausalLM", [1], ["DeepseekV2ForCausalLM"], ["GPT2"]])
            else:
                value = rng.choice(JSON_VALUES)
            cfg[key] = value
            what.append(f"{key}={value!r:.40}")
        what = " ".join(what)
    (d / "config.json").write_text(json.dumps(cfg))
    return what, lambda: load_model(str(d), device="cpu", progress=False)


TEMPLATES = [
    "{{ 'A' * 4000000000 }}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    "{{ range(10**12)|list }}",
    "{{ 10**10**10 }}",
    "{{ 'x'.center(4000000000) }}",
    "{{ 'x'|center(4000000000) }}",
    "{{ '%0999999999d' % 1 }}",
    "{{ '{:>999999999}'.format(1) }}",
    "{{ 'x'|indent(4000000000) }}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{{ lipsum(n=1000000000) }}",
    "{{ [1] * 4000000000 }}",
    "{{ messages|tojson(indent=1000000000) }}",
    "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",
    "{{ raise_exception('bad role') }}",
    "{% for m in messages %}{{ m.content",
    "{{ messages.__class__.__mro__ }}",
    "{{ ''.__class__.__subclasses__() }}",
    "{{ (messages|first).content * 3 }}",
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% endfor %}",
    "{{ 1 / 0 }}",
    "{{ messages[5].content }}",
    "{{ {}|dictsort(by='x') }}",
]


def tokenizer_case(rng: random.Random, base: dict[str, Path], work: Path, i: int) -> tuple[str, Callable]:
    from clusterfuse.models.tokenizer import Tokenizer

    d = work / f"tok{i}"
    d.mkdir()
    (d / "tokenizer.json").symlink_to(base["hf"] / "tokenizer.json")
    cfg: object = json.loads((base["hf"] / "tokenizer_config.json").read_text())
    kind = rng.random()
    if kind < 0.45:
        template = rng.choice(TEMPLATES)
        cfg["chat_template"] = template
        what = f"template {template[:50]!r}"
    elif kind < 0.55:
        cfg = rng.choice([[], ["x"], "x", 1, None])
        what = f"tokenizer_config is {type(cfg).__name__}"
    elif kind < 0.65:
        gen = rng.choice([{"eos_token_id": rng.choice(JSON_VALUES)}, [], "x"])
        (d / "generation_config.json").write_text(json.dumps(gen))
        what = f"generation_config {gen!r:.50}"
    else:
        key = rng.choice(["bos_token", "eos_token", "chat_template", "add_bos_token"])
        value = rng.choice([*JSON_VALUES, {"content": 5}, [{"name": "default", "template": 5}],
                            [{"name": "default", "template": "{{ messages|length }}"}], ["x"]])
        cfg[key] = value
        what = f"{key}={value!r:.40}"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))

    def run() -> None:
        tok = Tokenizer.from_hf_dir(d)
        if tok.chat_template:
            text = tok.apply_chat_template([{"role": "user", "content": "w1 w2"}])
            tok.encode(text, add_special_tokens=False)
    return what, run


def cli_case(rng: random.Random, base: dict[str, Path], work: Path, i: int) -> tuple[str, Callable]:
    from clusterfuse.cli.main import main

    model = rng.choice([str(base["gguf"]), str(base["hf"]), str(work / "missing.gguf"), "llama-9-1t", "",
                        str(work)])
    opts = {
        "--device": ["cpu", "tpu", "meta", "cuda:99", "", "cpu:0", "auto"],
        "--dtype": ["fp32", "bf16", "int8", "", "auto"],
        "--backend": ["reference", "fused", "torch", "auto"],
        "--capacity": ["32", "1e8", "0", "-5", "100000000", "x", "64"],
        "--seed": ["0", "-1", "1e3", "18446744073709551616", "7"],
        "--max-tokens": ["2", "0", "-1", "1e9", "abc", "3"],
        "--temperature": ["0", "nan", "inf", "-1", "0.7", "1e400"],
        "--top-p": ["0", "1", "0.5", "1.5", "nan"],
        "--top-k": ["0", "5", "-1", "2.5"],
        "--stop": ["", "w1", "\udcff", "x"],
    }
    sub = rng.choice(["generate", "generate", "generate", "chat", "info", "build", "bench", "frobnicate"])
    argv = [sub]
    if sub == "info":
        argv += ["--device", rng.choice(opts["--device"])]
    elif sub == "bench":
        argv += [rng.choice(["nope", "", "--help-me"])]
    elif sub in ("generate", "chat", "build"):
        argv += ["--model", model, "--device", "cpu"]
        if sub != "build":
            argv += ["--max-tokens", "2", "--quiet"]
        for name in rng.sample(sorted(opts), rng.randint(0, 3)):
            if sub == "build" and name not in ("--device", "--dtype", "--seed", "--capacity"):
                continue
            argv += [name, rng.choice(opts[name])]
        if sub == "build":  # never reaches nvcc: the tiny models' head_dim 8 is not a fused shape
            argv += ["--batch", rng.choice(["1", "0", "17", "x"])]
        if sub == "generate":
            argv += [rng.choice(["w1 w2", "hello", "\udcff\udcfe bad utf-8", "x" * 10])]
    what = " ".join(argv)

    def run() -> None:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as e:  # --help / --version only
                code = e.code
        text = err.getvalue()
        if "Traceback" in text:
            raise AssertionError(f"traceback on stderr:\n{text}")
        if code == 2:
            lines = [ln for ln in text.splitlines() if ln.strip()]
            if not lines or not lines[-1].startswith("clusterfuse: error:"):
                raise CliUnclear(f"exit 2 without a one-line error: {text!r:.300}")
            raise CliClear(lines[-1])
        if code != 0:
            raise AssertionError(f"exit code {code}: {text[-500:]}")
    return what, run


def harness_case(rng: random.Random, base: dict[str, Path], work: Path, i: int) -> tuple[str, Callable]:
    """Cases with known outcomes, to check the harness itself (test_fuzz.py::test_harness_reports_every_outcome)."""
    import os
    import time

    def clear() -> None:
        raise ValueError("a clear one-line error")

    def unclear() -> None:
        raise ValueError("two\nlines")

    def kill() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def memory() -> None:
        bytearray(2 * ADDRESS_SPACE)

    def hang() -> None:
        while True:
            time.sleep(0.05)

    def crash() -> None:
        raise RuntimeError("a bug")

    cases = [("ok", lambda: None), ("clear", clear), ("unclear", unclear), ("kill", kill), ("memory", memory),
             ("hang", hang), ("crash", crash), ("ok after", lambda: None)]
    return cases[i]


def write_family_bases(work: Path) -> dict[str, Path]:
    """Tiny checkpoints of the families added after the first fuzz pass: Qwen3 (QK-norm), Phi-3 (fused
    qkv_proj / gate_up_proj), Mistral (sliding window) and DeepSeek-V2 (MLA + MoE) as Hugging Face
    directories, and DeepSeek-V2 as a GGUF with llama.cpp's split attn_k_b / attn_v_b."""
    import torch
    import transformers

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fixtures_models import write_gguf

    from clusterfuse.models.config import ModelConfig
    from clusterfuse.models.random_init import random_weights

    # No tokenizer files: generation reads prompts as bytes, which needs a vocabulary of 259 ids or more.
    shape = {"vocab_size": 320, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
    torch.manual_seed(0)
    models = {"qwen3": transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**shape, head_dim=16)),
              "phi3": transformers.Phi3ForCausalLM(transformers.Phi3Config(**shape, pad_token_id=0)),
              "mistral": transformers.MistralForCausalLM(transformers.MistralConfig(**shape, sliding_window=8)),
              "deepseek": transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(
                  **{**shape, "num_key_value_heads": 4}, moe_intermediate_size=32, n_routed_experts=4,
                  num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=32,
                  q_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16))}
    base = {}
    for name, model in models.items():
        model.save_pretrained(work / name)
        base[name] = work / name
    config = ModelConfig.from_hf_dir(base["deepseek"])
    base["deepseek2_gguf"] = work / "deepseek2.gguf"
    write_gguf(base["deepseek2_gguf"], config, random_weights(config, dtype=torch.float32, seed=2),
               arch="deepseek2", split_kv_b=True)
    return base


def families_case(rng: random.Random, base: dict[str, Path], work: Path, i: int) -> tuple[str, Callable]:
    """A mutated config.json of a Qwen3 / Phi-3 / Mistral / DeepSeek-V2 directory, or a mutated DeepSeek-V2
    GGUF; what loads must also generate (expert counts, windows and ranks that load must also run)."""
    from clusterfuse.engine.llm import LLM
    from clusterfuse.engine.sampling import SamplingParams

    family = rng.choice(["qwen3", "phi3", "mistral", "deepseek", "deepseek2_gguf"])
    if family == "deepseek2_gguf":
        path = work / f"case{i}.gguf"
        mutated, what = mutate_bytes(rng, base[family].read_bytes(), _BASE_HEADER_END[family])
        path.write_bytes(mutated)
    else:
        path = work / f"cfg{i}"
        path.mkdir()
        for f in base[family].iterdir():
            if f.name != "config.json":
                (path / f.name).symlink_to(f)
        cfg = json.loads((base[family] / "config.json").read_text())
        keys = [*cfg, "sliding_window", "use_sliding_window", "max_window_layers", "head_dim", "n_group",
                "topk_group", "topk_method", "q_lora_rank"]
        changes = []
        for _ in range(rng.randint(1, 2)):
            key, value = rng.choice(keys), rng.choice(JSON_VALUES)
            cfg[key] = value
            changes.append(f"{key}={value!r:.40}")
        (path / "config.json").write_text(json.dumps(cfg))
        what = " ".join(changes)

    def run() -> None:
        llm = LLM(str(path), device="cpu", dtype="float32", backend="reference", capacity=24, progress=False)
        out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2, ignore_eos=True))
        assert len(out[0].token_ids) == 2, out

    return f"{family} {what}", run


class CliClear(Exception):
    """A CLI case that ended in a clear user error (exit 2, one line)."""


class CliUnclear(Exception):
    """A CLI case that exited 2 without one clear line."""


CASES = {"gguf": gguf_case, "safetensors": safetensors_case, "config": config_case, "tokenizer": tokenizer_case,
         "cli": cli_case, "families": families_case, "harness": harness_case}


def classify(run: Callable[[], object]) -> tuple[str, str]:
    from clusterfuse.cli.main import USER_ERRORS

    try:
        run()
    except CliClear as e:
        return "clear", str(e)
    except CliUnclear as e:
        return "unclear", str(e)
    except CaseTimeout:
        return "timeout", ""
    except MemoryError:
        return "memory", traceback.format_exc()[-2000:]
    except USER_ERRORS as e:
        message = str(e)
        return ("clear" if message and "\n" not in message else "unclear"), message[:500]
    except BaseException:  # noqa: BLE001 - anything else is the bug this suite looks for
        return "crash", traceback.format_exc()[-3000:]
    return "ok", ""


def main(argv: list[str]) -> int:
    cls, seed, count, first, work = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), Path(argv[4])
    case_seconds = int(argv[5]) if len(argv) > 5 else CASE_SECONDS
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
    resource.setrlimit(resource.RLIMIT_CPU, (CPU_SECONDS, CPU_SECONDS))
    import logging

    logging.getLogger("clusterfuse").setLevel(logging.ERROR)
    import warnings

    warnings.simplefilter("ignore")
    work.mkdir(parents=True, exist_ok=True)
    base_dir = work / "base"
    base_dir.mkdir(exist_ok=True)
    base: dict[str, Path] = {}
    if cls == "families":
        import gguf

        base = write_family_bases(base_dir)
        _BASE_HEADER_END["deepseek2_gguf"] = int(gguf.GGUFReader(base["deepseek2_gguf"]).data_offset)
    elif cls != "harness":
        base = write_base(base_dir)
        import gguf

        _BASE_HEADER_END["gguf"] = int(gguf.GGUFReader(base["gguf"]).data_offset)
    signal.signal(signal.SIGALRM, _alarm)
    for i in range(first, count):
        rng = random.Random(f"{cls}-{seed}-{i}")
        case_dir = work / f"c{i}"
        case_dir.mkdir(exist_ok=True)
        what, run = CASES[cls](rng, base, case_dir, i)
        print(json.dumps({"case": i, "event": "start", "what": what}), flush=True)
        signal.alarm(case_seconds)
        try:
            outcome, detail = classify(run)
        finally:
            signal.alarm(0)
        print(json.dumps({"case": i, "event": "end", "outcome": outcome, "detail": detail}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
