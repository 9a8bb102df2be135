"""CPU checks of the fused MLA block's math and memory layout (no GPU): the absorbed dataflow the
kernel and the PyTorch baseline run equals the unabsorbed MLA math (per-head keys and values
decompressed from the latent) and the reference in fp32; `prepare_mla_weights` packs and refuses
as documented; the latent cache row addresses and key splits the kernel computes (mirrored here
from KvLayout::row and key_range) cover the paged layout exactly."""

from __future__ import annotations

import pytest
import torch

from bench.baselines.torch_mla import absorbed_mla_block
from clusterfuse.engine.paged_cache import PagedKVCache
from clusterfuse.models.config import MLAConfig
from clusterfuse.ops.mla_block import LATENT_DIM, MlaBlockWeights, _check_values, prepare_mla_weights
from clusterfuse.reference.kv_storage import PagedRowStore
from clusterfuse.reference.ops import rms_norm
from clusterfuse.reference.rope import apply_rope
from tests.mla_fixtures import EPS, HEADS, MLA, SOFTMAX_SCALE, paged_cache, random_layer, reference_block, rope_tables

HIDDEN = 256  # the MLA dimensions are the model's; the hidden size only sets the GEMVs' K


def _unabsorbed(hidden, norm, w, cos, sin, positions, pool, table, lens):
    """MLA as the model card writes it: per-head keys [W_UK c | k_pe] and values W_UV c decompressed
    from the cached latent rows (the rows themselves already appended), standard softmax attention."""
    nope, rope, rank, v = MLA.qk_nope_head_dim, MLA.qk_rope_head_dim, MLA.kv_lora_rank, MLA.v_head_dim
    x = rms_norm(hidden, norm, EPS)
    q = (x @ w.w_q.float().T).view(len(lens), HEADS, nope + rope)
    q_pe = apply_rope(q[..., nope:][:, :, None], cos, sin, positions.long()[:, None], interleaved=True)[:, :, 0]
    kv_b = w.w_kv_b.float().view(HEADS, nope + v, rank)
    store = PagedRowStore(pool, table)
    outs = []
    for b, n in enumerate(lens):
        rows = store.read(b, n + 1).float()
        c, k_pe = rows[:, :rank], rows[:, rank:]
        keys = torch.cat([torch.einsum("lc,hnc->hln", c, kv_b[:, :nope]), k_pe[None].expand(HEADS, -1, -1)], -1)
        values = torch.einsum("lc,hvc->hlv", c, kv_b[:, nope:])
        qb = torch.cat([q[b, :, :nope], q_pe[b]], -1)
        p = (torch.einsum("hd,hld->hl", qb, keys) * SOFTMAX_SCALE).softmax(-1)
        outs.append(torch.einsum("hl,hlv->hv", p, values).reshape(-1))
    return torch.stack(outs) @ w.w_o.float().T


@pytest.mark.parametrize("lens", [[0], [5, 63, 64, 130]])
def test_absorbed_equals_unabsorbed_and_reference_fp32(lens):
    torch.manual_seed(0)
    norm, w = random_layer(HIDDEN, torch.float32, "cpu", seed=1)
    cos, sin = rope_tables(512, "cpu")
    positions = torch.tensor(lens, dtype=torch.int64)
    hidden = torch.randn(len(lens), HIDDEN)
    pool, table = paged_cache(lens, 64, torch.float32, "cpu", seed=2)
    pool_abs, pool_ref = pool.clone(), pool.clone()
    packed = prepare_mla_weights(w, MLA, HEADS)
    absorbed = absorbed_mla_block(hidden, norm, packed, cos, sin, positions, pool_abs, torch.tensor(lens), table,
                                  eps=EPS, softmax_scale=SOFTMAX_SCALE, max_len=max(lens) + 1) - hidden
    ref = reference_block(hidden, norm, w, cos, sin, positions, pool_ref, table, lens, residual=False)
    # The absorbed pass appended the same rows as the reference, and nothing else changed.
    torch.testing.assert_close(pool_abs, pool_ref, rtol=1e-5, atol=1e-5)
    unabsorbed = _unabsorbed(hidden, norm, w, cos, sin, positions, pool_ref, table, lens)
    torch.testing.assert_close(absorbed, unabsorbed, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ref, unabsorbed, rtol=1e-4, atol=1e-4)


def test_prepare_mla_weights_packs_kv_b_per_head():
    _, w = random_layer(HIDDEN, torch.bfloat16, "cpu", seed=3)
    p = prepare_mla_weights(w, MLA, HEADS)
    assert isinstance(p, MlaBlockWeights)
    nope, v = MLA.qk_nope_head_dim, MLA.v_head_dim
    for h in (0, 7, 15):
        base = h * (nope + v)
        assert torch.equal(p.w_uk[h], w.w_kv_b[base:base + nope])
        assert torch.equal(p.w_uv[h], w.w_kv_b[base + nope:base + nope + v])
    assert torch.equal(p.w_qa, torch.cat([w.w_q, w.w_kv_a]))
    assert all(t.is_contiguous() for t in (p.w_qa, p.w_uk, p.w_uv, p.w_o))


