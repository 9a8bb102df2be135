"""GPU tests of the cluster primitives (ClusterReduce, ClusterGather) through their test kernels.

References replay the kernels' fixed combination order in fp32 on the GPU, so fp32 results
must match *exactly*; bf16/fp16 tiles (fp32 accumulation, one rounding) get a tolerance.
Every cluster size, dtype, algorithm and exchange; tile sizes from 1 element to 48 KB and odd
ones; all-reduce and reduce-to-root; back-to-back calls in one kernel (phase handling);
softmax merge against float64; bit-identical results in every block; CUDA-graph capture;
bad arguments. Outputs are NaN-poisoned by the ops before each launch.
"""

from __future__ import annotations

import math

import pytest
import torch

from clusterfuse.ops import primitives as P

CLUSTERS = (1, 2, 4, 8, 16)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SIZES = (1, 7, 128, 1000, 4096, 4099, 12288)
ALGOS = ("tree", "ring")
EXCHANGES = ("dsm", "global")
RECORDS_PER_MSG = 2048  # ClusterReduce's default kChunkFloats, for elementwise ops (kRecord = 1)


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, device="cuda", dtype=torch.float32).to(dtype)


def _combine(a, b, op):
    return a + b if op == "sum" else torch.maximum(a, b)


def tree_reference(x: torch.Tensor, op: str) -> torch.Tensor:
    """Recursive doubling: round r combines (lower rank, higher rank) pairs at distance 2^r.
    Returns [clusters, elems] in fp32."""
    y = x.float()
    while y.shape[1] > 1:
        y = _combine(y[:, 0::2], y[:, 1::2], op)
    return y[:, 0]


