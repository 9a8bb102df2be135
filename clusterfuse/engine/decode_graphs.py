"""What the GPU backends share around their decode step: paged caches, CUDA graphs per batch
bucket and context class, and the prefill.

A backend (`PagedBackend` subclass: the Llama family's fused and torch backends through
`PagedLlamaBackend`, DeepSeek-V2's fused backend) supplies its reference model (the weights it
reads), its prefill, its cache layout and one method, ``decode_step(ids, positions, cache_lens,
block_table, cache, rows)``, computing one token per sequence over static buffers. This module
runs it:

* decode (``T == 1``) replays a CUDA graph captured once per batch-size bucket and context class
  (`SEQ_CLASSES`); the graph reads token ids, positions, cache lengths and block tables from
  static device buffers, so one capture serves every sequence length of its class. Rows of a bucket
  beyond the live batch point at a scratch slot whose single page absorbs their writes. With
  ``capture_graphs=False`` (CPU tests, debugging) the same step runs eagerly;
* prefill (``T > 1``) runs `PagedPrefill`: the model's dtype, chunked, K/V written straight into
  the paged pools the decode step reads.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Mapping, Sequence

import torch

from clusterfuse.engine.llama_layers import Fp32Matmul
from clusterfuse.engine.paged_cache import PagedKVCache, pages_for
from clusterfuse.engine.prefill import LOGITS_MODES, PagedPrefill, PrefillOptions
from clusterfuse.models.config import ModelConfig
from clusterfuse.reference.kv_cache import host_tensor
from clusterfuse.reference.llama import LlamaReferenceModel
from clusterfuse.reference.model_base import ReferenceModel

log = logging.getLogger("clusterfuse")

BATCH_BUCKETS = (1, 2, 4, 8, 16)
#: Context classes of the decode graphs, in rows (cached + the new one): a step whose longest
#: sequence has at most a class's rows replays that class's graph, whose launch choices were tuned
#: at that many rows (the last class, and any beyond the capacity, is cut to the capacity). One
#: graph per bucket was tuned with empty caches: KV reads, which dominate long contexts, never
#: entered the timing. (On an H200, for Llama-2-7B and Llama-3-8B at batch 1 and 16, the 1K and
#: 8K classes chose the same cluster and block sizes as each other and differed only in some
#: exchange paths: bench/results/block_threads_h200.md.) The torch backend's step gathers the
#: class's rows, so there the class also bounds the bytes a step reads.
SEQ_CLASSES = (1024, 4096, 16384, 65536)
PAGE_SIZE = 16
#: Share of free GPU memory the KV pools may take when sized from free memory.
KV_MEMORY_FRACTION = 0.9


def bucket_for(batch: int, buckets: Sequence[int] = BATCH_BUCKETS) -> int:
    for b in buckets:
        if batch <= b:
            return b
    raise ValueError(f"batch: this backend decodes at most {buckets[-1]} sequences per step, got {batch}")


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


class PagedBackend:
    """`DecoderBackend` skeleton over a `PagedKVCache` (module docstring).

    Subclasses set `family` and `batch_buckets` and implement `load_reference` (the weights, held
    once, repacked by a reference model: ``self.ref``, read in place by the decode step and the
    prefill), `make_prefill`, `page_bytes`, `make_cache` and `decode_step`.
    """

    #: Batch-size buckets of the decode graphs; the largest is `max_decode_batch`.
    batch_buckets: tuple[int, ...] = BATCH_BUCKETS
    #: Name used in messages.
    name = "paged"
    #: The model family (``ModelConfig.family``) this backend runs.
    family = ""

    def __init__(self, config: ModelConfig, weights: Mapping[str, torch.Tensor], *,
                 device: torch.device | str, page_size: int = PAGE_SIZE, capture_graphs: bool = True,
                 prefill: PrefillOptions | None = None) -> None:
        if config.family != self.family:
            raise ValueError(f"config.family: the {self.name} backend runs the {self.family} family, "
                             f"not {config.family!r}")
        self.config = config
        self.ref = self.load_reference(config, weights, device)
        self.device = self.ref.device
        if capture_graphs and self.device.type != "cuda":
            raise ValueError(f"capture_graphs: CUDA graphs need a CUDA device, got {self.device} "
                             "(pass capture_graphs=False to run the decode step eagerly)")
        self.page_size = page_size
        self.capture_graphs = capture_graphs
        self.mm = Fp32Matmul()
        self.prefiller = self.make_prefill(prefill or PrefillOptions())
        self._graphs: dict[tuple[int, int, int], DecodeGraph] = {}
        # One memory pool for every decode graph of this backend: the graphs never run at once, so
        # their temporaries can share memory (each keeps only its logits, copied out after a replay).
        self._graph_pool = None

    # ------------------------------------------------------------------ what a family supplies
    def load_reference(self, config: ModelConfig, weights: Mapping[str, torch.Tensor],
                       device: torch.device | str) -> ReferenceModel:
        """The reference model holding the weights (repacked) on ``device``."""
        raise NotImplementedError

    def make_prefill(self, options: PrefillOptions) -> PagedPrefill:
        """The prefill writing prompts into this backend's cache."""
        raise NotImplementedError

    def page_bytes(self) -> int:
        """Bytes of one KV page over every layer."""
        raise NotImplementedError

    def make_cache(self, max_batch: int, capacity: int, num_pages: int) -> PagedKVCache:
        """The empty paged cache of ``max_batch`` slots (the scratch slot included)."""
        raise NotImplementedError

    @property
    def prefill_chunk(self) -> int:
        """Prompt tokens per prefill chunk (the engine may send longer prompts; they are chunked here)."""
        return self.prefiller.options.chunk

    @property
    def max_decode_batch(self) -> int:
        """The most sequences one decode step runs (the engine splits larger batches)."""
        return self.batch_buckets[-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.ref.dtype

    # ------------------------------------------------------------------ cache
    def new_cache(self, max_batch: int, capacity: int, num_pages: int | None = None) -> PagedKVCache:
        """A paged cache for ``max_batch`` sequences of up to ``capacity`` tokens, plus one scratch
        slot (index ``max_batch``) for padding rows.  ``num_pages`` defaults to enough for every
        sequence at full capacity, on a GPU cut to what fits in free memory."""
        per_seq = pages_for(capacity, self.page_size)
        if num_pages is None:
            num_pages = max_batch * per_seq + 1
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                free -= self.decode_workspace_bytes(max_batch, capacity)
                num_pages = min(num_pages, int(free * KV_MEMORY_FRACTION) // self.page_bytes())
                if num_pages < per_seq + 1:
                    raise ValueError(f"capacity: {capacity} tokens need {per_seq} KV pages, only {num_pages - 1} "
                                     f"fit in free GPU memory ({free / 2**30:.1f} GiB)")
        cache = self.make_cache(max_batch + 1, capacity, num_pages)
        cache.check_room([max_batch], 1)  # the scratch slot's page
        return cache

    # ------------------------------------------------------------------ running
    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, cache: PagedKVCache, slots: Sequence[int] | None = None, *,
                logits: str = "all") -> torch.Tensor:
        """Append ``input_ids [B, T]`` to the sequences in ``slots`` (default ``range(B)``) and return
        fp32 logits ``[B, T, vocab]`` (``logits="all"``) or of the last position only, ``[B, 1, vocab]``
        (``"last"``). ``T > 1`` is a prefill (chunked, `PagedPrefill`); ``T == 1`` a decode step, whose
        ids may still be on their way from the previous step's sampling (nothing here reads them)."""
        if not isinstance(cache, PagedKVCache):
            raise ValueError(f"cache: expected the PagedKVCache made by {type(self).__name__}.new_cache")
        if logits not in LOGITS_MODES:
            raise ValueError(f"logits: expected one of {', '.join(LOGITS_MODES)}, got {logits!r}")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError("input_ids: expected a LongTensor [batch, tokens], got "
                             f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} "
                             f"{list(getattr(input_ids, 'shape', []))}")
        B, T = input_ids.shape
        if B == 0 or T == 0:
            raise ValueError(f"input_ids: expected at least one row and one token, got shape {[B, T]}")
        slots = list(range(B)) if slots is None else [int(s) for s in slots]
        if len(slots) != B:
            raise ValueError(f"slots: expected {B} slots (one per input row), got {len(slots)}")
        if len(set(slots)) != B or min(slots) < 0 or max(slots) >= cache.max_batch - 1:
            raise ValueError(f"slots: expected distinct slots in [0, {cache.max_batch - 1}) (the last one is the "
                             f"scratch slot), got {slots}")
        if T > 1:
            return torch.stack([self.prefiller.run(input_ids[i], cache, s, logits=logits)
                                for i, s in enumerate(slots)])
        cache.check_room(slots, 1)
        rows = max(cache.slot_lengths(slots)) + 1
        seq_class = seq_class_for(rows, cache.capacity)
        if self.capture_graphs:
            out = self._graph(cache, bucket_for(B, self.batch_buckets), seq_class).run(input_ids[:, 0], slots)
        else:
            self.ref.rope_tables(cache.capacity)
            index = torch.tensor(slots, device=self.device)
            lens = cache.lengths[index]
            out = self.decode_step(input_ids[:, 0].to(self.device), lens, lens, cache.block_table[index], cache,
                                   seq_class)
        cache.advance(slots, 1)
        return out[:, None, :]

    def decode_workspace_bytes(self, max_batch: int, capacity: int) -> int:
        """GPU memory the decode graphs need beside the KV pools for batches up to ``max_batch`` rows
        of up to ``capacity`` rows each (kept free when the pools are sized from free memory)."""
        return 0

    def decode_step(self, ids: torch.Tensor, positions: torch.Tensor, cache_lens: torch.Tensor,
                    block_table: torch.Tensor, cache: PagedKVCache, rows: int) -> torch.Tensor:
        """One decode token per row over static buffers (the graph body): write each row's K/V at row
        ``cache_lens[b]`` of its sequence and return fp32 logits [B, vocab]. Every row holds at most
        ``rows`` rows once its token is written."""
        raise NotImplementedError

    def prepare_decode(self, cache: PagedKVCache, batch: int) -> None:
        """Build, tune and capture the decode graphs of every bucket up to ``batch`` rows (a
        batch shrinks as its sequences finish) and every context class up to the cache's
        capacity, so that no step pays for them."""
        if not self.capture_graphs:
            return
        top = bucket_for(batch, self.batch_buckets)
        for bucket in self.batch_buckets:
            if bucket <= top:
                for seq_class in seq_classes(cache.capacity):
                    self._graph(cache, bucket, seq_class)

    def release_graphs(self, cache: PagedKVCache | None = None) -> int:
        """Drop the captured decode graphs of ``cache`` (None: of every cache), and with them their
        static buffers and memory pools; the next decode step captures again. Returns how many."""
        keys = [k for k in self._graphs if cache is None or k[0] == id(cache)]
        for k in keys:
            del self._graphs[k]
        return len(keys)

    def _graph(self, cache: PagedKVCache, bucket: int, seq_class: int) -> DecodeGraph:
        key = (id(cache), bucket, seq_class)
        if key not in self._graphs:
            self._graphs[key] = DecodeGraph(self, cache, bucket, seq_class)
        return self._graphs[key]


