"""Load a GGUF file (llama.cpp's format) as a ``ModelConfig`` plus our HF-named weight dict.

Three things differ from a Hugging Face checkpoint, and all are undone here:

* **Names.**  ``blk.{i}.attn_q.weight`` etc. are mapped to HF names (``_LAYER_NAMES``).
* **Shapes.**  GGUF lists dimensions in ggml ``ne`` order, fastest first: a HF
  ``(out, in)`` matrix is stored as ``ne = [in, out]``.  ``ReaderTensor.shape`` is the
  ``ne`` list, so the HF shape is ``reversed(tensor.shape)``; the bytes are the same
  row-major layout, so no transpose is needed.
* **RoPE row order (llama arch only).**  llama.cpp's converter permutes the rows of
  ``attn_q`` / ``attn_k`` of each head from HF's "rotate half" layout to the interleaved
  pairs ggml's rope kernel wants; ``_unpermute_rope_rows`` inverts it (with ``n_head``
  for q and ``n_head_kv`` for k).  ``qwen2``, ``qwen3`` and ``deepseek2`` files are not permuted.

Quantised tensors are dequantised with ``gguf.quants.dequantize`` (F32, F16, BF16,
Q8_0, Q4_0, Q4_1, K-quants... whatever the installed ``gguf`` supports) to float32, then
cast to the target dtype (default float32: ``dtype=None``) on the target device.

DeepSeek-V2 (``deepseek2``): the fused 3-D expert tensors ``ffn_*_exps`` are split into
our per-expert names, and files from newer converters that split ``kv_b`` into
``attn_k_b`` / ``attn_v_b`` are joined back.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGUFReader
from tqdm import tqdm

from clusterfuse.models.config import ConfigError, MLAConfig, ModelConfig, MoEConfig, RopeConfig
from clusterfuse.models.validate import check_gguf_file, config_bool, config_float, config_int
from clusterfuse.models.weights import WeightsError, validate_weights

#: GGUF ``general.architecture`` → Hugging Face class name.
GGUF_ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "deepseek2": "DeepseekV2ForCausalLM",
}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

#: ``blk.{i}.<key>`` → ``model.layers.{i}.<value>`` (suffix ``.weight`` / ``.bias`` kept).
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",  # qwen3: per-head RMSNorm of q and k
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    # deepseek2 (MLA + MoE)
    "attn_q_a": "self_attn.q_a_proj",
    "attn_q_a_norm": "self_attn.q_a_layernorm",
    "attn_q_b": "self_attn.q_b_proj",
    "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
    "attn_kv_a_norm": "self_attn.kv_a_layernorm",
    "attn_kv_b": "self_attn.kv_b_proj",
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_shexp": "mlp.shared_experts.gate_proj",
    "ffn_up_shexp": "mlp.shared_experts.up_proj",
    "ffn_down_shexp": "mlp.shared_experts.down_proj",
}
_EXPERT_NAMES = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
_SPLIT_KV_B = ("attn_k_b", "attn_v_b")  # newer llama.cpp deepseek2 files
_SKIPPED = {"rope_freqs.weight"}  # read into the config (Llama-3 rope scaling), not a parameter

_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_MISSING = object()


# ---------------------------------------------------------------------------------------------- files
def open_gguf(path: str | Path) -> GGUFReader:
    """A ``GGUFReader`` over ``path`` (memory-mapped); unreadable files become a ``WeightsError``."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such GGUF file")
    check_gguf_file(path)  # counts and byte ranges bounded by the file before the reader allocates
    try:
        return GGUFReader(path)
    except Exception as e:  # gguf raises ValueError, struct errors, IndexError on truncation
        raise WeightsError(f"{path}: not a readable GGUF file (truncated or corrupt?): {e}") from e


def gguf_field(reader: GGUFReader, key: str, default: Any = _MISSING) -> Any:
    """The value of metadata ``key`` as a Python object (str, int, float, bool, list)."""
    f = reader.fields.get(key)
    if f is None:
        if default is _MISSING:
            raise ConfigError(f"GGUF metadata: missing required field {key!r}")
        return default
    return f.contents()


