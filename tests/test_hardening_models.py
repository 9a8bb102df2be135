"""Untrusted model files fail fast with one clear error naming the field (issue 39)."""

from __future__ import annotations

import json
import struct
import time

import pytest
import torch

from clusterfuse.models.config import ConfigError, ModelConfig
from clusterfuse.models.tokenizer import TokenizerError
from clusterfuse.models.validate import check_gguf_file, check_safetensors_file
from clusterfuse.models.weights import WeightsError

BASE = {"architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}


@pytest.mark.parametrize(("change", "field"), [
    ({"num_hidden_layers": 1e9}, "num_hidden_layers: expected an integer"),
    ({"num_hidden_layers": 10**9}, "num_hidden_layers: expected an integer from 1 to 1024"),
    ({"rms_norm_eps": -1}, "rms_norm_eps: expected a finite number > 0"),
    ({"rope_theta": -1}, "rope_theta: expected a finite number > 0"),
    ({"vocab_size": 0}, "vocab_size: expected an integer from 1"),
    ({"num_attention_heads": [4, 4]}, "num_attention_heads: expected an integer, got an array"),
    ({"eos_token_id": "x"}, "eos_token_id: expected an integer"),
    ({"rope_scaling": ["x"]}, "rope_scaling: expected a JSON object, got an array"),
    ({"head_dim": 7}, "head_dim: expected an even number"),
    ({"architectures": [], "model_type": ["llama"]}, "model_type: expected a string, got an array"),
])
def test_config_fields_are_checked(change, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_hf_dict({**BASE, **change})


def test_token_ids_in_lists():
    config = ModelConfig.from_hf_dict({**BASE, "bos_token_id": [], "eos_token_id": [2, 3]})
    assert config.bos_token_id is None and config.eos_token_ids == (2, 3)
    assert ModelConfig.from_hf_dict({**BASE, "bos_token_id": [1, 5]}).bos_token_id == 1
    with pytest.raises(ConfigError, match="bos_token_id: expected an integer"):
        ModelConfig.from_hf_dict({**BASE, "bos_token_id": [1.5]})


def test_config_file_that_is_a_list_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("[]")
    with pytest.raises(ConfigError, match="config.json: expected a JSON object, got an array"):
        ModelConfig.from_hf_dir(tmp_path)


def test_weight_map_that_is_a_list_is_a_clear_error(tmp_path):
    from clusterfuse.models.safetensors_loader import checkpoint_files

    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["a"]}))
    with pytest.raises(WeightsError, match="weight_map: expected a JSON object"):
        checkpoint_files(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../../x"}}))
    with pytest.raises(WeightsError, match="expected a file name inside"):
        checkpoint_files(tmp_path)


def test_gguf_array_of_2_pow_40_elements_fails_fast(tmp_path):
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 4) + b"x.ar" + struct.pack("<IIQ", 9, 0, 1 << 40)
    (tmp_path / "a.gguf").write_bytes(data + b"\0" * (192 - len(data)))
    t0 = time.monotonic()
    with pytest.raises(WeightsError, match="array of 1099511627776 elements cannot fit"):
        check_gguf_file(tmp_path / "a.gguf")
    assert time.monotonic() - t0 < 1


def test_gguf_tensors_sharing_data_are_refused(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "s.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("a", np.ones((64, 64), dtype=np.float32))
    w.add_tensor("b", np.ones((64, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    check_gguf_file(path)  # the file as written is fine
    data = bytearray(path.read_bytes())
    r = gguf.GGUFReader(path)
    t = r.tensors[1]
    pos = t.field.offset + sum(p.nbytes for p in t.field.parts[:-1])
    data[pos:pos + 8] = struct.pack("<Q", 0)  # b's data now starts where a's does
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="tensors 'a' and 'b' share data bytes"):
        check_gguf_file(path)


def _safetensors(path, header: dict, body: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def test_safetensors_header_checks(tmp_path):
    f = tmp_path / "m.safetensors"
    _safetensors(f, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                     "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)
    with pytest.raises(WeightsError, match="share data bytes"):
        check_safetensors_file(f)
    _safetensors(f, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 8)
    with pytest.raises(WeightsError, match="need 16"):
        check_safetensors_file(f)
    f.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(WeightsError, match="header declares"):
        check_safetensors_file(f)


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.float8_e4m3fn])
def test_weights_of_a_dtype_we_do_not_read_are_refused(tmp_path, dtype):
    """Integer or bool weights would be cast to floats; FP8 ones need scale tensors we do not read:
    garbage either way, so refused by name before any data is read."""
    from safetensors.torch import save_file

    from clusterfuse.models.safetensors_loader import load_safetensors_weights
    from tests.fixtures_models import tiny_llama

    model = tiny_llama()
    model.config.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    name = "model.layers.1.mlp.down_proj.weight"
    state[name] = state[name].to(dtype)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsError, match=rf"tensor '{name}': dtype \w+ is not a weight dtype this loader reads"):
        load_safetensors_weights(tmp_path, ModelConfig.from_hf_dir(tmp_path), progress=False)


def _tokenizer_dir(tmp_path, config):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))


def test_tokenizer_config_that_is_a_list_is_a_clear_error(tmp_path):
    from clusterfuse.models.tokenizer import Tokenizer

    _tokenizer_dir(tmp_path, ["x"])
    with pytest.raises(TokenizerError, match="expected a JSON object, got an array"):
        Tokenizer.from_hf_dir(tmp_path)


@pytest.mark.parametrize("template", [
    "{{ 'A' * 4000000000 }}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{{ 'x'|center(4000000000) }}",
    "{{ '%0999999999d' % 1 }}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{{ messages|tojson(indent=1000000000) }}",
    "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",
])
def test_costly_chat_templates_are_stopped(tmp_path, template):
    from clusterfuse.models.tokenizer import Tokenizer

    _tokenizer_dir(tmp_path, {"chat_template": template})
    tok = Tokenizer.from_hf_dir(tmp_path)
    t0 = time.monotonic()
    with pytest.raises(TokenizerError, match="chat template"):
        tok.apply_chat_template([{"role": "user", "content": "a"}])
    assert time.monotonic() - t0 < 6


@pytest.mark.parametrize("template", [
    "{% include '/etc/passwd' %}",
    "{% import '/etc/hostname' as h %}{{ h }}",
    "{% extends '/etc/passwd' %}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ messages.pop() }}",
])
def test_chat_templates_reach_no_file_nor_python_internals(tmp_path, template):
    """A stranger's template is rendered in jinja2's immutable sandbox with no loader: reading a file,
    reaching a module through an object's attributes, or changing the messages is a one-line error."""
    from clusterfuse.models.tokenizer import Tokenizer

    _tokenizer_dir(tmp_path, {"chat_template": template})
    refused = r"^chat template: rendering failed \((TypeError: no loader|SecurityError)"
    with pytest.raises(TokenizerError, match=refused):
        Tokenizer.from_hf_dir(tmp_path).apply_chat_template([{"role": "user", "content": "a"}])


def test_ordinary_chat_template_still_renders(tmp_path):
    from clusterfuse.models.tokenizer import Tokenizer

    _tokenizer_dir(tmp_path, {"chat_template": "{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}|"
                                                "{% endfor %}{{ '%d' % 12345678 }}{{ 'ab'|center(6) }}"})
    text = Tokenizer.from_hf_dir(tmp_path).apply_chat_template([{"role": "user", "content": "call 12345678"}])
    assert text == "user:call 12345678|12345678  ab  "