def test_prepare_mla_weights_refuses_what_the_kernel_does_not_build():
    _, w = random_layer(HIDDEN, torch.bfloat16, "cpu", seed=4)
    with pytest.raises(ValueError, match="mla: the kernel is built for"):
        prepare_mla_weights(w, MLAConfig(kv_lora_rank=256, qk_nope_head_dim=128, qk_rope_head_dim=64,
                                         v_head_dim=128), HEADS)
    with pytest.raises(ValueError, match="q LoRA"):
        prepare_mla_weights(w, MLAConfig(512, 128, 64, 128, q_lora_rank=1536), HEADS)
    with pytest.raises(ValueError, match="mla: the kernel is built for"):
        prepare_mla_weights(w, MLA, 8)
    w.b_o = torch.zeros(HIDDEN, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="b_o"):
        prepare_mla_weights(w, MLA, HEADS)
    with pytest.raises(ValueError, match="w: expected MLA weights"):
        prepare_mla_weights({"w_q": None}, MLA, HEADS)


# --------------------------------------------------------------------- the kernel's indexing, mirrored
def _split_range(n_units: int, parts: int, i: int, unit: int) -> tuple[int, int]:
    """clusterfuse/split_range.cuh."""
    return unit * (i * n_units // parts), unit * ((i + 1) * n_units // parts)


def _key_range(length: int, parts: int, rank: int) -> tuple[int, int]:
    """clusterfuse/attention/block_phases.cuh key_range: whole 16-key tiles, the last run ends at length."""
    k0, k1 = _split_range(-(-length // 16), parts, rank, 16)
    return k0, min(k1, length)


def _block_keys(length: int, splits: int, cluster: int, s: int, rank: int) -> tuple[int, int]:
    """The keys block `rank` of the cluster holding key split `s` attends (mla_block.cu, phase C)."""
    a0, a1 = _key_range(length, splits, s)
    k0, k1 = _key_range(max(a1 - a0, 0), cluster, rank)
    return k0 + a0, k1 + a0


@pytest.mark.parametrize("cluster", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("splits", [1, 2, 3, 8, 33, 132])
def test_key_splits_cover_every_key_once(cluster, splits):
    for length in (1, 2, 15, 16, 17, 63, 64, 65, 1000, 4097):
        seen = []
        for s in range(splits):
            for r in range(cluster):
                k0, k1 = _block_keys(length, splits, cluster, s, r)
                if k1 > k0:
                    assert k0 % 16 == 0, (length, s, r)  # tiles start at multiples of 16: one page each
                    seen.extend(range(k0, k1))
        assert seen == list(range(length)), (length, splits, cluster)


def _row_offset(block_table: torch.Tensor | None, page_size: int, b: int, j: int) -> int:
    """KvLayout::row<576>(b, 0, j) with nkv = 1: element offset of row j of sequence b."""
    page, slot = b, j
    if block_table is not None:
        page, slot = int(block_table[b, j // page_size]), j % page_size
    return (page * page_size + slot) * LATENT_DIM


@pytest.mark.parametrize("page_size", [16, 64, 100])
def test_kernel_row_addresses_match_the_paged_latent_cache(page_size):
    cache = PagedKVCache.for_latent(1, 3, 300, LATENT_DIM, page_size=page_size, num_pages=64,
                                    dtype=torch.float32, device="cpu")
    (store,) = cache.layer_stores(0)
    cache.check_room([0, 1, 2], 300)
    assert tuple(store.pool.shape) == (64, page_size, LATENT_DIM)
    rows = torch.randn(3, 300, LATENT_DIM)
    for b in range(3):
        store.write(b, 0, rows[b])
    flat = store.pool.reshape(-1)
    for b in range(3):
        for j in (0, 1, page_size - 1, page_size, 299):
            off = _row_offset(store.block_table, page_size, b, j)
            assert torch.equal(flat[off:off + LATENT_DIM], rows[b, j])


def test_kernel_row_addresses_match_a_contiguous_latent_cache():
    cache = torch.randn(3, 50, LATENT_DIM)
    flat = cache.reshape(-1)
    for b, j in ((0, 0), (1, 49), (2, 17)):
        off = _row_offset(None, 50, b, j)  # contiguous: page = sequence, page_size = capacity
        assert torch.equal(flat[off:off + LATENT_DIM], cache[b, j])


def test_index_checks_name_the_first_bad_sequence():
    """The op's host-side range checks (before any launch; pure torch, so they run here on CPU tensors)."""
    cos = torch.zeros(100, 32)
    pool = torch.zeros(6, 16, LATENT_DIM)
    table = torch.tensor([[0, 1, 2], [3, 4, 7]], dtype=torch.int32)  # sequence 1's third page is outside the pool
    lens, pos = torch.tensor([20, 31]), torch.tensor([20, 31])
    assert _check_values(cos, pos, pool, lens, table, 48) == 31  # rows 0..31: pages 0 and 1 only
    with pytest.raises(ValueError, match=r"block_table: row 1 names a page outside \[0, 6\) among its first 3"):
        _check_values(cos, pos, pool, torch.tensor([20, 32]), table, 48)
    with pytest.raises(ValueError, match="cache_lens: sequence 0 has 48 cached rows"):
        _check_values(cos, pos, pool, torch.tensor([48, 3]), table, 48)
    with pytest.raises(ValueError, match="cache_lens: sequence 1 has -1"):
        _check_values(cos, pos, pool, torch.tensor([0, -1]), table, 48)
    with pytest.raises(ValueError, match=r"positions: sequence 1 is at position 100, outside the rope table"):
        _check_values(cos, torch.tensor([5, 100]), pool, lens, table, 48)
    assert _check_values(cos, pos, torch.zeros(2, 48, LATENT_DIM), lens, None, 48) == 31  # contiguous