# --------------------------------------------------------------------------------------------- config
def config_from_gguf(reader: GGUFReader, name: str = "") -> ModelConfig:
    """``ModelConfig`` from GGUF metadata (``llama``, ``qwen2``, ``qwen3`` and ``deepseek2`` architectures)."""
    arch = gguf_field(reader, "general.architecture")
    if not isinstance(arch, str) or arch not in GGUF_ARCHITECTURES:
        raise ConfigError(f"GGUF general.architecture: unsupported architecture {arch!r:.80}; "
                          f"supported: {', '.join(GGUF_ARCHITECTURES)}")
    key = _MetadataReader(reader, arch)

    tensor_names = {t.name for t in reader.tensors}
    heads = key.integer(gguf.Keys.Attention.HEAD_COUNT)
    hidden = key.integer(gguf.Keys.LLM.EMBEDDING_LENGTH)
    tokens = gguf_field(reader, gguf.Keys.Tokenizer.LIST, None)
    if tokens is not None:
        if not isinstance(tokens, list):
            raise ConfigError(f"GGUF {gguf.Keys.Tokenizer.LIST}: expected an array of strings")
        vocab = config_int(len(tokens), "vocab_size")
    elif key(gguf.Keys.LLM.VOCAB_SIZE, None) is not None:
        vocab = key.integer(gguf.Keys.LLM.VOCAB_SIZE)
    else:
        vocab = config_int(hf_shape(_tensor(reader, "token_embd.weight"))[0], "vocab_size")
    eos = [gguf_field(reader, k, None) for k in (gguf.Keys.Tokenizer.EOS_ID, gguf.Keys.Tokenizer.EOT_ID)]
    bos = gguf_field(reader, gguf.Keys.Tokenizer.BOS_ID, None)
    common: dict[str, Any] = dict(
        architecture=GGUF_ARCHITECTURES[arch],
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=key.integer(gguf.Keys.LLM.FEED_FORWARD_LENGTH),
        num_hidden_layers=key.integer(gguf.Keys.LLM.BLOCK_COUNT),
        num_attention_heads=heads,
        rms_norm_eps=_f32(key.number(gguf.Keys.Attention.LAYERNORM_RMS_EPS, 1e-5)),
        max_position_embeddings=key.integer(gguf.Keys.LLM.CONTEXT_LENGTH, 4096),
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=None if bos is None else config_int(bos, gguf.Keys.Tokenizer.BOS_ID, minimum=0),
        eos_token_ids=tuple(dict.fromkeys(config_int(e, k, minimum=0) for e, k in zip(
            eos, (gguf.Keys.Tokenizer.EOS_ID, gguf.Keys.Tokenizer.EOT_ID), strict=True) if e is not None)),
        name=name or str(gguf_field(reader, "general.name", "")),
    )
    if arch == "deepseek2":
        return _deepseek2_config(key, common)
    head_dim = key.integer(gguf.Keys.Attention.KEY_LENGTH, max(hidden // heads, 1))
    # llama.cpp's converter writes the window only for some architectures; a Mistral-v0.1 file
    # (arch llama) carries none and llama.cpp itself then attends to the whole context.
    window = key(gguf.Keys.Attention.SLIDING_WINDOW, None)
    return ModelConfig(
        family="llama",
        num_key_value_heads=key.integer(gguf.Keys.Attention.HEAD_COUNT_KV, heads),
        head_dim=head_dim,
        rope=_rope_config(reader, key, head_dim),
        attention_bias=arch == "qwen2",
        qk_norm=arch == "qwen3",
        sliding_window=None if window is None else key.integer(gguf.Keys.Attention.SLIDING_WINDOW),
        **common,
    )


class _MetadataReader:
    """``key(name, default)``: the raw value of ``{arch}``-templated metadata; ``key.integer`` / ``key.number`` /
    ``key.flag`` / ``key.text`` check its type and range and name the GGUF key in the error
    (``llama.block_count: ...``)."""

    def __init__(self, reader: GGUFReader, arch: str) -> None:
        self.reader, self.arch = reader, arch

    def __call__(self, k: str, default: Any = _MISSING) -> Any:
        return gguf_field(self.reader, k.format(arch=self.arch), default)

    def integer(self, k: str, default: Any = _MISSING, minimum: int = 1) -> int:
        return config_int(self(k, default), k.format(arch=self.arch), minimum=minimum)

    def number(self, k: str, default: Any = _MISSING, minimum: float = 0.0, inclusive: bool = False) -> float:
        return config_float(self(k, default), k.format(arch=self.arch), minimum=minimum, inclusive=inclusive)

    def flag(self, k: str, default: Any = _MISSING) -> bool:
        return config_bool(self(k, default), k.format(arch=self.arch))

    def text(self, k: str, default: Any = _MISSING) -> str:
        value = self(k, default)
        if not isinstance(value, str):
            raise ConfigError(f"{k.format(arch=self.arch)}: expected a string, got {value!r:.80}")
        return value


def _f32(value: Any) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.999999747378752e-06)."""
    return float(f"{float(value):.7g}")


def _rope_config(reader: GGUFReader, key: _MetadataReader, head_dim: int) -> RopeConfig:
    theta = _f32(key.number(gguf.Keys.Rope.FREQ_BASE, 10000.0))
    kind = key.text(gguf.Keys.Rope.SCALING_TYPE, "none")
    factor = key.number(gguf.Keys.Rope.SCALING_FACTOR, 1.0)
    orig = key.integer(gguf.Keys.Rope.SCALING_ORIG_CTX_LEN, None) if key(gguf.Keys.Rope.SCALING_ORIG_CTX_LEN,
                                                                    None) is not None else None
    if "rope_freqs.weight" in {t.name for t in reader.tensors}:
        return _llama3_rope_from_freqs(reader, theta, head_dim, orig)
    if kind in ("none", "") or factor == 1.0:
        return RopeConfig(theta=theta)
    if kind == "linear":
        return RopeConfig(theta=theta, kind="linear", factor=factor)
    if kind == "yarn":
        log_mul = key.number(gguf.Keys.Rope.SCALING_YARN_LOG_MUL, 0.0, inclusive=True)
        return RopeConfig(
            theta=theta, kind="yarn", factor=factor, original_max_position_embeddings=orig,
            beta_fast=key.number(gguf.Keys.Rope.SCALING_YARN_BETA_FAST, 32.0),
            beta_slow=key.number(gguf.Keys.Rope.SCALING_YARN_BETA_SLOW, 1.0),
            # llama.cpp stores 0.1 * mscale_all_dim; HF's DeepSeek configs use mscale == mscale_all_dim
            mscale=log_mul / 0.1 if log_mul else 1.0, mscale_all_dim=log_mul / 0.1)
    raise ConfigError(f"GGUF rope.scaling.type: unsupported rope scaling {kind!r} (supported: none, linear, yarn)")


def llama3_rope_factors(theta: float, head_dim: int, factor: float, low_freq_factor: float = 1.0,
                        high_freq_factor: float = 4.0, original_max_position_embeddings: int = 8192) -> np.ndarray:
    """The per-frequency divisors llama.cpp writes as ``rope_freqs.weight`` for Llama-3.1 scaling."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    low_wl = original_max_position_embeddings / low_freq_factor
    high_wl = original_max_position_embeddings / high_freq_factor
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < high_wl, 1.0, np.where(wavelen > low_wl, factor, mid))


