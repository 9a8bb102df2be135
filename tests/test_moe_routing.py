"""MoE routing and the fused MoE block's bookkeeping, on the CPU (CI): the reference's tie rule
(equal scores go to the lower index), group-limited routing, the stacked-weights reference op,
the expert union, how the kernel's clusters split the chosen experts' columns
(`clusterfuse.ops.moe_block.expert_pieces`, checked against the kernel's own piece code built for
the host), the bytes a launch reads, and the op's routing options and shape rules."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bench.floor import floor_us, moe_block_bytes
from clusterfuse.models.config import MoEConfig
from clusterfuse.models.presets import preset
from clusterfuse.ops.moe_block import MoeRouting, Piece, check_model_shape, expert_pieces, expert_union
from clusterfuse.reference.moe import moe_block, moe_ffn, route, topk_lowest_index_first
from clusterfuse.reference.ops import gated_mlp, linear, rms_norm

LITE = preset("deepseek-v2-lite")
GREEDY = MoEConfig(n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=24, n_shared_experts=1,
                   routed_scaling_factor=1.5)
GROUPED = dataclasses.replace(GREEDY, topk_method="group_limited_greedy", n_group=4, topk_group=2)


# ------------------------------------------------------------------------------- ties
def test_topk_ties_go_to_the_lower_index():
    values = torch.tensor([[0.1, 0.5, 0.3, 0.5, 0.5, 0.2],
                           [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    w, i = topk_lowest_index_first(values, 3)
    assert i.tolist() == [[1, 3, 4], [0, 1, 2]]
    assert w.tolist() == [[0.5, 0.5, 0.5], [0.0, 0.0, 0.0]]


def test_topk_without_ties_is_torch_topk():
    values = torch.rand(8, 64, generator=torch.Generator().manual_seed(0))
    w, i = topk_lowest_index_first(values, 6)
    tw, ti = torch.topk(values, 6, dim=-1)
    assert torch.equal(i, ti) and torch.equal(w, tw)


def _router_with_tie_at_cut(hidden: int, moe: MoEConfig, x: torch.Tensor, rank: int) -> tuple[torch.Tensor, int, int]:
    """A router whose row of the expert ranked ``rank + 1`` for token 0 copies the one ranked ``rank``
    (both equal for every token); returns it and the two experts."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(moe.n_routed_experts, hidden, generator=gen)
    order = (x[:1] @ w.T).argsort(dim=-1, descending=True)[0]
    a, b = int(order[rank - 1]), int(order[rank])
    w[b] = w[a]
    return w, a, b


@pytest.mark.parametrize("rank", (1, 4))  # a tie inside the top-k, and one at its cut
def test_route_breaks_exact_ties_by_expert_index(rank):
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(2))
    w, a, b = _router_with_tie_at_cut(32, GREEDY, x, rank)
    scores = linear(x, w).softmax(dim=-1)
    assert scores[0, a] == scores[0, b]  # an exact tie
    _, experts = route(x, w, GREEDY)
    row = experts[0].tolist()
    assert min(a, b) in row
    if rank == GREEDY.num_experts_per_tok:  # the tie straddles the cut: only the lower index is kept
        assert max(a, b) not in row
    else:  # both kept, the lower index first
        assert row.index(min(a, b)) < row.index(max(a, b))


