"""Bytes a decode-time block must move through HBM at least once: the memory floor.

A decode step at batch 1-16 is memory bound, so its floor is
``bytes that must be read (and written) once / measured bandwidth``.  The functions
here count those bytes per component (a `ByteCount`) so that a benchmark can state
exactly what its floor includes.

What is counted (``seq_len`` = tokens already in the KV cache *before* the step):

* ``weights``: every projection matrix the block multiplies by (plus biases where the
  config has them), read once whatever the batch.
* ``norms``: RMSNorm weight vectors.
* ``kv_read``: the cached K and V of every sequence (``seq_len`` tokens each).
* ``kv_write``: appending the new token's K and V (one token per sequence).
* ``activations``: the block's input read and output written (``batch × hidden``);
  for the whole step, the embedding rows of the input tokens.  Intermediates between
  fused phases are not counted: a fused kernel keeps them on chip.

The baselines measured before the kernels existed (the anchors; bench/README.md) counted, by block:

* attention block: ``weights + kv_read`` (W_qkv, W_o, cached KV; no norm, no append);
* FFN block: ``weights`` (gate, up, down) only;
* MLA block: ``weights + kv_read + kv_write``;
* decode step: ``weights + norms`` ("weight_GB", LM head included, embedding table
  excluded: only B rows of it are read) and ``kv_read + kv_write`` ("kv_GB").

``ByteCount.total`` counts everything; the extra pieces change the large-model floors
by well under 0.1%.  `tests/test_bench_common.py` pins the anchors' numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

from clusterfuse.models.config import ModelConfig

#: ``seq_len`` arguments: one length for every sequence, or one per sequence.
SeqLens = int | Sequence[int]


@dataclass(frozen=True)
class ByteCount:
    """HBM bytes of one block call, by component (see the module docstring)."""

    weights: int = 0
    norms: int = 0
    kv_read: int = 0
    kv_write: int = 0
    activations: int = 0

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))

    @property
    def kv(self) -> int:
        return self.kv_read + self.kv_write

    def __add__(self, other: ByteCount) -> ByteCount:
        return ByteCount(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def __mul__(self, n: int) -> ByteCount:
        return ByteCount(**{f.name: getattr(self, f.name) * n for f in fields(self)})

    __rmul__ = __mul__

    def as_dict(self) -> dict[str, int]:
        """Components plus ``total``, for the extras of a result record."""
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, "total": self.total}


def floor_us(nbytes: int | ByteCount, bandwidth_GBs: float) -> float:
    """Time to move ``nbytes`` at ``bandwidth_GBs`` (10^9 bytes/s), in microseconds."""
    n = nbytes.total if isinstance(nbytes, ByteCount) else nbytes
    return n / (bandwidth_GBs * 1e9) * 1e6


def _seq_lens(batch: int, seq_len: SeqLens) -> list[int]:
    if isinstance(seq_len, int):
        return [seq_len] * batch
    lens = list(seq_len)
    if len(lens) != batch:
        raise ValueError(f"seq_len: expected {batch} lengths (one per sequence), got {len(lens)}")
    return lens


def attention_block_bytes(config: ModelConfig, batch: int, seq_len: SeqLens, dtype_bytes: int = 2) -> ByteCount:
    """Llama-style (MHA/GQA) attention block: RMSNorm → QKV → RoPE → KV append → attention → O-proj;
    with QK-norm its two head_dim weights, with a sliding window W only the last W - 1 cached rows
    read per sequence (the new token is the window's last row)."""
    if config.mla is not None:
        return mla_block_bytes(config, batch, seq_len, dtype_bytes)
    h, d = config.hidden_size, config.head_dim
    q_dim, kv_dim = config.num_attention_heads * d, config.num_key_value_heads * d
    qkv_out = q_dim + 2 * kv_dim
    weights = h * qkv_out + q_dim * h + (qkv_out if config.attention_bias else 0)
    lens = _seq_lens(batch, seq_len)
    window = config.sliding_window
    tokens = sum(lens if window is None else (min(s, window - 1) for s in lens))
    return ByteCount(
        weights=weights * dtype_bytes,
        norms=(h + (2 * d if config.qk_norm else 0)) * dtype_bytes,
        kv_read=2 * kv_dim * tokens * dtype_bytes,
        kv_write=2 * kv_dim * batch * dtype_bytes,
        activations=2 * batch * h * dtype_bytes,
    )


def mla_block_bytes(config: ModelConfig, batch: int, seq_len: SeqLens, dtype_bytes: int = 2) -> ByteCount:
    """DeepSeek-V2 MLA attention block in absorbed decode form: the cache holds one latent
    (``kv_lora_rank``) plus one shared RoPE key (``qk_rope_head_dim``) per token."""
    mla = config.mla
    if mla is None:
        raise ValueError(f"{config.name or 'config'}: not an MLA model")
    h, heads = config.hidden_size, config.num_attention_heads
    q_out = heads * mla.qk_head_dim
    if mla.q_lora_rank is None:
        q_weights, q_norms = h * q_out, 0
    else:
        q_weights, q_norms = h * mla.q_lora_rank + mla.q_lora_rank * q_out, mla.q_lora_rank
    latent = mla.kv_lora_rank + mla.qk_rope_head_dim
    weights = (q_weights
               + h * latent  # kv_a_proj_with_mqa
               + mla.kv_lora_rank * heads * (mla.qk_nope_head_dim + mla.v_head_dim)  # kv_b_proj
               + heads * mla.v_head_dim * h)  # o_proj
    tokens = sum(_seq_lens(batch, seq_len))
    return ByteCount(
        weights=weights * dtype_bytes,
        norms=(h + mla.kv_lora_rank + q_norms) * dtype_bytes,
        kv_read=latent * tokens * dtype_bytes,
        kv_write=latent * batch * dtype_bytes,
        activations=2 * batch * h * dtype_bytes,
    )


def ffn_block_bytes(config: ModelConfig, batch: int, dtype_bytes: int = 2,
                    intermediate_size: int | None = None) -> ByteCount:
    """Dense SwiGLU FFN block: RMSNorm → gate/up → SiLU·up → down → residual add."""
    h = config.hidden_size
    inter = intermediate_size or config.intermediate_size
    return ByteCount(
        weights=3 * h * inter * dtype_bytes,
        norms=h * dtype_bytes,
        activations=2 * batch * h * dtype_bytes,
    )


def _moe_ffn_bytes(config: ModelConfig, batch: int, dtype_bytes: int) -> ByteCount:
    """A MoE layer reads the shared experts and, at worst, ``batch × top-k`` distinct routed
    experts (capped at all of them); the router matrix is read whole."""
    moe = config.moe
    assert moe is not None
    routed = min(moe.n_routed_experts, batch * moe.num_experts_per_tok)
    experts = ffn_block_bytes(config, batch, dtype_bytes, moe.moe_intermediate_size)
    per_expert = ByteCount(weights=experts.weights)
    router = ByteCount(weights=config.hidden_size * moe.n_routed_experts * dtype_bytes)
    dense_part = ByteCount(norms=experts.norms, activations=experts.activations)
    return dense_part + router + per_expert * (routed + moe.n_shared_experts)


def moe_block_bytes(config: ModelConfig, batch: int, experts_read: int, dtype_bytes: int = 2) -> ByteCount:
    """The fused MoE block as one launch reads it: the router matrix, the shared experts and the
    ``experts_read`` routed experts the batch chose (their union: each read once), plus the norm
    weight, x and the residual / output. `_moe_ffn_bytes` is its worst case (every choice distinct)."""
    moe = config.moe
    assert moe is not None
    expert = ffn_block_bytes(config, batch, dtype_bytes, moe.moe_intermediate_size)
    return ByteCount(weights=config.hidden_size * moe.n_routed_experts * dtype_bytes
                     + expert.weights * (experts_read + moe.n_shared_experts),
                     norms=expert.norms, activations=expert.activations)


def decode_step_bytes(config: ModelConfig, batch: int, seq_len: SeqLens, dtype_bytes: int = 2) -> ByteCount:
    """One whole decode step: every layer's attention and FFN block, the final norm, the LM
    head and the input tokens' embedding rows (not the whole embedding table).

    For Llama-2-7B at S=1024 in fp16: ``weights + norms`` = 13 214 687 232 bytes and
    ``kv`` = 537 395 200 bytes, the anchors' ``weight_GB`` and ``kv_GB``.
    """
    h = config.hidden_size
    total = ByteCount()
    for layer in range(config.num_hidden_layers):
        attention = attention_block_bytes(config, batch, seq_len, dtype_bytes)
        if config.moe is not None and config.moe.is_moe_layer(layer):
            ffn = _moe_ffn_bytes(config, batch, dtype_bytes)
        else:
            ffn = ffn_block_bytes(config, batch, dtype_bytes)
        # Between fused blocks the residual stream makes a round trip through HBM; only the
        # step's input (embedding rows) is a read that no kernel can avoid, so drop the rest.
        total += ByteCount(attention.weights, attention.norms, attention.kv_read, attention.kv_write)
        total += ByteCount(ffn.weights, ffn.norms)
    lm_head = config.vocab_size * h * dtype_bytes
    return total + ByteCount(weights=lm_head, norms=h * dtype_bytes, activations=batch * h * dtype_bytes)


def kv_cache_bytes(config: ModelConfig, tokens: int, dtype_bytes: int = 2) -> int:
    """Bytes of a KV cache holding ``tokens`` tokens over all layers (to size allocations)."""
    per_token = attention_block_bytes(config, 1, 0, dtype_bytes).kv_write
    return per_token * tokens * config.num_hidden_layers