def _llama3_rope_from_freqs(reader: GGUFReader, theta: float, head_dim: int, orig: int | None) -> RopeConfig:
    """GGUF stores Llama-3.1 rope scaling only as the ``rope_freqs`` tensor; recover the parameters by
    matching it against the published ones (low 1, high 4, original context 8192)."""
    t = _tensor(reader, "rope_freqs.weight")
    got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1).astype(np.float64)
    factor = float(got.max())
    params = dict(factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                  original_max_position_embeddings=orig or 8192)
    if got.shape != (head_dim // 2,) or not np.allclose(got, llama3_rope_factors(theta, head_dim, **params),
                                                         rtol=1e-3):
        raise ConfigError("GGUF rope_freqs.weight: per-frequency rope factors that are not Llama-3.1 scaling "
                          f"with {params}; unsupported")
    return RopeConfig(theta=theta, kind="llama3", **params)


def _deepseek2_config(key: _MetadataReader, common: dict[str, Any]) -> ModelConfig:
    heads = common["num_attention_heads"]
    rope_dim = key.integer(gguf.Keys.Rope.DIMENSION_COUNT)
    # newer converters store the MLA head sizes as *_mla and the latent sizes in key/value_length
    if key(gguf.Keys.Attention.KEY_LENGTH_MLA, None):
        qk_head = key.integer(gguf.Keys.Attention.KEY_LENGTH_MLA)
    else:
        qk_head = key.integer(gguf.Keys.Attention.KEY_LENGTH)
    if key(gguf.Keys.Attention.VALUE_LENGTH_MLA, None):
        v_head = key.integer(gguf.Keys.Attention.VALUE_LENGTH_MLA)
    else:
        v_head = key.integer(gguf.Keys.Attention.VALUE_LENGTH)
    q_lora = key.integer(gguf.Keys.Attention.Q_LORA_RANK, 0, minimum=0)
    mla = MLAConfig(kv_lora_rank=key.integer(gguf.Keys.Attention.KV_LORA_RANK), qk_nope_head_dim=qk_head - rope_dim,
                    qk_rope_head_dim=rope_dim, v_head_dim=v_head, q_lora_rank=q_lora or None)
    moe = None
    experts = key.integer(gguf.Keys.LLM.EXPERT_COUNT, 0, minimum=0)
    if experts:
        groups = key.integer(gguf.Keys.LLM.EXPERT_GROUP_COUNT, 0, minimum=0)
        gating = key.integer(gguf.Keys.LLM.EXPERT_GATING_FUNC, 1, minimum=0)
        moe = MoEConfig(
            n_routed_experts=experts,
            num_experts_per_tok=key.integer(gguf.Keys.LLM.EXPERT_USED_COUNT),
            moe_intermediate_size=key.integer(gguf.Keys.LLM.EXPERT_FEED_FORWARD_LENGTH),
            n_shared_experts=key.integer(gguf.Keys.LLM.EXPERT_SHARED_COUNT, 0, minimum=0),
            first_k_dense_replace=key.integer(gguf.Keys.LLM.LEADING_DENSE_BLOCK_COUNT, 0, minimum=0),
            routed_scaling_factor=key.number(gguf.Keys.LLM.EXPERT_WEIGHTS_SCALE, 1.0),
            norm_topk_prob=key.flag(gguf.Keys.LLM.EXPERT_WEIGHTS_NORM, False),
            topk_method="group_limited_greedy" if groups > 1 else "greedy",
            n_group=groups if groups > 1 else None,
            topk_group=key.integer(gguf.Keys.LLM.EXPERT_GROUP_USED_COUNT) if groups > 1 else None,
            scoring_func="sigmoid" if gating == 2 else "softmax",
        )
    return ModelConfig(
        family="deepseek_v2",
        num_key_value_heads=heads,  # MLA: every head has its own (absorbed) K/V, as in HF's config
        head_dim=mla.v_head_dim,
        rope=_rope_config_deepseek(key),
        mla=mla,
        moe=moe,
        **common,
    )