def test_group_limited_keeps_the_best_groups_and_breaks_group_ties_by_index():
    moe = GROUPED
    per_group = moe.n_routed_experts // moe.n_group
    x = torch.randn(1, 8, generator=torch.Generator().manual_seed(3))
    w = torch.randn(moe.n_routed_experts, 8, generator=torch.Generator().manual_seed(4)) * 0.1
    # Groups 1 and 3 share the best expert row (an exact tie for the second kept group), group 2 is best.
    best = x[0] / x[0].norm() * 4.0
    w[2 * per_group] = 2 * best
    w[1 * per_group + 1] = best
    w[3 * per_group + 2] = best
    _, experts = route(x, w, moe)
    groups = {e // per_group for e in experts[0].tolist()}
    assert groups <= {1, 2}, groups  # group 3 lost the tie to group 1


def test_group_limited_with_too_few_kept_experts_takes_dropped_ones_by_index():
    moe = dataclasses.replace(GROUPED, num_experts_per_tok=10, topk_group=2)  # kept groups hold 8 experts
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(5))
    w = torch.randn(moe.n_routed_experts, 8, generator=torch.Generator().manual_seed(6))
    weights, experts = route(x, w, moe)
    per_group = moe.n_routed_experts // moe.n_group
    for n in range(2):
        zero = weights[n] == 0
        assert zero.sum() == 2  # the two experts beyond the kept groups score 0
        dropped = experts[n][zero].tolist()
        kept_groups = {e // per_group for e in experts[n][~zero].tolist()}
        lowest = [e for e in range(moe.n_routed_experts) if e // per_group not in kept_groups][:2]
        assert dropped == lowest


def test_norm_topk_prob_normalises_and_scaling_scales():
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(7))
    w = torch.randn(GREEDY.n_routed_experts, 16, generator=torch.Generator().manual_seed(8))
    normed, e1 = route(x, w, dataclasses.replace(GREEDY, norm_topk_prob=True))
    scaled, e2 = route(x, w, GREEDY)
    assert torch.equal(e1, e2)
    assert torch.allclose(normed.sum(-1), torch.ones(4))
    scores = (x @ w.T).softmax(-1)
    assert torch.allclose(scaled, scores.gather(1, e2) * 1.5)


# ------------------------------------------------------------------------------- the block op
def _stacked(moe: MoEConfig, hidden: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    e, i, s = moe.n_routed_experts, moe.moe_intermediate_size, moe.n_shared_experts * moe.moe_intermediate_size

    def rnd(*shape, scale):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    norm = (1 + rnd(hidden, scale=0.1).float()).to(dtype)
    return (norm, rnd(e, hidden, scale=1.0), rnd(e, 2 * i, hidden, scale=hidden**-0.5),
            rnd(e, hidden, i, scale=i**-0.5), (rnd(2 * s, hidden, scale=hidden**-0.5), rnd(hidden, s, scale=s**-0.5)))


@pytest.mark.parametrize("moe", (GREEDY, GROUPED), ids=("greedy", "grouped"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_block_op_is_a_dense_sum_over_chosen_experts(moe, dtype):
    """The stacked-weights block op against an independent dense formula: every expert applied to
    every token, weighted by its routing weight (0 where not chosen), plus the shared MLP."""
    hidden = 40
    norm, router, wgu, wd, shared = _stacked(moe, hidden, dtype)
    x = torch.randn(5, hidden, generator=torch.Generator().manual_seed(9)).to(dtype)
    residual = torch.randn(5, hidden, generator=torch.Generator().manual_seed(10)).to(dtype)
    h = rms_norm(x, norm, 1e-6)
    weights, experts = route(h, router, moe)
    dense = torch.zeros(5, moe.n_routed_experts).scatter_(1, experts, weights)
    want = gated_mlp(h, *shared) + sum(dense[:, e, None] * gated_mlp(h, wgu[e], wd[e])
                                       for e in range(moe.n_routed_experts))
    got = moe_block(x, norm, router, wgu, wd, 1e-6, moe, shared=shared)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    assert torch.equal(got, moe_ffn(h, router, list(wgu), list(wd), shared, moe))
    with_residual = moe_block(x, norm, router, wgu, wd, 1e-6, moe, shared=shared, residual=residual)
    assert with_residual.dtype == dtype and torch.equal(with_residual, (residual.float() + got).to(dtype))


# ------------------------------------------------------------------------------- bookkeeping
def test_expert_union_is_sorted_and_unique():
    ids = torch.tensor([[5, 1, 9], [1, 5, 2], [63, 0, 9]], dtype=torch.int32)
    assert expert_union(ids) == [0, 1, 2, 5, 9, 63]


def _covered(pieces: list[list[Piece]]) -> dict[int, list[tuple[int, int]]]:
    spans: dict[int, list[tuple[int, int]]] = {}
    for run in pieces:
        for p in run:
            spans.setdefault(p.expert, []).append((p.c0, p.c0 + p.length))
    return {e: sorted(s) for e, s in spans.items()}


PIECE_CASES = [
    ([3, 7, 8, 20, 41, 63], 2816, 1408, 16, 704),   # DeepSeek-V2-Lite batch 1, clusters of 8 on 132 SMs
    ([3, 7, 8, 20, 41, 63], 2816, 1408, 33, 352),   # clusters of 4: runs straddle experts
    (list(range(0, 64, 2)), 2816, 1408, 66, 1408),  # clusters of 2
    ([0, 1], 0, 88, 132, 88),                        # no shared experts, more clusters than 8-column units
    ([5], 16, 24, 3, 8),                             # pieces of one unit
]


@pytest.mark.parametrize(("union", "shared", "width", "clusters", "piece_max"), PIECE_CASES)
def test_expert_pieces_cover_each_chosen_column_once(union, shared, width, clusters, piece_max):
    pieces = expert_pieces(union, shared, width, clusters, piece_max)
    assert len(pieces) == clusters
    for run in pieces:
        for p in run:
            assert p.length > 0 and p.length <= piece_max and p.c0 % 8 == 0 and p.length % 8 == 0
            assert p.c0 + p.length <= (shared if p.expert < 0 else width)
    spans = _covered(pieces)
    want = ({-1: shared} if shared else {}) | {e: width for e in union}
    assert set(spans) == set(want)
    for e, s in spans.items():  # contiguous, no overlap, from 0 to the expert's width
        assert s[0][0] == 0 and s[-1][1] == want[e]
        assert all(a[1] == b[0] for a, b in zip(s, s[1:], strict=False))
    lengths = [sum(p.length for p in run) for run in pieces]
    assert max(lengths) - min(lengths) <= 8  # near-equal runs of whole 8-column units


_PIECES_MAIN = r"""
#include <cstdio>
#include <cstdlib>
#include "clusterfuse/moe/block_phases.cuh"
// argv: shared_width width clusters piece_max expert... -> "cluster expert c0 length" per piece
int main(int argc, char** argv) {
  const int Is = atoi(argv[1]), I = atoi(argv[2]), clusters = atoi(argv[3]), piece_max = atoi(argv[4]);
  int list[256];
  const int chosen = argc - 5;
  for (int j = 0; j < chosen; ++j) list[j] = atoi(argv[5 + j]);
  for (int c = 0; c < clusters; ++c) {
    int v0, v1;
    clusterfuse::moe::cluster_run(Is, I, chosen, clusters, c, v0, v1);
    for (int v = v0; v < v1;) {
      const clusterfuse::moe::Piece p = clusterfuse::moe::piece_at(v, v1, Is, I, list, piece_max);
      printf("%d %d %d %d\n", c, p.expert, p.c0, p.len);
      v += p.len;
    }
  }
  return 0;
}
"""


@pytest.fixture(scope="module")
def kernel_pieces(tmp_path_factory):
    """The kernel's own piece code (moe/block_phases.cuh, `cluster_run` and `piece_at`) built for
    the host: a function of the ``expert_pieces`` arguments returning its pieces."""
    import subprocess

    from clusterfuse.ops import build

    if build.find_nvcc() is None:
        pytest.skip("needs nvcc")
    folder = tmp_path_factory.mktemp("moe_pieces")
    (folder / "pieces.cu").write_text(_PIECES_MAIN)
    subprocess.run([build.find_nvcc(), *build.ARCH_FLAGS, "-std=c++17", f"-I{build.INCLUDE_DIR}",
                    str(folder / "pieces.cu"), "-o", str(folder / "pieces")], check=True, capture_output=True)

    def run(union, shared, width, clusters, piece_max) -> list[list[Piece]]:
        lines = subprocess.run([str(folder / "pieces"), *map(str, (shared, width, clusters, piece_max, *union))],
                               check=True, capture_output=True, text=True).stdout.split("\n")
        pieces: list[list[Piece]] = [[] for _ in range(clusters)]
        for line in filter(None, lines):
            c, expert, c0, length = map(int, line.split())
            pieces[c].append(Piece(expert, c0, length))
        return pieces

    return run


@pytest.mark.parametrize(("union", "shared", "width", "clusters", "piece_max"), PIECE_CASES)
def test_kernel_walks_the_same_pieces(kernel_pieces, union, shared, width, clusters, piece_max):
    assert kernel_pieces(union, shared, width, clusters, piece_max) == expert_pieces(union, shared, width, clusters,
                                                                                     piece_max)


def test_lite_batch_one_gives_each_cluster_one_piece():
    pieces = expert_pieces([3, 7, 8, 20, 41, 63], 2816, 1408, 16, 704)
    assert all(len(run) == 1 for run in pieces)
    assert [run[0].expert for run in pieces] == [-1] * 4 + [3, 3, 7, 7, 8, 8, 20, 20, 41, 41, 63, 63]


def test_bytes_read_and_floor_of_deepseek_v2_lite():
    one = moe_block_bytes(LITE, 1, 6)
    # router 64 x 2048, shared 2 x 3 x 2048 x 1408, 6 routed experts of 3 x 2048 x 1408, bf16
    assert one.weights == 2 * (64 * 2048 + 8 * 3 * 2048 * 1408) == 138_674_176
    assert one.total == one.weights + 2 * 2048 + 2 * 2 * 2048
    assert 41.0 < floor_us(one, 3350.0) < 41.5
    worst = moe_block_bytes(LITE, 16, 64)
    assert worst.weights == 2 * (64 * 2048 + 66 * 3 * 2048 * 1408)


# ------------------------------------------------------------------------------- shape rules
def test_routing_from_the_configs():
    assert MoeRouting.from_config(LITE.moe) == MoeRouting(top_k=6)
    assert MoeRouting.from_config(GROUPED) == MoeRouting(top_k=4, n_group=4, topk_group=2, routed_scaling_factor=1.5)
    with pytest.raises(ValueError, match="^moe.scoring_func:"):
        MoeRouting.from_config(dataclasses.replace(GREEDY, scoring_func="sigmoid"))
    with pytest.raises(ValueError, match="^moe.topk_method:"):
        MoeRouting.from_config(dataclasses.replace(GREEDY, topk_method="noaux_tc"))


@pytest.mark.parametrize(("fields", "name"), [
    (dict(top_k=0), "routing.top_k"), (dict(top_k=17), "routing.top_k"), (dict(top_k=6.0), "routing.top_k"),
    (dict(top_k=6, n_group=33, topk_group=3), "routing.n_group"),
    (dict(top_k=6, n_group=8, topk_group=9), "routing.topk_group"),
    (dict(top_k=6, n_group=8, topk_group=0), "routing.topk_group"),
    (dict(top_k=6, norm_topk_prob=1), "routing.norm_topk_prob"),
    (dict(top_k=6, routed_scaling_factor=float("inf")), "routing.routed_scaling_factor"),
])
def test_routing_names_the_bad_field(fields, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        MoeRouting(**fields)


@pytest.mark.parametrize(("args", "name"), [
    ((2044, 1408, 64, MoeRouting(6)), "x"),
    ((2048, 100, 64, MoeRouting(6)), "w_down"),
    ((2048, 1408, 300, MoeRouting(6)), "w_down"),
    ((2048, 1408, 4, MoeRouting(6)), "routing.top_k"),
    ((2048, 1408, 64, MoeRouting(6, n_group=5, topk_group=2)), "routing.n_group"),
    ((2048, 1408, 64, MoeRouting(6), 100), "shared_down"),
])
def test_check_model_shape_names_the_argument(args, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        check_model_shape(*args)


def test_check_model_shape_takes_the_real_configs():
    check_model_shape(2048, 1408, 64, MoeRouting.from_config(LITE.moe), 2816)  # DeepSeek-V2-Lite
    v2 = dataclasses.replace(LITE.moe, n_routed_experts=160, n_group=8, topk_group=3,
                             topk_method="group_limited_greedy", routed_scaling_factor=16.0)
    check_model_shape(5120, 1536, 160, MoeRouting.from_config(v2), 3072)  # DeepSeek-V2