def ring_segments(n: int, elems: int) -> torch.Tensor:
    """For each element, the ring segment g (= the block whose value starts its reduction)."""
    per = min(elems, n * RECORDS_PER_MSG)
    idx = torch.arange(elems, device="cuda")
    local = idx % per
    count = torch.where(idx // per == elems // per, torch.full_like(idx, elems % per), torch.full_like(idx, per))
    count = torch.where(count == 0, torch.full_like(idx, per), count)
    seg = (count + n - 1) // n
    return local // seg


def ring_reference(x: torch.Tensor, op: str) -> torch.Tensor:
    """Ring reduce-scatter order: segment g is ((x_g op x_{g+1}) op x_{g+2}) ... op x_{g-1}."""
    _, n, elems = x.shape
    xf = x.float()
    g = ring_segments(n, elems)
    pick = lambda k: torch.gather(xf, 1, ((g + k) % n).expand(xf.shape[0], 1, elems)).squeeze(1)  # noqa: E731
    acc = pick(0)
    for k in range(1, n):
        acc = _combine(acc, pick(k), op)
    return acc


def reference(x, op, algo):
    return tree_reference(x, op) if algo == "tree" else ring_reference(x, op)


def assert_close_to(out_tiles: torch.Tensor, ref32: torch.Tensor, dtype: torch.dtype, exact: bool):
    """out_tiles [clusters, k, elems] (any blocks) against ref32 [clusters, elems]."""
    assert not torch.isnan(out_tiles).any(), "NaN in output (unwritten element?)"
    want = ref32.to(dtype).unsqueeze(1).expand_as(out_tiles)
    if exact:
        assert torch.equal(out_tiles, want), f"max diff {(out_tiles.float() - want.float()).abs().max().item()}"
    else:
        err = (out_tiles.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)
        assert err < 1e-2, f"relative error {err.item():.3g}"


# ------------------------------------------------------------------------------- reduce
@pytest.mark.gpu
@pytest.mark.parametrize("exchange", EXCHANGES)
@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", CLUSTERS)
def test_all_reduce_sum(n, dtype, algo, exchange):
    for elems in SIZES:
        x = _randn(3, n, elems, dtype=dtype)
        out = P.cluster_reduce(x, "sum", algo, exchange)
        assert_close_to(out, reference(x, "sum", algo), dtype, exact=dtype == torch.float32)
        # deterministic: every block holds bit-identical values
        assert torch.equal(out, out[:, :1].expand_as(out)), f"blocks disagree at elems={elems}"


@pytest.mark.gpu
@pytest.mark.parametrize("exchange", EXCHANGES)
@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", CLUSTERS)
def test_all_reduce_max_exact(n, dtype, algo, exchange):
    for elems in SIZES:
        x = _randn(2, n, elems, dtype=dtype)
        out = P.cluster_reduce(x, "max", algo, exchange)
        assert torch.equal(out, x.amax(dim=1, keepdim=True).expand_as(out)), f"elems={elems}"


@pytest.mark.gpu
@pytest.mark.parametrize("exchange", EXCHANGES)
@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("n", (2, 4, 8, 16))
def test_reduce_to_root(n, algo, exchange):
    for root in sorted({0, n - 1, n // 2 + 1 if n > 2 else 1}):
        for elems in (7, 4099):
            x = _randn(2, n, elems)
            out = P.cluster_reduce(x, "sum", algo, exchange, root=root)
            assert torch.equal(out[:, root], reference(x, "sum", algo)), f"root={root} elems={elems}"
            others = [b for b in range(n) if b != root]
            assert torch.equal(out[:, others], x[:, others]), "non-root tiles must be left unchanged"


@pytest.mark.gpu
@pytest.mark.parametrize("exchange", EXCHANGES)
@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("n", (2, 4, 16))
def test_back_to_back_calls(n, algo, exchange):
    """Many calls in one kernel: phases, slot reuse and credits must stay consistent."""
    for elems in (1, 130, 5000):  # 5000 elements: several chunks per call on the tree
        x = _randn(2, n, elems)
        out = P.cluster_reduce(x, "max", algo, exchange, repeats=9)
        assert torch.equal(out, x.amax(dim=1, keepdim=True).expand_as(out))
    x = _randn(2, n, 3000)
    # tree sum of equal tiles is exact scaling by N per extra call (powers of two)
    out = P.cluster_reduce(x, "sum", "tree", exchange, repeats=3)
    assert torch.equal(out[:, 0], tree_reference(x, "sum") * n * n)
    # back-to-back reduce-to-root: each link carries messages one way only, then the other way
    for root in (0, n - 1):
        out = P.cluster_reduce(x, "max", algo, exchange, root=root, repeats=4)
        assert torch.equal(out[:, root], x.amax(dim=1))


@pytest.mark.gpu
def test_many_clusters_and_thread_counts():
    x = _randn(132, 4, 1500)
    for threads in (32, 128, 1024):
        out = P.cluster_reduce(x, "sum", "tree", "dsm", threads=threads)
        assert torch.equal(out[:, 0], tree_reference(x, "sum"))


# ------------------------------------------------------------------------------- softmax merge
def softmax_merge_reference(m, l, o):
    m64, l64, o64 = m.double(), l.double(), o.double()
    big = m64.amax(dim=1)
    scale = torch.where(m64 == -math.inf, torch.zeros_like(m64), torch.exp(m64 - big.unsqueeze(1)))
    return big, (l64 * scale).sum(1), (o64 * scale.unsqueeze(-1)).sum(1)


@pytest.mark.gpu
@pytest.mark.parametrize("exchange", EXCHANGES)
@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("d", (64, 128))
@pytest.mark.parametrize("n", CLUSTERS)
def test_softmax_merge(n, d, algo, exchange):
    clusters, rows = 3, 37
    m = _randn(clusters, n, rows) * 4
    l = torch.rand(clusters, n, rows, device="cuda") * 10 + 0.5
    o = _randn(clusters, n, rows, d) * l.unsqueeze(-1)
    if n > 1:  # an empty split (no keys) in some rows must merge as the identity
        m[:, 1, :5] = -math.inf
        l[:, 1, :5] = 0
        o[:, 1, :5] = 0
    rm, rl, ro = softmax_merge_reference(m, l, o)
    gm, gl, go = P.softmax_merge(m, l, o, algo=algo, exchange=exchange)
    assert torch.equal(gm.double(), rm)
    for got, want in ((gl, rl), (go, ro)):
        assert not torch.isnan(got).any()
        err = (got.double() - want).norm() / want.norm()
        assert err < 1e-5, f"relative error {err.item():.3g}"
    # normalised attention output
    err = (go / gl.unsqueeze(-1) - (ro / rl.unsqueeze(-1)).float()).norm() / (ro / rl.unsqueeze(-1)).norm()
    assert err < 1e-5


# ------------------------------------------------------------------------------- gather
GATHER_SIZES = (1, 7, 128, 1000, 4096, 12288)


@pytest.mark.gpu
@pytest.mark.parametrize("exchange", EXCHANGES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", CLUSTERS)
def test_all_gather(n, dtype, exchange):
    tested = 0
    for elems in GATHER_SIZES:
        stages = next((s for s in (2, 1) if P.smem_fits_gather(n, dtype, elems, s)), None)
        if stages is None:
            continue
        x = _randn(3, n, elems, dtype=dtype)
        for repeats in (1, 5):
            out = P.cluster_gather(x, exchange, repeats=repeats, stages=stages)
            shift = (torch.arange(n, device="cuda") + repeats - 1) % n
            want = x[:, shift].unsqueeze(1).expand(-1, n, -1, -1)
            assert torch.equal(out, want), f"elems={elems} repeats={repeats} stages={stages}"
            tested += 1
    assert tested


# ------------------------------------------------------------------------------- integration
@pytest.mark.gpu
def test_cuda_graph_capture():
    x = _randn(4, 8, 777)
    static_out = None
    P.cluster_reduce(x, "sum", "tree", "dsm")  # build + warm up outside the capture
    P.cluster_reduce(x, "sum", "ring", "global")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = (P.cluster_reduce(x, "sum", "tree", "dsm"), P.cluster_reduce(x, "sum", "ring", "global"))
    x.copy_(_randn(4, 8, 777))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out[0][:, 0], tree_reference(x, "sum"))
    assert torch.equal(static_out[1][:, 0], ring_reference(x, "sum"))


@pytest.mark.gpu
def test_torch_compile():
    x = _randn(2, 4, 300)
    fn = torch.compile(lambda t: P.cluster_reduce(t * 2, "max", "tree", "dsm"), fullgraph=True)
    assert torch.equal(fn(x), (x * 2).amax(1, keepdim=True).expand_as(x))


# ------------------------------------------------------------------------------- bad arguments
@pytest.mark.gpu
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(x=(2, 3, 16)), "x: cluster size"),
        (dict(x=(2, 4, 16), dtype=torch.int32), "x: dtype"),
        (dict(x=(2, 4, 16), dtype=torch.float64), "x: dtype"),
        (dict(x=(4, 16)), "x: expected shape"),
        (dict(x=(2, 4, 16), op="mean"), "op:"),
        (dict(x=(2, 4, 16), op="softmax"), "op:"),
        (dict(x=(2, 4, 16), algo="butterfly"), "algo:"),
        (dict(x=(2, 4, 16), exchange="nvlink"), "exchange:"),
        (dict(x=(2, 4, 16), root=4), "root:"),
        (dict(x=(2, 4, 16), repeats=0), "repeats:"),
        (dict(x=(2, 4, 16), threads=100), "threads:"),
        (dict(x=(1, 16, 10**6)), "shared memory"),
    ],
)
def test_reduce_bad_arguments(kwargs, match):
    shape = kwargs.pop("x")
    dtype = kwargs.pop("dtype", torch.float32)
    x = torch.ones(shape, device="cuda").to(dtype)
    with pytest.raises(ValueError, match=match):
        P.cluster_reduce(x, **kwargs)


@pytest.mark.gpu
def test_gather_and_merge_bad_arguments():
    with pytest.raises(ValueError, match="x: cluster size"):
        P.cluster_gather(torch.ones(1, 5, 8, device="cuda"))
    with pytest.raises(ValueError, match="stages"):
        P.cluster_gather(torch.ones(1, 4, 8, device="cuda"), stages=3)
    m = torch.zeros(1, 4, 2, device="cuda")
    with pytest.raises(ValueError, match="o:"):
        P.softmax_merge(m, m.clone(), torch.zeros(1, 4, 3, 64, device="cuda"))
    with pytest.raises(ValueError, match="l:"):
        P.softmax_merge(m, m.half(), torch.zeros(1, 4, 2, 64, device="cuda"))