def _rope_config_deepseek(key: _MetadataReader) -> RopeConfig:
    theta = _f32(key.number(gguf.Keys.Rope.FREQ_BASE, 10000.0))
    if key.text(gguf.Keys.Rope.SCALING_TYPE, "none") != "yarn":
        return RopeConfig(theta=theta)
    log_mul = key.number(gguf.Keys.Rope.SCALING_YARN_LOG_MUL, 0.0, inclusive=True)
    orig = key(gguf.Keys.Rope.SCALING_ORIG_CTX_LEN, None)
    return RopeConfig(theta=theta, kind="yarn", factor=key.number(gguf.Keys.Rope.SCALING_FACTOR, 1.0),
                      original_max_position_embeddings=(key.integer(gguf.Keys.Rope.SCALING_ORIG_CTX_LEN)
                                                        if orig is not None else None),
                      beta_fast=key.number(gguf.Keys.Rope.SCALING_YARN_BETA_FAST, 32.0),
                      beta_slow=key.number(gguf.Keys.Rope.SCALING_YARN_BETA_SLOW, 1.0),
                      mscale=log_mul / 0.1 if log_mul else 1.0, mscale_all_dim=log_mul / 0.1)


# -------------------------------------------------------------------------------------------- tensors
def _tensor(reader: GGUFReader, name: str) -> Any:
    for t in reader.tensors:
        if t.name == name:
            return t
    raise WeightsError(f"missing tensor {name!r}")


def hf_shape(tensor: Any) -> tuple[int, ...]:
    """The row-major (PyTorch / HF) shape of a GGUF tensor: its ``ne`` dimensions reversed."""
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


def _unpermute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Invert llama.cpp's ``permute`` of q/k rows (interleaved pairs → HF rotate-half halves), per head."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _convert(name: str, t: torch.Tensor, arch: str, config: ModelConfig) -> dict[str, torch.Tensor]:
    """One GGUF tensor (already in HF shape) → the HF-named tensor(s) it holds."""
    if name in _GLOBAL_NAMES:
        return {_GLOBAL_NAMES[name]: t}
    m = _BLOCK.match(name)
    if m is None:
        raise WeightsError(f"unexpected tensor {name!r} (no mapping for architecture {arch!r})")
    layer, part, kind = m.groups()
    p = f"model.layers.{layer}."
    if part in _EXPERT_NAMES and kind == "weight":
        # Checked before the split: a tensor of other rank would be cut into one "expert" per row,
        # millions of them for a file of a few MB.
        experts = config.moe.n_routed_experts if config.moe is not None else 0
        if t.dim() != 3 or t.shape[0] != experts:
            raise WeightsError(f"tensor {name!r}: expected {experts} experts stacked as a 3-D tensor, "
                               f"got shape {tuple(t.shape)}")
        return {f"{p}mlp.experts.{e}.{_EXPERT_NAMES[part]}.weight": t[e] for e in range(experts)}
    if part in _SPLIT_KV_B:
        return {f"{p}self_attn.kv_b_proj.weight#{part}": t}  # joined by _join_split_kv_b
    if part not in _LAYER_NAMES:
        raise WeightsError(f"unexpected tensor {name!r} (no mapping for architecture {arch!r})")
    if arch == "llama" and part in ("attn_q", "attn_k"):
        t = _unpermute_rope_rows(t, config.num_attention_heads if part == "attn_q" else config.num_key_value_heads)
    return {f"{p}{_LAYER_NAMES[part]}.{kind}": t}


