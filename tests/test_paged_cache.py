"""Paged KV cache bookkeeping on the CPU, driven by the reference backend."""

from __future__ import annotations

import pytest
import torch

from clusterfuse.engine.paged_cache import PagedKVCache
from clusterfuse.models.config import ModelConfig
from clusterfuse.models.random_init import random_weights
from clusterfuse.reference import build_reference_model

CONFIG = ModelConfig(family="llama", architecture="LlamaForCausalLM", vocab_size=97, hidden_size=64,
                     intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=16, max_position_embeddings=256)


@pytest.fixture(scope="module")
def model():
    return build_reference_model(CONFIG, random_weights(CONFIG, device="cpu", dtype=torch.float32, seed=3))


def paged(num_pages: int = 16, capacity: int = 40, max_batch: int = 3) -> PagedKVCache:
    c = CONFIG
    return PagedKVCache(c.num_hidden_layers, max_batch, capacity, c.num_key_value_heads, c.head_dim,
                        page_size=4, num_pages=num_pages, dtype=torch.float32, device="cpu")


def lengths(cache) -> list[int]:
    """The row counts of every slot, once the host copy is checked against the device tensor."""
    host = cache.slot_lengths(range(cache.max_batch))
    assert host == cache.lengths.tolist()
    return host


def test_paged_equals_contiguous(model):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 97, (1, n), generator=g) for n in (5, 9, 1)]
    cont, pag = model.new_cache(3, 40), paged()
    for slot, ids in enumerate(prompts):
        torch.testing.assert_close(model.forward(ids, pag, [slot]), model.forward(ids, cont, [slot]),
                                   rtol=0, atol=0)
    for _ in range(6):  # decode the three together
        ids = torch.randint(0, 97, (3, 1), generator=g)
        torch.testing.assert_close(model.forward(ids, pag, [0, 1, 2]), model.forward(ids, cont, [0, 1, 2]),
                                   rtol=0, atol=0)
    assert pag.lengths.tolist() == [11, 15, 7]
    assert [len(pag.pages_of(s)) for s in range(3)] == [3, 4, 2]


def test_pages_are_allocated_on_demand_and_freed(model):
    cache = paged(num_pages=5)
    model.forward(torch.zeros(1, 5, dtype=torch.long), cache, [1])
    assert cache.pages_of(1) == [0, 1] and cache.free_pages == 3
    assert cache.block_table[1, :2].tolist() == [0, 1]
    model.forward(torch.zeros(1, 4, dtype=torch.long), cache, [0])
    assert cache.pages_of(0) == [2]
    cache.reset(1)
    assert cache.free_pages == 4 and cache.pages_of(1) == [] and int(cache.lengths[1]) == 0
    model.forward(torch.zeros(1, 2, dtype=torch.long), cache, [2])
    assert cache.pages_of(2) == [0]  # the lowest free page is reused first


def test_pool_exhaustion_is_a_clear_error_and_leaves_the_cache_intact(model):
    cache = paged(num_pages=3)
    model.forward(torch.zeros(1, 8, dtype=torch.long), cache, [0])
    before = [p.clone() for p in cache.k_pools]
    with pytest.raises(ValueError, match="KV cache is full: 2 more pages of 4 tokens needed, 1 free of 3"):
        model.forward(torch.zeros(1, 6, dtype=torch.long), cache, [1])
    assert cache.pages_of(1) == [] and cache.free_pages == 1 and int(cache.lengths[1]) == 0
    assert all(torch.equal(a, b) for a, b in zip(before, cache.k_pools, strict=True))
    # still serving: a sequence that fits goes through
    model.forward(torch.zeros(1, 3, dtype=torch.long), cache, [1])
    assert cache.pages_of(1) == [2]


def test_sequence_longer_than_capacity_is_rejected(model):
    cache = paged(capacity=8)
    with pytest.raises(ValueError, match="exceeds the cache capacity 8"):
        model.forward(torch.zeros(1, 9, dtype=torch.long), cache, [0])
    assert cache.free_pages == cache.num_pages


def test_host_lengths_equal_the_device_lengths(model):
    """`slot_lengths` reads a host copy of ``lengths``: every method that changes the counts keeps
    the two equal, on a contiguous and on a paged cache."""
    for cache in (model.new_cache(3, 40), paged()):
        assert lengths(cache) == [0, 0, 0]
        model.forward(torch.zeros(2, 5, dtype=torch.long), cache, [2, 0])
        assert lengths(cache) == [5, 0, 5]
        model.forward(torch.zeros(3, 1, dtype=torch.long), cache, [1, 2, 0])
        assert lengths(cache) == [6, 1, 6]
        cache.advance([1], 3)
        assert lengths(cache) == [6, 4, 6]
        cache.reset(2)
        assert lengths(cache) == [6, 4, 0]
        with pytest.raises(ValueError, match="exceeds the cache capacity"):
            model.forward(torch.zeros(1, 37, dtype=torch.long), cache, [0])
        assert lengths(cache) == [6, 4, 0]  # a rejected step changes nothing
        cache.reset(0)
        cache.reset(1)
        assert lengths(cache) == [0, 0, 0]


def test_set_lengths_declares_rows_written_by_hand(model):
    cache = model.new_cache(3, 40)
    cache.set_lengths([2, 0], [7, 40])
    assert lengths(cache) == [40, 0, 7]
    with pytest.raises(ValueError, match="out of range for a cache of capacity 40"):
        cache.set_lengths([1], [41])
    with pytest.raises(ValueError, match="expected 2 lengths"):
        cache.set_lengths([0, 1], [3])
    with pytest.raises(ValueError, match="slots"):
        cache.set_lengths([3], [1])
    assert lengths(cache) == [40, 0, 7]


def test_context_classes_cover_every_length():
    """Each step's longest sequence picks one class; the classes a cache can reach are listed."""
    from clusterfuse.engine.fused_model import seq_class_for, seq_classes

    for capacity in (16, 1024, 1500, 5000, 70000):
        reached = sorted({seq_class_for(r, capacity) for r in range(1, capacity + 1)})
        assert reached == seq_classes(capacity)
        assert all(r <= seq_class_for(r, capacity) <= capacity for r in (1, capacity // 2, capacity))
    assert seq_classes(5000) == [1024, 4096, 5000]
    with pytest.raises(ValueError, match="rows"):
        seq_class_for(41, 40)


@pytest.mark.parametrize("num_pages", [2, 9, 64])
def test_tuning_block_table_reads_elsewhere_and_writes_the_scratch_page(num_pages):
    """The table a graph is tuned with: real pages to read (distinct per row while the pool has
    them), and the new token's row in the scratch slot's page, never in another's."""
    from clusterfuse.engine.fused_model import tuning_block_table

    cache = paged(num_pages=num_pages, capacity=40, max_batch=4)  # pages of 4 rows, 10 per sequence
    cache.check_room([3], 1)  # the scratch slot (the last) takes its page, as FusedModel.new_cache does
    scratch = cache.pages_of(3)[0]
    table = tuning_block_table(cache, bucket=2, rows=30)
    assert table.shape == (2, 10) and table.dtype == torch.int32
    write = (30 - 1) // 4
    assert (table[:, write] == scratch).all()
    reads = torch.cat([table[:, :write], table[:, write + 1:]], dim=1)
    assert ((reads >= 0) & (reads < num_pages) & (reads != scratch)).all()
    if num_pages > 2 * 10:
        assert reads.unique().numel() == reads.numel()  # every row its own pages