class DecodeGraph:
    """A decode step for ``bucket`` rows of context class ``seq_class`` captured as one CUDA graph
    over static buffers."""

    def __init__(self, model: PagedBackend, cache: PagedKVCache, bucket: int, seq_class: int) -> None:
        # A weak reference: the model owns its graphs, and a model <-> graph cycle would leave the
        # graph to the cyclic garbage collector, which may run (and free CUDA memory) while a later
        # graph is being captured, invalidating that capture.
        self._model = weakref.ref(model)
        self.cache, self.bucket, self.seq_class = cache, bucket, seq_class
        self.scratch = cache.max_batch - 1
        dev = model.device
        # The graph reads the rope tables in place: keep these alive even if a larger cache later
        # makes the model grow (reallocate) its tables.
        self._rope = model.ref.rope_tables(cache.capacity)
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
        if model._graph_pool is None:
            model._graph_pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(self.graph, pool=model._graph_pool):
            self.logits = self._body()
        torch.cuda.synchronize(dev)
        log.info("captured the %s decode graph for batch %d, up to %d rows, in %.1f s", model.name, bucket,
                 seq_class, time.perf_counter() - t0)

    def _body(self) -> torch.Tensor:
        # positions == cache lengths: a decode token sits right after its sequence's cached rows.
        model = self._model()
        if model is None:
            raise RuntimeError("the backend of this decode graph was freed")
        return model.decode_step(self.ids, self.lens, self.lens, self.table, self.cache, self.seq_class)

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


