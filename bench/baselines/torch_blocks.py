"""The fair PyTorch baselines for one decoder block at decode time (one new token per sequence).

"Fair" means the strongest *simple* PyTorch: cuBLAS GEMMs with fused QKV and gate/up
weights, the fused ``F.rms_norm``, SDPA (flash decoding) with native GQA, a static
contiguous KV cache appended in place, and the whole block captured in one CUDA graph
by the harness (`bench.common.time_cuda_graph`).  DESIGN.md measured this on an H100:
Llama-2-7B attention block 114 µs at S=1024 (fp16), FFN block 127 µs at batch 1 (bf16).

Blocks are plain objects holding random weights (never zeros) and a callable
``block(x) -> out`` with static shapes, so ``lambda: block(x)`` can be captured.
`DecodePositions` holds the per-sequence lengths; blocks of one model share it (see
`bench.baselines.gpt_fast_decode`).  Weight layouts are ``nn.Linear``'s ``[out, in]``;
``w_qkv`` is ``cat(q_proj, k_proj, v_proj)`` and ``w_gate_up`` is ``cat(gate_proj, up_proj)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from clusterfuse.models.config import ModelConfig
from clusterfuse.reference.rope import rope_cos_sin

Device = torch.device | str


def rope_tables(config: ModelConfig, capacity: int, device: Device) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin`` tables, float32 ``[capacity, head_dim]``: the reference's half-width
    tables (`clusterfuse.reference.rope`) with each half repeated, the "rotate_half" layout."""
    if config.rope.kind not in ("default", "linear", "llama3"):
        raise ValueError(f"rope: the torch baselines run rotate-half rope kinds, not {config.rope.kind!r}")
    cos, sin = rope_cos_sin(config.rope, config.head_dim, capacity, device)
    return torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, heads, d]`` by per-sequence ``cos``/``sin [B, 1, d]``; float32 math, like gpt-fast."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


def random_tensor(gen: torch.Generator, shape: tuple[int, ...], scale: float, dtype: torch.dtype,
                  device: Device, shift: float = 0.0) -> torch.Tensor:
    """``shift + scale * N(0, 1)`` in ``dtype``: random weights and caches, never zeros."""
    # Generated in float32 on the target device (fast on a GPU), then cast.
    return (torch.randn(shape, generator=gen, device=device) * scale + shift).to(dtype)


