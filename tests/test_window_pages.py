"""Returning the KV pages that fall out of every layer's sliding window (issue 40), on the CPU.

A model whose every layer attends within a window of W rows never reads a row before
``window_first_row`` again, so the scheduler hands the pages before it back to the pool and a long
generation holds O(W) pages. Checked here: the cache's bookkeeping (`PagedKVCache.release_before`,
`pages_spanned`), reads from a first row, the engine over the reference and the torch backends
(greedy tokens identical with and without freeing, the page count bounded, preemption), and that
no reader touches a returned page: the tests make the returned block-table entries point past the
pool, so any read of one raises.
"""

from __future__ import annotations

import pytest
import torch

from clusterfuse.engine.llm_engine import LLMEngine
from clusterfuse.engine.paged_cache import PagedKVCache, pages_for, window_first_row
from clusterfuse.engine.prefill import PrefillOptions
from clusterfuse.engine.reference_backend import ReferenceBackend
from clusterfuse.engine.sampling import SamplingParams
from clusterfuse.engine.scheduler import Scheduler
from clusterfuse.engine.torch_model import TorchModel, window_pages
from clusterfuse.models.byte_tokenizer import ByteTokenizer
from clusterfuse.models.config import ModelConfig
from clusterfuse.models.random_init import random_weights
from clusterfuse.reference import build_reference_model
from clusterfuse.reference.kv_storage import ContiguousRowStore, PagedRowStore
from tests.test_scheduler import read_all, seq

WINDOW = 21  # not a multiple of the 16-key tiles nor of the pages
PAGE = 16
CHUNK = 8  # prompt tokens per prefill step: prompts continue their slot over many chunks
VOCAB = 300


def window_config(window: int | None = WINDOW) -> ModelConfig:
    return ModelConfig(family="llama", architecture="MistralForCausalLM", vocab_size=VOCAB, hidden_size=64,
                       intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, max_position_embeddings=1024, sliding_window=window, name="tiny-window")


def backend(kind: str, window: int | None = WINDOW):
    config = window_config(window)
    weights = random_weights(config, dtype=torch.float32, seed=5)
    if kind == "reference":
        return ReferenceBackend(build_reference_model(config, weights), page_size=PAGE, prefill_chunk=CHUNK)
    return TorchModel(config, weights, device="cpu", capture_graphs=False, prefill=PrefillOptions(chunk=CHUNK))


@pytest.fixture
def strict_release(monkeypatch):
    """Make every block-table entry `release_before` returns point past the pool: a later read of it
    by any backend (a gather, a page lookup) raises IndexError instead of reading a reused page."""
    original = PagedKVCache.release_before

    def release_before(self: PagedKVCache, slot: int, row: int) -> int:
        first = self.pages_spanned(slot) - len(self.pages_of(slot))
        n = original(self, slot, row)
        self.block_table[slot, first:first + n] = self.num_pages
        return n

    monkeypatch.setattr(PagedKVCache, "release_before", release_before)


def generate(be, prompts: list[list[int]], max_tokens: int, *, free: bool, num_pages: int | None = None,
             max_num_seqs: int = 4, capacity: int = 320) -> tuple[dict[str, list[int]], int, LLMEngine]:
    """Greedy tokens of every prompt (run together), and the most KV pages in use after any step."""
    engine = LLMEngine(be, ByteTokenizer(VOCAB), capacity=capacity, max_num_seqs=max_num_seqs, num_pages=num_pages,
                       free_window_pages=free)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    done: dict[str, list[int]] = {}
    most = 0
    while engine.has_unfinished():
        done.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
        most = max(most, engine.stats().kv_pages_used)
    return done, most, engine