class PagedLlamaBackend(PagedBackend):
    """`PagedBackend` of the Llama family: `LlamaReferenceModel` weights, K and V pools per layer,
    the shared `PagedPrefill`."""

    family = "llama"

    @property
    def kv_window(self) -> int | None:
        """The sliding window of every layer (None: full attention). The decode step (the fused
        kernel, the torch backend's gather) and the prefill read no row before
        `clusterfuse.engine.paged_cache.window_first_row`, so the engine may return the pages before it."""
        return self.config.sliding_window

    def load_reference(self, config: ModelConfig, weights: Mapping[str, torch.Tensor],
                       device: torch.device | str) -> LlamaReferenceModel:
        return LlamaReferenceModel(config, weights, device=device)

    def make_prefill(self, options: PrefillOptions) -> PagedPrefill:
        return PagedPrefill(self.ref, options, self.mm)

    def page_bytes(self) -> int:
        c = self.config
        return 2 * c.num_hidden_layers * c.num_key_value_heads * self.page_size * c.head_dim \
            * self.ref.embed.element_size()

    def make_cache(self, max_batch: int, capacity: int, num_pages: int) -> PagedKVCache:
        c = self.config
        return PagedKVCache(c.num_hidden_layers, max_batch, capacity, c.num_key_value_heads, c.head_dim,
                            page_size=self.page_size, num_pages=num_pages, dtype=self.ref.dtype, device=self.device)