def _join_split_kv_b(weights: dict[str, torch.Tensor], config: ModelConfig) -> None:
    """Rebuild ``kv_b_proj`` from llama.cpp's ``attn_k_b`` (heads, kv_lora, nope) and ``attn_v_b``
    (heads, v, kv_lora); dropped when the file also holds ``attn_kv_b``."""
    for name in [n for n in weights if n.endswith("#attn_k_b")]:
        base = name[: -len("#attn_k_b")]
        k_b = weights.pop(name)
        v_b = weights.pop(base + "#attn_v_b", None)
        if base in weights:
            continue
        if v_b is None:
            raise WeightsError(f"{base} has attn_k_b but no attn_v_b")
        n, mla = config.num_attention_heads, config.mla
        if mla is None:
            raise WeightsError(f"{base}: attn_k_b / attn_v_b in a model without MLA")
        for part, t, shape in (("attn_k_b", k_b, (n, mla.kv_lora_rank, mla.qk_nope_head_dim)),
                               ("attn_v_b", v_b, (n, mla.v_head_dim, mla.kv_lora_rank))):
            if tuple(t.shape) != shape:
                raise WeightsError(f"tensor {part} of {base}: wrong shape, expected {shape}, got {tuple(t.shape)}")
        weights[base] = torch.cat([k_b.transpose(1, 2), v_b], dim=1).reshape(n * (k_b.shape[2] + v_b.shape[1]), -1)
    for name in [n for n in weights if "#" in n]:
        raise WeightsError(f"{name.split('#')[1]} of {name.split('#')[0]} without its partner")


def load_gguf_weights(reader: GGUFReader, config: ModelConfig, *, device: str | torch.device = "cpu",
                      dtype: torch.dtype | None = None, progress: bool = True) -> dict[str, torch.Tensor]:
    """Dequantise every tensor of ``reader`` into our HF-named weight dict on ``device``.

    Names and shapes are checked first on ``meta`` tensors (no data read), so a file that does not
    fit ``config`` fails before any dequantisation.  ``dtype=None`` → float32.  Errors name the file.
    """
    try:
        return _load_gguf_weights(reader, config, device, dtype, progress)
    except WeightsError as e:
        raise WeightsError(f"{getattr(reader.data, 'filename', None) or 'GGUF'}: {e}") from e


def _load_gguf_weights(reader: GGUFReader, config: ModelConfig, device: str | torch.device,
                       dtype: torch.dtype | None, progress: bool) -> dict[str, torch.Tensor]:
    arch = gguf_field(reader, "general.architecture")
    dtype = dtype or torch.float32
    tensors = [t for t in reader.tensors if t.name not in _SKIPPED]

    planned: dict[str, torch.Tensor] = {}
    for t in tensors:
        planned.update(_convert(t.name, torch.empty(hf_shape(t), device="meta"), arch, config))
    _join_split_kv_b(planned, config)
    validate_weights(config, planned)

    weights: dict[str, torch.Tensor] = {}
    for t in tqdm(tensors, desc="loading GGUF", unit="tensor", file=sys.stderr, disable=not progress):
        try:
            data = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise WeightsError(f"tensor {t.name!r}: quantisation {t.tensor_type.name} not supported "
                               f"by the installed gguf package ({e})") from e
        except Exception as e:
            raise WeightsError(f"tensor {t.name!r}: cannot read data (truncated or corrupt?): {e}") from e
        array = np.ascontiguousarray(data, dtype=np.float32).reshape(hf_shape(t))
        if not array.flags.writeable:  # F32 tensors come back as views of the read-only memory map
            array = array.copy()
        for name, value in _convert(t.name, torch.from_numpy(array), arch, config).items():
            weights[name] = value.to(device=device, dtype=dtype)
    _join_split_kv_b(weights, config)
    validate_weights(config, weights)
    return weights