def prompts(*lengths: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


def test_window_first_row_is_the_first_visible_key_on_the_kernels_tiles():
    assert window_first_row(0, WINDOW) == 0 and window_first_row(20, WINDOW) == 0  # the window covers row 0
    assert window_first_row(36, WINDOW) == 16  # first visible key 16
    assert window_first_row(52, WINDOW) == 32 and window_first_row(47, WINDOW) == 16  # keys 32, 27
    assert window_first_row(100, 1) == 96  # the new token alone: rows 96.. share its tile


def test_release_before_returns_whole_pages_and_keeps_the_accounting():
    cache = PagedKVCache(1, 2, 256, 1, 4, page_size=PAGE, num_pages=12, dtype=torch.float32, device="cpu")
    cache.reserve(0, 100)  # 7 pages
    held = cache.pages_of(0)
    assert cache.release_before(0, 63) == 3  # row 63 is in page 3: pages 0..2 go
    assert cache.pages_of(0) == held[3:] and cache.pages_spanned(0) == 7 and cache.free_pages == 12 - 4
    assert cache.release_before(0, 50) == 0 and cache.release_before(0, 64) == 1  # never twice, page by page
    assert cache.pages_needed(0, 112) == 0 and cache.pages_needed(0, 113) == 1  # counts the returned pages
    cache.reserve(0, 113)
    assert cache.block_table[0, 7].item() == cache.pages_of(0)[-1]  # the new page at its row's entry
    assert cache.release_before(0, 10_000) == 8 - 4 and cache.pages_of(0) == []
    cache.reset(0)
    assert cache.free_pages == 12 and cache.pages_spanned(0) == 0 and cache.pages_needed(0, 16) == 1


def test_paged_read_from_a_first_row_equals_contiguous():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(2, 100, 8, generator=g)
    contiguous = ContiguousRowStore(torch.zeros(1, 2, 128, 8))
    table = torch.randperm(8, generator=g).to(torch.int32)[None]
    paged = PagedRowStore(torch.zeros(8, 2, PAGE, 8), table)
    for store in (contiguous, paged):
        store.write(0, 0, rows)
    for first, length in ((0, 100), (16, 100), (37, 64), (63, 65), (80, 80), (99, 100)):
        want = rows[:, first:length]
        assert torch.equal(contiguous.read(0, length, first), want)
        assert torch.equal(paged.read(0, length, first), want), (first, length)


def test_torch_decode_gathers_only_each_windows_pages():
    table = torch.arange(20, dtype=torch.int32).view(1, 20).repeat(3, 1) + torch.tensor([[0], [100], [200]],
                                                                                        dtype=torch.int32)
    lens = torch.tensor([5, 40, 307])
    held, keys = window_pages(table, lens, WINDOW, PAGE, class_pages=20)
    # window_first_row: rows 0, 16, 272 -> first pages 0, 1, 17; spans of pages_for(36) + 1 = 4 pages
    assert held.tolist() == [[0, 1, 2, 3], [101, 102, 103, 104], [217, 218, 219, 219]]  # clamped at the end
    assert keys[:, 0].tolist() == [0, 16, 272] and keys.shape == (3, 4 * PAGE)
    assert keys[2, -1].item() == 20 * PAGE + PAGE - 1  # the clamped page's keys lie past every length
    held, _ = window_pages(table, lens, WINDOW, PAGE, class_pages=2)
    assert held.shape == (3, 2)  # never more than the context class


@pytest.mark.parametrize("kind", ["reference", "torch"])
def test_long_generation_holds_a_bounded_page_count_and_the_same_tokens(kind, strict_release):
    """Prompt 40 + 230 generated tokens (over 12 windows of 21): with freeing the pages in use stay
    within one window's plus a prefill chunk's, without it they grow to the whole sequence's; the
    greedy tokens are identical."""
    be = backend(kind)
    p = prompts(40)
    freed, most_freed, engine = generate(be, p, 230, free=True)
    kept, most_kept, _ = generate(be, p, 230, free=False)
    assert freed == kept and len(freed["0"]) == 230
    bound = pages_for(WINDOW + 15 + CHUNK, PAGE) + 1
    assert most_freed <= bound < most_kept == pages_for(40 + 230, PAGE)
    assert engine.cache.free_pages == engine.cache.num_pages - (kind == "torch")  # all back but the scratch page


@pytest.mark.parametrize("kind", ["reference", "torch"])
def test_preemption_and_recomputation_with_freed_pages(kind, strict_release):
    """A pool of one sequence's pages, four long requests whose windows (50 rows) need more pages
    together than the pool has: preemptions happen, the recomputed requests prefill over many chunks
    with their early pages already returned, and every request's tokens equal its tokens alone with
    every page kept."""
    be = backend(kind, window=50)
    p = prompts(60, 45, 30, 75)
    alone = {str(i): generate(be, [q], 50, free=False, max_num_seqs=1)[0]["0"] for i, q in enumerate(p)}
    capacity = 160
    together, _, engine = generate(be, p, 50, free=True, num_pages=pages_for(capacity, PAGE) + (kind == "torch"),
                                   capacity=capacity)
    assert together == alone
    assert engine.scheduler.preemptions > 0
    assert engine.cache.free_pages == engine.cache.num_pages - (kind == "torch")


def test_scheduler_conserves_pages_while_freeing():
    """After every step, the free pages and the pages each running request holds are the pool, with
    no page twice, and each request holds its rows from its window's first row on."""
    cache = PagedKVCache(1, 3, 96, 1, 1, page_size=4, num_pages=24, dtype=torch.float32, device="cpu")
    sch = Scheduler(cache, max_num_seqs=3, capacity=96, prefill_budget=6, window=10)
    reqs = [seq(i, n, max_tokens=60) for i, n in enumerate((9, 30, 17))]
    for r in reqs:
        sch.add(r)
    for _ in range(120):
        if not sch.has_work():
            break
        sch.schedule()
        held = [page for s in sch.running for page in cache.pages_of(s.slot)]
        assert sorted(held + cache._free) == list(range(24))
        for s in sch.running:
            assert cache.pages_spanned(s.slot) * 4 >= s.computed
            first = window_first_row(s.computed - 1, 10)  # the step just planned reads from here
            assert (cache.pages_spanned(s.slot) - len(cache.pages_of(s.slot))) * 4 <= first
        for s in list(sch.running):
            read_all(s)
            if s.read >= s.params.max_tokens:
                sch.finish(s)
    assert not sch.has_work() and cache.free_pages == 24


def test_only_models_with_a_window_everywhere_free_pages():
    assert LLMEngine(backend("reference", None), ByteTokenizer(VOCAB), capacity=64).scheduler.window is None
    assert LLMEngine(backend("reference"), ByteTokenizer(VOCAB), capacity=64).scheduler.window == WINDOW
    kept = LLMEngine(backend("reference"), ByteTokenizer(VOCAB), capacity=64, free_window_pages=False)
    assert kept.scheduler.window is None
    with pytest.raises(ValueError, match="window"):
        Scheduler(kept.cache, max_num_seqs=1, capacity=64, prefill_budget=8, window=0)
