"""The fused backend: Llama-family decoding with one fused attention and one fused FFN kernel
per layer, every decode step one CUDA-graph replay.

Prefill (``T > 1``) runs the reference model's PyTorch path, which writes the prompt's K/V
into the same paged pools the kernels read.  Decode (``T == 1``) replays a CUDA graph
captured once per batch-size bucket (1, 2, 4, 8, 16) and context class (`SEQ_CLASSES`):
embedding → per layer ``attention_block(residual=h)`` → ``ffn_block(residual=h)`` → final
RMSNorm → LM head. The graph reads token ids, positions, cache lengths and block tables from
static device buffers, so one capture serves every sequence length of its class; its fused ops'
launch choices (cluster size, exchange path, block size) are the ones tuned at the class's
length. Rows of a bucket beyond the live batch point at a scratch slot whose single page absorbs
their writes.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Mapping, Sequence

import torch

from clusterfuse.engine.paged_cache import PagedKVCache, pages_for
from clusterfuse.models.config import ModelConfig
from clusterfuse.ops.attention_block import attention_block
from clusterfuse.ops.ffn_block import ffn_block
from clusterfuse.ops.options import DEFAULT_KERNEL_OPTIONS, KernelOptions
from clusterfuse.reference.kv_cache import host_tensor
from clusterfuse.reference.llama import LlamaReferenceModel
from clusterfuse.reference.ops import rms_norm

log = logging.getLogger("clusterfuse")

BATCH_BUCKETS = (1, 2, 4, 8, 16)
#: Context classes of the decode graphs, in rows (cached + the new one): a step whose longest
#: sequence has at most a class's rows replays that class's graph, whose launch choices were tuned
#: at that many rows (the last class, and any beyond the capacity, is cut to the capacity). One
#: graph per bucket was tuned with empty caches: KV reads, which dominate long contexts, never
#: entered the timing. (On an H200, for Llama-2-7B and Llama-3-8B at batch 1 and 16, the 1K and
#: 8K classes chose the same cluster and block sizes as each other and differed only in some
#: exchange paths: bench/results/block_threads_h200.md.)
SEQ_CLASSES = (1024, 4096, 16384, 65536)
PAGE_SIZE = 16
#: Share of free GPU memory the KV pools may take when sized from free memory.
KV_MEMORY_FRACTION = 0.9


def bucket_for(batch: int) -> int:
    for b in BATCH_BUCKETS:
        if batch <= b:
            return b
    raise ValueError(f"batch: the fused backend decodes at most {BATCH_BUCKETS[-1]} sequences, got {batch}")


def seq_class_for(rows: int, capacity: int) -> int:
    """The context class (`SEQ_CLASSES`, cut to ``capacity``) of a step whose longest sequence holds
    ``rows`` rows once its new token is written."""
    if not 1 <= rows <= capacity:
        raise ValueError(f"rows: expected 1..{capacity} (the cache capacity), got {rows}")
    return min(next((c for c in SEQ_CLASSES if rows <= c), capacity), capacity)


def seq_classes(capacity: int) -> list[int]:
    """Every context class a cache of ``capacity`` rows can reach, in order."""
    return [c for c in SEQ_CLASSES if c < capacity] + [capacity]


def tuning_block_table(cache: PagedKVCache, bucket: int, rows: int) -> torch.Tensor:
    """Block-table rows [bucket, max pages] for the eager step that tunes and captures a graph at
    ``rows`` rows per sequence: each row reads its own run of pages (distinct ones while the pool has
    them, so that the timed reads come from HBM as a real batch's do) and writes its new token (row
    ``rows - 1``) into the scratch slot's page. Pages of live sequences are only read."""
    p, max_pages = cache.page_size, cache.block_table.shape[1]
    scratch = cache.pages_of(cache.max_batch - 1)[0]
    others = cache.num_pages - 1
    idx = torch.arange(bucket * max_pages, dtype=torch.int32, device=cache.block_table.device).view(bucket, max_pages)
    table = idx % others if others else torch.zeros_like(idx)
    table = torch.where(table >= scratch, table + 1, table) if others else table + scratch  # skip the scratch page
    table[:, (rows - 1) // p] = scratch
    return table


class FusedModel:
    """`DecoderBackend` for Llama-family models on a Hopper GPU (see the module docstring)."""

    def __init__(self, config: ModelConfig, weights: Mapping[str, torch.Tensor], *,
                 device: torch.device | str, page_size: int = PAGE_SIZE,
                 kernel_options: KernelOptions = DEFAULT_KERNEL_OPTIONS) -> None:
        if config.family != "llama":
            raise ValueError(f"config.family: the fused backend runs the Llama family, not {config.family!r}")
        self.config = config
        self.ref = LlamaReferenceModel(config, weights, device=device)
        if self.ref.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"dtype: the fused kernels run bf16 or fp16 weights, got {self.ref.dtype}")
        if any(b is not None for b in self.ref.b_o):
            raise ValueError("weights: an o_proj bias is not supported by the fused attention block")
        self.device = self.ref.device
        self.page_size = page_size
        self.kernel_options = kernel_options  # how the fused kernels launch (clusterfuse.ops.options)
        self._graphs: dict[tuple[int, int], _DecodeGraph] = {}
        self._mm_fp32_out = True  # cleared once if torch.mm(out_dtype=float32) is unavailable

    # ------------------------------------------------------------------ cache
    def new_cache(self, max_batch: int, capacity: int, num_pages: int | None = None) -> PagedKVCache:
        """A paged cache for ``max_batch`` sequences of up to ``capacity`` tokens, plus one scratch
        slot (index ``max_batch``) for padding rows.  ``num_pages`` defaults to enough for every
        sequence at full capacity, cut to what fits in free GPU memory."""
        c = self.config
        per_seq = pages_for(capacity, self.page_size)
        if num_pages is None:
            page_bytes = 2 * c.num_hidden_layers * c.num_key_value_heads * self.page_size * c.head_dim \
                * self.ref.embed.element_size()
            free, _ = torch.cuda.mem_get_info(self.device)
            num_pages = min(max_batch * per_seq + 1, int(free * KV_MEMORY_FRACTION) // page_bytes)
            if num_pages < per_seq + 1:
                raise ValueError(f"capacity: {capacity} tokens need {per_seq} KV pages, only {num_pages - 1} fit "
                                 f"in free GPU memory ({free / 2**30:.1f} GiB)")
        cache = PagedKVCache(c.num_hidden_layers, max_batch + 1, capacity, c.num_key_value_heads, c.head_dim,
                             page_size=self.page_size, num_pages=num_pages, dtype=self.ref.dtype,
                             device=self.device)
        cache.check_room([max_batch], 1)  # the scratch slot's page
        return cache

    # ------------------------------------------------------------------ running
    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, cache: PagedKVCache, slots: Sequence[int] | None = None) -> torch.Tensor:
        """Same contract as `ReferenceModel.forward`; decode steps (T == 1) run the fused graph."""
        if not isinstance(cache, PagedKVCache):
            raise ValueError("cache: expected the PagedKVCache made by FusedModel.new_cache")
        if input_ids.dim() != 2 or input_ids.shape[1] != 1:
            return self.ref.forward(input_ids, cache, slots)
        slots = list(range(input_ids.shape[0])) if slots is None else [int(s) for s in slots]
        if len(slots) != input_ids.shape[0]:
            raise ValueError(f"slots: expected {input_ids.shape[0]} slots (one per input row), got {len(slots)}")
        if max(slots) >= cache.max_batch - 1:
            raise ValueError(f"slots: {max(slots)} is out of range for {cache.max_batch - 1} sequences")
        cache.check_room(slots, 1)
        rows = max(cache.slot_lengths(slots)) + 1
        graph = self._graph(cache, bucket_for(len(slots)), seq_class_for(rows, cache.capacity))
        logits = graph.run(input_ids[:, 0], slots)
        cache.advance(slots, 1)
        return logits[:, None, :]

    def prepare_decode(self, cache: PagedKVCache, batch: int) -> None:
        """Build, tune and capture the decode graphs of every bucket up to ``batch`` rows (a
        batch shrinks as its sequences finish) and every context class up to the cache's
        capacity, so that no step pays for them."""
        for bucket in BATCH_BUCKETS:
            if bucket <= bucket_for(batch):
                for seq_class in seq_classes(cache.capacity):
                    self._graph(cache, bucket, seq_class)

    def release_graphs(self, cache: PagedKVCache | None = None) -> int:
        """Drop the captured decode graphs of ``cache`` (None: of every cache), and with them their
        static buffers and memory pools; the next decode step captures again. Returns how many."""
        keys = [k for k in self._graphs if cache is None or k[0] == id(cache)]
        for k in keys:
            del self._graphs[k]
        return len(keys)

    def _graph(self, cache: PagedKVCache, bucket: int, seq_class: int) -> _DecodeGraph:
        key = (id(cache), bucket, seq_class)
        if key not in self._graphs:
            self._graphs[key] = _DecodeGraph(self, cache, bucket, seq_class)
        return self._graphs[key]

    def decode_step(self, ids: torch.Tensor, positions: torch.Tensor, cache_lens: torch.Tensor,
                    block_table: torch.Tensor, cache: PagedKVCache) -> torch.Tensor:
        """One decode step over static buffers (graph body): fp32 logits [B, vocab]."""
        ref, c = self.ref, self.config
        cos, sin = ref.cos, ref.sin
        h = ref.embed[ids]
        for layer in range(c.num_hidden_layers):
            h = attention_block(h, ref.input_norms[layer], ref.w_qkv[layer], ref.b_qkv[layer], ref.w_o[layer],
                                cos, sin, positions, cache.k_pools[layer], cache.v_pools[layer], cache_lens,
                                num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
                                head_dim=c.head_dim, eps=c.rms_norm_eps, block_table=block_table,
                                page_size=cache.page_size, residual=h, options=self.kernel_options)
            h = ffn_block(h, ref.post_attention_norms[layer], ref.w_gate_up[layer], ref.w_down[layer],
                          c.rms_norm_eps, residual=h, options=self.kernel_options)
        return self._lm_head(rms_norm(h, ref.final_norm, c.rms_norm_eps).to(ref.dtype))

    def _lm_head(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 logits of ``x [B, H]`` (model dtype): one cuBLAS GEMM with an fp32 output, since
        logits rounded to bf16 would tie and flip the top-1 token."""
        if self._mm_fp32_out:
            try:
                return torch.mm(x, self.ref.lm_head.T, out_dtype=torch.float32)
            except (RuntimeError, NotImplementedError, TypeError) as err:  # older torch / cuBLAS
                log.info("fp32-output GEMM unavailable (%s); LM head logits rounded to %s", err, x.dtype)
                self._mm_fp32_out = False
        return (x @ self.ref.lm_head.T).float()


class _DecodeGraph:
    """A decode step for ``bucket`` rows of context class ``seq_class`` captured as one CUDA graph
    over static buffers."""

    def __init__(self, model: FusedModel, cache: PagedKVCache, bucket: int, seq_class: int) -> None:
        # A weak reference: the model owns its graphs, and a model <-> graph cycle would leave the
        # graph to the cyclic garbage collector, which may run (and free CUDA memory) while a later
        # graph is being captured, invalidating that capture.
        self._model = weakref.ref(model)
        self.cache, self.bucket, self.seq_class = cache, bucket, seq_class
        self.scratch = cache.max_batch - 1
        dev = model.device
        model.ref.rope_tables(cache.capacity)  # fixed tables: the graph reads them in place
        self.ids = torch.zeros(bucket, dtype=torch.long, device=dev)
        # The eager step tunes the ops at the class's length: every row seq_class rows long.
        self.lens = torch.full((bucket,), seq_class - 1, dtype=torch.int32, device=dev)
        self.table = tuning_block_table(cache, bucket, seq_class)
        # The cache rows the last run read (its slots, then the scratch slot for padding rows), on
        # the device; rebuilt only when the slots change, so a steady-state step copies nothing
        # from the host.
        self._rows_key: tuple[int, ...] | None = None
        self._rows = torch.zeros(bucket, dtype=torch.long, device=dev)
        t0 = time.perf_counter()
        self.logits = self._body()  # eager first: builds kernels, tunes, sets up workspaces
        torch.cuda.synchronize(dev)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._body()
        torch.cuda.synchronize(dev)
        log.info("captured the decode graph for batch %d, up to %d rows, in %.1f s", bucket, seq_class,
                 time.perf_counter() - t0)

    def _body(self) -> torch.Tensor:
        # positions == cache lengths: a decode token sits right after its sequence's cached rows.
        model = self._model()
        if model is None:
            raise RuntimeError("the FusedModel of this decode graph was freed")
        return model.decode_step(self.ids, self.lens, self.lens, self.table, self.cache)

    def run(self, ids: torch.Tensor, slots: list[int]) -> torch.Tensor:
        """Replay the step for token ids ``ids [n]`` (on the device) of the sequences in ``slots``;
        returns fp32 logits [n, vocab]. Nothing here waits for the GPU."""
        n = len(slots)
        if self._rows_key != tuple(slots):
            rows = slots + [self.scratch] * (self.bucket - n)
            self._rows.copy_(host_tensor(rows, torch.long, self._rows.device), non_blocking=True)
            self._rows_key = tuple(slots)
        self.ids.zero_()
        self.ids[:n].copy_(ids)
        self.lens.copy_(self.cache.lengths[self._rows])
        self.table.copy_(self.cache.block_table[self._rows])
        self.graph.replay()
        return self.logits[:n].clone()
