"""GPU tests of the fused MLA decode block (DeepSeek-V2-Lite, absorbed) against the reference
(`clusterfuse.reference.mla.mla_self_attention`, fp32): batch 1/4/16, lengths at and around page
boundaries and odd ones, bf16/fp16, every cluster size, paged and contiguous latent caches.

Fresh random inputs every run, never zeros; relative error ‖out − ref‖ / ‖ref‖ < 1e-2, NaN never
passes; the appended latent row matches the reference's and no other cache row changes; repeats are
bit-identical; the residual output; CUDA-graph capture; the tuner; argument validation.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from tests.mla_fixtures import EPS, HEADS, MLA, SOFTMAX_SCALE, paged_cache, random_layer, reference_block, rope_tables

pytestmark = pytest.mark.gpu

HIDDEN = 2048  # DeepSeek-V2-Lite
#: Fresh inputs every run; a failure names the seed that reproduces it (pass it to _inputs).
RUN_SEED = int(torch.randint(0, 1 << 30, (1,)))
TOL = 1e-2
PAGE = 64
CLUSTERS = (1, 2, 4, 8, 16)
DTYPES = (torch.bfloat16, torch.float16)
# Cached rows per sequence (the new token is row len): empty, odd, at / across page boundaries, long.
LENGTHS = {
    "b1-empty": [0],
    "b1-odd": [1023],
    "b1-page-edge": [PAGE - 1],
    "b1-4k": [4096],
    "b4-mixed": [1, PAGE, 2 * PAGE + 1, 777],
    "b16-mixed": [0, 1, 15, 16, 17, PAGE - 1, PAGE, PAGE + 1, 100, 255, 256, 257, 513, 1000, 2047, 3001],
}
# The default key loop over every cluster size; the tensor-core loop (key_loop="mma") over two.
_CASES = [(*c, "simt") for c in itertools.product(LENGTHS, DTYPES, CLUSTERS)] + \
    [(*c, "mma") for c in itertools.product(LENGTHS, DTYPES, (2, 8))]


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    assert not torch.isnan(out).any(), "NaN in the output"
    return ((out - ref).norm() / ref.norm()).item()


def _inputs(lens: list[int], dtype: torch.dtype, seed: int, paged: bool = True, page: int = PAGE):
    from clusterfuse.ops.mla_block import prepare_mla_weights

    dev = "cuda"
    norm, w = random_layer(HIDDEN, dtype, dev, seed)
    cos, sin = rope_tables(max(lens) + 64, dev)
    g = torch.Generator().manual_seed(seed + 1)
    hidden = torch.randn(len(lens), HIDDEN, generator=g).to(dtype).to(dev)
    positions = torch.tensor(lens, dtype=torch.int64, device=dev)
    pool, table = paged_cache(lens, page, dtype, dev, seed + 2)
    if not paged:  # each sequence's rows in order, then the capacity: the contiguous layout
        cap = table.shape[1] * page
        pool = torch.stack([pool[table[b].long()].reshape(cap, -1) for b in range(len(lens))])
        table = None
    return norm, w, prepare_mla_weights(w, MLA, HEADS), cos, sin, hidden, positions, pool, table


def _run(norm, packed, cos, sin, hidden, positions, cache, table, lens, *, cluster, residual=True,
         key_loop="simt", page=PAGE):
    from clusterfuse.ops.mla_block import mla_block

    return mla_block(hidden, norm, packed, cos, sin, positions, cache, torch.tensor(lens, dtype=torch.int32,
                     device="cuda"), eps=EPS, softmax_scale=SOFTMAX_SCALE, block_table=table,
                     page_size=None if table is None else page, residual=hidden if residual else None,
                     cluster_size=cluster, key_loop=key_loop)


def _reference(norm, w, cos, sin, hidden, positions, cache, table, lens, residual=True):
    if table is None:  # the reference reads a contiguous cache as pages of the whole capacity
        ids = torch.arange(len(lens), dtype=torch.int32, device="cuda")[:, None]
        return reference_block(hidden, norm, w, cos, sin, positions, cache, ids, lens, residual=residual)
    return reference_block(hidden, norm, w, cos, sin, positions, cache, table, lens, residual=residual)


@pytest.mark.parametrize(("lengths", "dtype", "cluster", "key_loop"), _CASES,
                         ids=[f"{n}-{str(d)[6:]}-c{c}-{k}" for n, d, c, k in _CASES])
def test_matches_reference(lengths, dtype, cluster, key_loop):
    lens = LENGTHS[lengths]
    seed = RUN_SEED + len(lens) * 100 + cluster
    norm, w, packed, cos, sin, hidden, positions, pool, table = _inputs(lens, dtype, seed=seed)
    ref_pool = pool.clone()
    ours_pool = pool.clone()
    # fp32 outputs (no residual): the block's update compared at full precision.
    ref = _reference(norm, w, cos, sin, hidden, positions, ref_pool, table, lens, residual=False)
    out = _run(norm, packed, cos, sin, hidden, positions, ours_pool, table, lens, cluster=cluster, residual=False,
               key_loop=key_loop)
    assert out.dtype == torch.float32
    err = _rel_err(out, ref)
    assert err < TOL, f"relative error {err:.3e} (seed {seed})"
    # The new rows: as the reference's (GEMV order may move a last bit); every other row untouched.
    ps = pool.shape[1]
    new = torch.zeros(pool.shape[:2], dtype=torch.bool, device="cuda")
    for b, n in enumerate(lens):
        new[int(table[b, n // ps]), n % ps] = True
    assert torch.equal(ours_pool[~new], pool[~new]), "a cache row other than the new ones changed"
    assert _rel_err(ours_pool[new], ref_pool[new]) < TOL, f"the new latent rows (seed {seed})"
    # Bit-identical repeat (on a fresh copy of the cache).
    again_pool = pool.clone()
    again = _run(norm, packed, cos, sin, hidden, positions, again_pool, table, lens, cluster=cluster, residual=False,
                 key_loop=key_loop)
    assert torch.equal(out, again), "repeated call differs (non-deterministic reduction or a race)"
    assert torch.equal(ours_pool, again_pool)


@pytest.mark.parametrize("key_loop", ["simt", "mma"])
@pytest.mark.parametrize("cluster", [2, 8])
def test_the_engines_pages_of_16_rows(cluster, key_loop):
    """The DeepSeek engine's latent pool has pages of 16 rows (engine.decode_graphs.PAGE_SIZE), a quarter
    of the other tests' pages: sequences over many pages, at and across their edges."""
    from clusterfuse.engine.decode_graphs import PAGE_SIZE

    lens = [0, 15, 16, 17, 31, 33, 255, 1000]
    seed = RUN_SEED + 21 + cluster
    norm, w, packed, cos, sin, hidden, positions, pool, table = _inputs(lens, torch.bfloat16, seed, page=PAGE_SIZE)
    ours_pool, ref_pool = pool.clone(), pool.clone()
    ref = _reference(norm, w, cos, sin, hidden, positions, ref_pool, table, lens, residual=False)
    out = _run(norm, packed, cos, sin, hidden, positions, ours_pool, table, lens, cluster=cluster, residual=False,
               key_loop=key_loop, page=PAGE_SIZE)
    assert _rel_err(out, ref) < TOL, f"seed {seed}"
    assert _rel_err(ours_pool, ref_pool) < TOL, f"the cache after the append (seed {seed})"


