"""Shared inputs of the MLA block tests (CPU and GPU): a random DeepSeek-V2-Lite-shaped attention
layer, its YaRN rope tables and softmax scale, a paged latent cache with shuffled pages, and the
reference block (`clusterfuse.reference.mla.mla_self_attention` on the normed input, plus the
residual) that every implementation is compared with."""

from __future__ import annotations

import torch

from clusterfuse.models.presets import preset
from clusterfuse.reference.kv_storage import PagedRowStore
from clusterfuse.reference.mla import MLAWeights, mla_self_attention
from clusterfuse.reference.ops import rms_norm
from clusterfuse.reference.rope import rope_cos_sin, yarn_softmax_scale_factor

CONFIG = preset("deepseek-v2-lite")
MLA = CONFIG.mla
HEADS = CONFIG.num_attention_heads
EPS = CONFIG.rms_norm_eps
SOFTMAX_SCALE = MLA.qk_head_dim ** -0.5 * yarn_softmax_scale_factor(CONFIG.rope)
LATENT = MLA.kv_lora_rank + MLA.qk_rope_head_dim


def random_layer(hidden: int, dtype: torch.dtype, device: str | torch.device, seed: int
                 ) -> tuple[torch.Tensor, MLAWeights]:
    """(input norm weight, MLA weights) with Hugging Face shapes, scaled like trained weights
    (activations of order 1 through the block)."""
    g = torch.Generator().manual_seed(seed)

    def t(*shape: int, scale: float, offset: float = 0.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale + offset).to(dtype).to(device)

    nope, rope, rank, v = MLA.qk_nope_head_dim, MLA.qk_rope_head_dim, MLA.kv_lora_rank, MLA.v_head_dim
    norm = t(hidden, scale=0.1, offset=1.0)
    w = MLAWeights(w_kv_a=t(rank + rope, hidden, scale=hidden ** -0.5), kv_a_norm=t(rank, scale=0.1, offset=1.0),
                   w_kv_b=t(HEADS * (nope + v), rank, scale=rank ** -0.5),
                   w_o=t(hidden, HEADS * v, scale=(HEADS * v) ** -0.5),
                   w_q=t(HEADS * (nope + rope), hidden, scale=hidden ** -0.5))
    return norm, w


def rope_tables(max_pos: int, device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V2-Lite's YaRN cos/sin tables [max_pos, rope / 2] (fp32)."""
    return rope_cos_sin(CONFIG.rope, MLA.qk_rope_head_dim, max_pos, device)


def paged_cache(lens: list[int], page_size: int, dtype: torch.dtype, device: str | torch.device, seed: int,
                spare_pages: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(pool [pages, page_size, 576] of random latent rows, block_table [B, max_pages] int32): every
    sequence owns the pages for its length + 1 rows, in a shuffled order, plus spare pages."""
    g = torch.Generator().manual_seed(seed)
    max_pages = max(-(-(n + 1) // page_size) for n in lens) + 1
    num_pages = len(lens) * max_pages + spare_pages
    pool = torch.randn(num_pages, page_size, LATENT, generator=g).to(dtype).to(device)
    order = torch.randperm(num_pages, generator=g)[: len(lens) * max_pages]
    table = order.view(len(lens), max_pages).to(torch.int32).to(device)
    return pool, table


def reference_block(hidden: torch.Tensor, norm: torch.Tensor, w: MLAWeights, cos: torch.Tensor, sin: torch.Tensor,
                    positions: torch.Tensor, pool: torch.Tensor, table: torch.Tensor, lens: list[int], *,
                    residual: bool) -> torch.Tensor:
    """The reference block on ``pool`` (its new rows are written into it): fp32, or with
    ``residual`` ``(hidden + out)`` in hidden's dtype."""
    x = rms_norm(hidden, norm, EPS)[:, None]
    out = mla_self_attention(x, w, MLA, HEADS, cos, sin, positions.long()[:, None], PagedRowStore(pool, table),
                             list(range(len(lens))), list(lens), SOFTMAX_SCALE)[:, 0]
    return (hidden.float() + out).to(hidden.dtype) if residual else out
