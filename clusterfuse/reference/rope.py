"""Rotary position embeddings: frequency tables for every rope kind we run, and their application.

The tables follow Hugging Face ``transformers`` (``modeling_rope_utils``) operation for
operation in float32, so that the reference matches it to rounding.  Like HF, the
"attention factor" of a rope kind (YaRN's magnitude correction; 1 for the others) is
folded into the cos/sin tables; the separate *softmax-scale* correction DeepSeek-V2
applies on top of that is `yarn_softmax_scale_factor`.

Two layouts of the rotated vector exist in the wild:

* **rotate-half** (Llama, Mistral, Qwen2): pair ``i`` is ``(x[i], x[i + d/2])``;
* **interleaved** (DeepSeek-V2, complex-number form): pair ``i`` is ``(x[2i], x[2i+1])``.
"""

from __future__ import annotations

import math

import torch

from clusterfuse.models.config import RopeConfig


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction ``0.1 * mscale * ln(scale) + 1`` (1 when not extending)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _default_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim))


def _llama3_inv_freq(rope: RopeConfig, dim: int) -> torch.Tensor:
    """Llama-3.1: keep high frequencies, divide low ones by ``factor``, blend in between."""
    if rope.original_max_position_embeddings is None:
        raise ValueError("rope: kind 'llama3' needs original_max_position_embeddings")
    inv_freq = _default_inv_freq(rope.theta, dim)
    old_len = rope.original_max_position_embeddings
    low_freq_wavelen = old_len / rope.low_freq_factor
    high_freq_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(rope: RopeConfig, dim: int) -> torch.Tensor:
    """YaRN (as DeepSeek-V2 uses it): interpolate low frequencies, extrapolate high ones,
    linear ramp between the dimensions set by ``beta_fast`` / ``beta_slow`` (truncated to integers)."""
    if rope.original_max_position_embeddings is None:
        raise ValueError("rope: kind 'yarn' needs original_max_position_embeddings")
    base, orig = rope.theta, rope.original_max_position_embeddings

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(rope.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rope.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # as HF: avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    pos_freqs = base ** (torch.arange(0, dim, 2).to(torch.float32) / dim)
    extrapolated = 1.0 / pos_freqs
    interpolated = 1.0 / (rope.factor * pos_freqs)
    return interpolated * (1 - extrapolation_weight) + extrapolated * extrapolation_weight


def rope_inv_freq(rope: RopeConfig, rotary_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[rotary_dim / 2]`` (fp32, CPU) and the attention factor that
    multiplies cos and sin (YaRN's ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)``)."""
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"rotary_dim: expected a positive even integer, got {rotary_dim}")
    if rope.kind == "default":
        return _default_inv_freq(rope.theta, rotary_dim), 1.0
    if rope.kind == "linear":
        return _default_inv_freq(rope.theta, rotary_dim) / rope.factor, 1.0
    if rope.kind == "llama3":
        return _llama3_inv_freq(rope, rotary_dim), 1.0
    if rope.kind == "yarn":
        if rope.mscale and rope.mscale_all_dim:
            factor = _yarn_mscale(rope.factor, rope.mscale) / _yarn_mscale(rope.factor, rope.mscale_all_dim)
        else:
            factor = _yarn_mscale(rope.factor)
        return _yarn_inv_freq(rope, rotary_dim), float(factor)
    raise ValueError(f"rope.kind: expected one of default, linear, llama3, yarn, got {rope.kind!r}")


def rope_cos_sin(
    rope: RopeConfig, rotary_dim: int, max_positions: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables ``[max_positions, rotary_dim / 2]`` in fp32: row ``p`` holds
    ``cos(p * inv_freq) * attention_factor`` (and likewise sin) — the half-width form that
    both rope layouts and the fused kernels consume."""
    if max_positions <= 0:
        raise ValueError(f"max_positions: expected a positive integer, got {max_positions}")
    inv_freq, attention_factor = rope_inv_freq(rope, rotary_dim)
    positions = torch.arange(max_positions, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)
    cos = freqs.cos() * attention_factor
    sin = freqs.sin() * attention_factor
    return cos.to(device), sin.to(device)


def yarn_softmax_scale_factor(rope: RopeConfig) -> float:
    """Multiplier of DeepSeek-V2's softmax scale ``qk_head_dim ** -0.5``: ``mscale(factor,
    mscale_all_dim) ** 2`` for a scaled rope with ``mscale_all_dim`` set, else 1.

    YaRN stretches the logits' temperature; DeepSeek corrects it here rather than in cos/sin
    (HF ``yarn_apply_mscale``, which applies it for any non-default rope kind)."""
    if rope.kind == "default" or not rope.mscale_all_dim:
        return 1.0
    m = _yarn_mscale(rope.factor, rope.mscale_all_dim)
    return m * m


def apply_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, *, interleaved: bool
) -> torch.Tensor:
    """Rotate ``x [B, heads, T, rotary_dim]`` at ``positions [B, T]``; returns fp32.

    ``cos``/``sin`` are `rope_cos_sin` tables.  ``interleaved`` picks the pair layout
    (module docstring); the output keeps the input's layout.
    """
    half = x.shape[-1] // 2
    if cos.shape[-1] != half:
        raise ValueError(f"cos: expected last dimension {half} (rotary_dim / 2), got {cos.shape[-1]}")
    c = cos[positions].unsqueeze(1)  # [B, 1, T, half]
    s = sin[positions].unsqueeze(1)
    x = x.float()
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