@pytest.mark.parametrize("key_loop", ["simt", "mma"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_contiguous_cache_and_residual(dtype, key_loop):
    lens = [5, 64, 300]
    norm, w, packed, cos, sin, hidden, positions, cache, table = _inputs(lens, dtype, seed=RUN_SEED + 11, paged=False)
    ref = _reference(norm, w, cos, sin, hidden, positions, cache.clone(), table, lens, residual=True)
    out = _run(norm, packed, cos, sin, hidden, positions, cache, table, lens, cluster=4, residual=True,
               key_loop=key_loop)
    assert out.dtype == dtype
    assert _rel_err(out, ref) < TOL


@pytest.mark.parametrize("key_loop", ["simt", "mma"])
def test_long_sequence_32k(key_loop):
    lens = [32768 - 1]  # the new token fills the last row of a 32K cache
    norm, w, packed, cos, sin, hidden, positions, pool, table = _inputs(lens, torch.bfloat16, seed=RUN_SEED + 21)
    ref = _reference(norm, w, cos, sin, hidden, positions, pool.clone(), table, lens, residual=False)
    out = _run(norm, packed, cos, sin, hidden, positions, pool, table, lens, cluster=4, residual=False,
               key_loop=key_loop)
    assert _rel_err(out, ref) < TOL


def test_tuner_and_cuda_graph():
    lens = [100, 2000, 7, 64]
    norm, w, packed, cos, sin, hidden, positions, pool, table = _inputs(lens, torch.bfloat16, seed=RUN_SEED + 31)
    eager = _run(norm, packed, cos, sin, hidden, positions, pool.clone(), table, lens, cluster=None)
    graph_pool = pool.clone()
    lens_t = torch.tensor(lens, dtype=torch.int32, device="cuda")
    from clusterfuse.ops.mla_block import mla_block

    def step():
        return mla_block(hidden, norm, packed, cos, sin, positions, graph_pool, lens_t, eps=EPS,
                         softmax_scale=SOFTMAX_SCALE, block_table=table, page_size=PAGE, residual=hidden)

    step()  # tuned and set up before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


def test_validation_errors():
    from clusterfuse.ops.mla_block import mla_block

    lens = [10, 20]
    norm, w, packed, cos, sin, hidden, positions, pool, table = _inputs(lens, torch.bfloat16, seed=RUN_SEED + 41)
    lens_t = torch.tensor(lens, dtype=torch.int32, device="cuda")
    kw = dict(eps=EPS, softmax_scale=SOFTMAX_SCALE, block_table=table, page_size=PAGE)
    with pytest.raises(ValueError, match="hidden: dtype"):
        mla_block(hidden.float(), norm, packed, cos, sin, positions, pool, lens_t, **kw)
    with pytest.raises(ValueError, match="norm_weight"):
        mla_block(hidden, norm[:-16], packed, cos, sin, positions, pool, lens_t, **kw)
    with pytest.raises(ValueError, match="weights: expected MlaBlockWeights"):
        mla_block(hidden, norm, w, cos, sin, positions, pool, lens_t, **kw)
    with pytest.raises(ValueError, match="cache_lens: sequence 1"):
        big = torch.tensor([10, table.shape[1] * PAGE], dtype=torch.int32, device="cuda")
        mla_block(hidden, norm, packed, cos, sin, positions, pool, big, **kw)
    with pytest.raises(ValueError, match="positions: sequence 0"):
        mla_block(hidden, norm, packed, cos, sin, positions + cos.shape[0], pool, lens_t, **kw)
    with pytest.raises(ValueError, match="block_table: row 0"):
        bad = table.clone()
        bad[0, 0] = pool.shape[0]
        mla_block(hidden, norm, packed, cos, sin, positions, pool, lens_t, **{**kw, "block_table": bad})
    with pytest.raises(ValueError, match="page_size"):
        mla_block(hidden, norm, packed, cos, sin, positions, pool, lens_t, **{**kw, "page_size": 32})
    with pytest.raises(ValueError, match="cluster_size"):
        mla_block(hidden, norm, packed, cos, sin, positions, pool, lens_t, cluster_size=3, **kw)
    with pytest.raises(ValueError, match="key_loop"):
        mla_block(hidden, norm, packed, cos, sin, positions, pool, lens_t, key_loop="wgmma", **kw)
    with pytest.raises(ValueError, match="softmax_scale"):
        mla_block(hidden, norm, packed, cos, sin, positions, pool, lens_t, **{**kw, "softmax_scale": 0.0})
    with pytest.raises(ValueError, match="hidden: batch"):
        h17 = torch.randn(17, HIDDEN, device="cuda").to(torch.bfloat16)
        mla_block(h17, norm, packed, cos, sin, positions, pool, lens_t, **kw)