class DecodePositions:
    """Lengths of the ``batch`` sequences before this step, kept in static device buffers
    (positions for RoPE and the KV append, and a key mask when lengths differ) so that
    a captured graph reads them.  Set them with `set` *before* capturing: the attention
    length is baked into the graph."""

    def __init__(self, batch: int, capacity: int, device: Device) -> None:
        self.batch, self.capacity, self.device = batch, capacity, torch.device(device)
        self.positions = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.lens: list[int] = [0] * batch
        self.mask: torch.Tensor | None = None  # [B, 1, 1, kv_len] bool; None when all lengths are equal

    def set(self, seq_len: int | Sequence[int]) -> None:
        lens = [seq_len] * self.batch if isinstance(seq_len, int) else [int(n) for n in seq_len]
        if len(lens) != self.batch:
            raise ValueError(f"seq_len: expected {self.batch} lengths, got {len(lens)}")
        if min(lens) < 0 or max(lens) >= self.capacity:
            raise ValueError(f"seq_len: lengths must be in [0, {self.capacity - 1}] (cache capacity "
                             f"{self.capacity} holds the new token too), got {lens}")
        self.lens = lens
        self.positions.copy_(torch.tensor(lens, dtype=torch.long))
        if len(set(lens)) == 1:
            self.mask = None
        else:
            keys = torch.arange(self.kv_len)
            self.mask = (keys[None, :] <= torch.tensor(lens)[:, None])[:, None, None, :].to(self.device)

    @property
    def kv_len(self) -> int:
        """Keys attended to: the longest cached sequence plus the new token."""
        return max(self.lens) + 1

    def rope(self, cos_table: torch.Tensor, sin_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's ``cos``/``sin`` ``[B, 1, d]`` (gathered on the device: capturable)."""
        return cos_table[self.positions].unsqueeze(1), sin_table[self.positions].unsqueeze(1)

    def append(self, cache: torch.Tensor, new: torch.Tensor) -> None:
        """Write ``new [B, kv_heads, d]`` into ``cache [B, kv_heads, capacity, d]`` at each
        sequence's position: one ``index_copy_`` when lengths are equal (gpt-fast's way)."""
        if self.mask is None:
            cache.index_copy_(2, self.positions[:1], new.unsqueeze(2))
        else:
            cache[torch.arange(self.batch, device=cache.device), :, self.positions] = new


class TorchAttentionBlock:
    """RMSNorm → fused QKV GEMM (→ per-head RMSNorm of q and k with ``config.qk_norm``, Qwen3) → RoPE →
    KV append → SDPA (GQA) → O-proj → residual add.

    ``block(x)`` with ``x [batch, hidden]`` returns ``x + attention(x)`` and appends this
    token's K and V to the block's cache ``[batch, kv_heads, capacity, head_dim]``.
    """

    def __init__(self, config: ModelConfig, batch: int, capacity: int, *, dtype: torch.dtype = torch.bfloat16,
                 device: Device = "cuda", seed: int = 0, positions: DecodePositions | None = None,
                 rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        if config.mla is not None:
            raise ValueError(f"{config.name}: MLA attention has no torch baseline block here")
        self.config, self.batch = config, batch
        h, d = config.hidden_size, config.head_dim
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.q_dim, self.kv_dim = self.heads * d, self.kv_heads * d
        qkv = self.q_dim + 2 * self.kv_dim
        gen = torch.Generator(device=device).manual_seed(seed)
        self.norm_weight = random_tensor(gen, (h,), 0.1, dtype, device, shift=1.0)
        self.w_qkv = random_tensor(gen, (qkv, h), h**-0.5, dtype, device)
        self.b_qkv = random_tensor(gen, (qkv,), 0.1, dtype, device) if config.attention_bias else None
        self.w_o = random_tensor(gen, (h, self.q_dim), self.q_dim**-0.5, dtype, device)
        # Random cache contents: a zero cache can make attention faster than real data would.
        self.k_cache = random_tensor(gen, (batch, self.kv_heads, capacity, d), 1.0, dtype, device)
        self.v_cache = random_tensor(gen, (batch, self.kv_heads, capacity, d), 1.0, dtype, device)
        # Drawn last: the other tensors stay those of a model without QK-norm.
        self.qk_norm = tuple(random_tensor(gen, (d,), 0.1, dtype, device, shift=1.0)
                             for _ in range(2)) if config.qk_norm else None
        self.positions = positions if positions is not None else DecodePositions(batch, capacity, device)
        self.rope_tables = rope if rope is not None else rope_tables(config, capacity, device)

    def __call__(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """One decode step; ``rope`` is this step's ``(cos, sin)`` when a model gathers it once
        for all layers, else the block gathers it."""
        b, d, pos = self.batch, self.config.head_dim, self.positions
        normed = F.rms_norm(x, (x.shape[-1],), self.norm_weight, self.config.rms_norm_eps)
        qkv = F.linear(normed, self.w_qkv, self.b_qkv)
        q, k, v = qkv.split([self.q_dim, self.kv_dim, self.kv_dim], dim=-1)
        q, k = q.view(b, self.heads, d), k.view(b, self.kv_heads, d)
        if self.qk_norm is not None:  # Qwen3: each head of q and k RMSNormed before RoPE
            eps = self.config.rms_norm_eps
            q, k = F.rms_norm(q, (d,), self.qk_norm[0], eps), F.rms_norm(k, (d,), self.qk_norm[1], eps)
        cos, sin = rope if rope is not None else pos.rope(*self.rope_tables)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        pos.append(self.k_cache, k)
        pos.append(self.v_cache, v.view(b, self.kv_heads, d))
        n = pos.kv_len
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2), self.k_cache[:, :, :n], self.v_cache[:, :, :n], attn_mask=pos.mask,
            enable_gqa=self.heads != self.kv_heads)
        return x + F.linear(out.reshape(b, self.q_dim), self.w_o)


class TorchFFNBlock:
    """RMSNorm → fused gate/up GEMM → SiLU(gate)·up → down GEMM → residual add."""

    def __init__(self, config: ModelConfig, *, dtype: torch.dtype = torch.bfloat16, device: Device = "cuda",
                 seed: int = 0, intermediate_size: int | None = None) -> None:
        self.config = config
        h, inter = config.hidden_size, intermediate_size or config.intermediate_size
        gen = torch.Generator(device=device).manual_seed(seed)
        self.norm_weight = random_tensor(gen, (h,), 0.1, dtype, device, shift=1.0)
        self.w_gate_up = random_tensor(gen, (2 * inter, h), h**-0.5, dtype, device)
        self.w_down = random_tensor(gen, (h, inter), inter**-0.5, dtype, device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x, (x.shape[-1],), self.norm_weight, self.config.rms_norm_eps)
        gate, up = F.linear(normed, self.w_gate_up).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, self.w_down)
