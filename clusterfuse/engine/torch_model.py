"""The torch backend: Llama-family decoding in the model's dtype with plain PyTorch ops
(cuBLAS GEMMs, SDPA), every decode step one CUDA-graph replay — the fast path on CUDA GPUs
without thread-block clusters (A100, Ada, consumer Blackwell), and on Hopper when forced.

It is the gpt-fast-style step the fused kernels are benchmarked against, over the same paged KV
cache, the same graph buckets (`decode_graphs`; batches up to 64 here, as nothing in it is
limited to 16) and the same GPU prefill (`prefill`). Per layer (`llama_layers`): RMSNorm → QKV GEMM
→ (QK-norm) → RoPE → the new K/V scattered into each sequence's page → attention → O-proj + residual →
SwiGLU FFN + residual.

Attention of a decode step: each row's pages up to the step's context class (`SEQ_CLASSES`) are
gathered into a contiguous ``[B, nkv, rows, hd]`` and SDPA runs with a key mask (rows past each
sequence's length masked). The query heads sharing a KV head ride as SDPA's query rows
(``[B, nkv, group, hd]``), so GQA needs no K/V repeat. The gather copies the class's KV once
per step: beside the weights (16 GB a step for Llama-3-8B) that is 1% at 1K rows and 6% at 8K
for one sequence. With a sliding window each row gathers only the pages of its window, from the
one holding `window_first_row` on (`window_pages`): the engine may have returned the pages before
it, and the step reads O(window) rows whatever the class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clusterfuse.engine import llama_layers as layers
from clusterfuse.engine.decode_graphs import PagedLlamaBackend, bucket_for
from clusterfuse.engine.paged_cache import KERNEL_TILE_KEYS, PagedKVCache, pages_for

#: Batch-size buckets of the torch backend's decode graphs.
TORCH_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class TorchModel(PagedLlamaBackend):
    """`DecoderBackend` for Llama-family models on any CUDA GPU (or, with ``capture_graphs=False``,
    eagerly anywhere, the CPU included); see the module docstring."""

    name = "torch"
    batch_buckets = TORCH_BATCH_BUCKETS

    def decode_workspace_bytes(self, max_batch: int, capacity: int) -> int:
        """A step's gathered K and V of one layer at the largest bucket and class, with as much again
        for SDPA's expanded mask and the layer's other temporaries."""
        c = self.config
        rows = bucket_for(min(max_batch, self.max_decode_batch), self.batch_buckets) * pages_for(
            capacity, self.page_size) * self.page_size
        return 4 * rows * c.num_key_value_heads * c.head_dim * self.ref.embed.element_size()

    def decode_step(self, ids: torch.Tensor, positions: torch.Tensor, cache_lens: torch.Tensor,
                    block_table: torch.Tensor, cache: PagedKVCache, rows: int) -> torch.Tensor:
        """One decode step over static buffers (graph body): fp32 logits [B, vocab]; every sequence
        holds at most ``rows`` rows once its new token is written."""
        ref, c, ps = self.ref, self.config, cache.page_size
        B = ids.shape[0]
        nkv, group, hd = c.num_key_value_heads, c.num_attention_heads // c.num_key_value_heads, c.head_dim
        lens = cache_lens.long()
        pages = block_table.gather(1, (lens // ps)[:, None])[:, 0].long()  # each row's new-token page
        offsets = lens % ps
        if c.sliding_window is None:
            held = block_table[:, :pages_for(rows, ps)]
            keys = torch.arange(held.shape[1] * ps, device=ids.device)[None, :]
        else:
            held, keys = window_pages(block_table, lens, c.sliding_window, ps, pages_for(rows, ps))
        # [B, 1, 1, keys]: rows 0 .. len, or the last sliding_window of them
        mask = layers.visible_keys(keys, lens[:, None], c.sliding_window)[:, None, None, :]
        x = ref.embed[ids]
        for layer in range(c.num_hidden_layers):
            q, k, v = layers.project_qkv(ref, layer, x, positions.long())  # q [nh, B, hd]
            layers.write_kv(cache.k_pools[layer], cache.v_pools[layer], pages, offsets, k, v)
            k_rows = layers.gather_pages(cache.k_pools[layer], held)  # [B, nkv, keys, hd]
            v_rows = layers.gather_pages(cache.v_pools[layer], held)
            qg = q.view(nkv, group, B, hd).permute(2, 0, 1, 3)  # [B, nkv, group, hd]
            out = F.scaled_dot_product_attention(qg, k_rows, v_rows, attn_mask=mask)
            x = layers.attention_residual(ref, layer, x, out.reshape(B, -1), self.mm)
            x = layers.ffn_residual(ref, layer, x, self.mm)
        return layers.lm_head(ref, x, self.mm)


def window_pages(block_table: torch.Tensor, lens: torch.Tensor, window: int, page_size: int,
                 class_pages: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pages a decode step with a sliding ``window`` gathers per row, and their key rows: from the
    page holding `clusterfuse.engine.paged_cache.window_first_row` of each row's new token (at row
    ``lens[b]``) on, as many as any window can span (at most ``window + 15`` rows from there, never
    more than the context class's ``class_pages``). Returns ``held [B, P]`` (block-table entries; past
    the table's end the last one again) and ``keys [B, P * page_size]``, the rows those pages hold
    (past the table's end, rows past every length: masked)."""
    span = min(class_pages, pages_for(window + KERNEL_TILE_KEYS - 1, page_size) + 1)
    first = (lens + 1 - window).clamp(min=0)
    first_page = (first - first % KERNEL_TILE_KEYS) // page_size  # window_first_row's page, on the device
    index = first_page[:, None] + torch.arange(span, device=lens.device)[None, :]  # [B, span]
    held = block_table.gather(1, index.clamp(max=block_table.shape[1] - 1))
    keys = (index[:, :, None] * page_size + torch.arange(page_size, device=lens.device)).flatten(1)
    return held, keys
