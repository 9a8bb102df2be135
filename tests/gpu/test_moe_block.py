"""GPU tests of the fused MoE block kernel against the reference (`clusterfuse.reference.moe`, fp32).

Fresh random inputs every run (never zeros), outputs poisoned before each launch, relative error
‖out − ref‖ / ‖ref‖ < 1e-2, NaN never passes; the chosen experts and their weights equal the
reference's (exact ties constructed on purpose go to the lower index, in the experts and in
group-limited routing's groups); the experts no sequence chose are never used (their weights are
NaN); bit-identical repeats; every cluster size; batches 1/4/16 and odd ones; the residual variant;
CUDA-graph replays whose routing changes between replays; argument validation.

The output is compared with the reference's experts applied with the kernel's routing, and the
routing with the reference's separately (equal, or else a near tie of the reference's scores), so
that a near tie decided the other way (the two sides round and sum in different orders) fails
neither check, while a wrong choice fails the routing check.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from clusterfuse.models.config import MoEConfig
from clusterfuse.models.presets import preset

pytestmark = pytest.mark.gpu

SHAPES = {  # name: (hidden, MoE config)
    # 64 experts top-6, 2 shared, width 1408, greedy, scaling 1.0
    "deepseek-v2-lite": (2048, preset("deepseek-v2-lite").moe),
    # DeepSeek-V2's routing (160 experts, 8 groups keep 3, scaling 16) on small, non-tile widths
    "grouped-odd": (1000, MoEConfig(n_routed_experts=160, num_experts_per_tok=6, moe_intermediate_size=200,
                                    n_shared_experts=2, routed_scaling_factor=16.0,
                                    topk_method="group_limited_greedy", n_group=8, topk_group=3)),
    # normalised weights, no shared experts
    "normalised-no-shared": (576, MoEConfig(n_routed_experts=24, num_experts_per_tok=3, moe_intermediate_size=88,
                                            norm_topk_prob=True)),
}
DTYPES = (torch.bfloat16, torch.float16)
BATCHES = (1, 4, 16)
CLUSTERS = (1, 2, 4, 8, 16)
EPS = 1e-6
TOL = 1e-2


@dataclasses.dataclass
class Weights:
    norm: torch.Tensor
    router: torch.Tensor
    gate_up: torch.Tensor  # [E, 2I, H]
    down: torch.Tensor     # [E, H, I]
    shared: tuple[torch.Tensor, torch.Tensor] | None

    def replace(self, **changes) -> Weights:
        return dataclasses.replace(self, **changes)


_WEIGHTS: dict[tuple, Weights] = {}


def _weights(shape: str, dtype: torch.dtype) -> Weights:
    """Random weights (fresh per test session, shared by the tests of one shape and dtype; 1.1 GB
    for DeepSeek-V2-Lite's experts)."""
    key = (shape, dtype)
    if key not in _WEIGHTS:
        _WEIGHTS.clear()  # keep one large set alive at a time
        hidden, moe = SHAPES[shape]
        e, i, s = moe.n_routed_experts, moe.moe_intermediate_size, moe.n_shared_experts * moe.moe_intermediate_size

        def rnd(*dims, scale):
            return (torch.randn(*dims, device="cuda") * scale).to(dtype)

        _WEIGHTS[key] = Weights(
            norm=(1.0 + 0.1 * torch.randn(hidden, device="cuda")).to(dtype),
            router=rnd(e, hidden, scale=hidden**-0.5 * 2.0),  # logits of spread ~2: varied routing
            gate_up=rnd(e, 2 * i, hidden, scale=hidden**-0.5), down=rnd(e, hidden, i, scale=i**-0.5),
            shared=(rnd(2 * s, hidden, scale=hidden**-0.5), rnd(hidden, s, scale=s**-0.5)) if s else None)
    return _WEIGHTS[key]


def _reference_routing(x: torch.Tensor, w: Weights, moe: MoEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's routing (fp32 weights, experts) of the inputs."""
    from clusterfuse.reference.moe import route
    from clusterfuse.reference.ops import rms_norm

    return route(rms_norm(x, w.norm, EPS), w.router, moe)


def _scores(x: torch.Tensor, w: Weights) -> torch.Tensor:
    from clusterfuse.reference.ops import linear, rms_norm

    return linear(rms_norm(x, w.norm, EPS), w.router).softmax(dim=-1)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    assert not torch.isnan(out).any(), "NaN in the output (unwritten element, overflow or an unchosen expert used)"
    return ((out - ref).norm() / ref.norm()).item()


def _run_poisoned(x: torch.Tensor, w: Weights, moe: MoEConfig, cluster: int, residual: torch.Tensor | None = None):
    """The op's launch path into poisoned outputs (NaN, ids -1): every element must be written.
    Returns (out, ids, weights)."""
    from clusterfuse.ops import moe_block as mod

    routing = mod.MoeRouting.from_config(moe)
    shared_gate_up, shared_down = w.shared or (None, None)
    mod._validate(x, w.norm, w.router, w.gate_up, w.down, EPS, routing, shared_gate_up, shared_down, residual,
                  cluster)
    out = torch.full(x.shape, float("nan"), device=x.device,
                     dtype=x.dtype if residual is not None else torch.float32)
    k = moe.num_experts_per_tok
    ids = torch.full((x.shape[0], k), -1, dtype=torch.int32, device=x.device)
    weights = torch.full((x.shape[0], k), float("nan"), dtype=torch.float32, device=x.device)
    mod._launch(x, w.norm, w.router, w.gate_up, w.down, EPS, mod._routing_fields(routing), shared_gate_up,
                shared_down, residual, out, ids, weights, cluster, 0)
    torch.cuda.synchronize()
    return out, ids, weights


def _check_routing(ids: torch.Tensor, weights: torch.Tensor, ref_weights: torch.Tensor, ref_experts: torch.Tensor,
                   scores: torch.Tensor, exact: bool = False) -> None:
    """Our experts are the reference's, slot by slot, with the same weights; where they differ
    (never with ``exact``) the reference's scores of the experts involved must be a near tie: the
    two sides' norms and router GEMVs round and sum in different orders, which can swap scores
    closer than about 1e-4."""
    ids = ids.long()
    same = (ids == ref_experts).all(dim=-1)
    for n in (~same).nonzero().flatten().tolist():
        assert not exact, f"sequence {n}: experts {ids[n].tolist()} != reference {ref_experts[n].tolist()}"
        ours, theirs = scores[n, ids[n]], scores[n, ref_experts[n]]
        assert torch.allclose(ours, theirs, rtol=1e-3, atol=1e-6), (
            f"sequence {n}: experts {ids[n].tolist()} != reference {ref_experts[n].tolist()} and not a near tie")
    torch.testing.assert_close(weights[same], ref_weights[same].float(), rtol=1e-5, atol=1e-6)


def _check(x: torch.Tensor, w: Weights, moe: MoEConfig, got: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
           residual: torch.Tensor | None = None, exact: bool = False, scores: torch.Tensor | None = None) -> float:
    """Checks our routing against the reference's (`_check_routing`) and returns the relative
    error of our output against the reference's experts applied with our routing (the same as the
    reference's output wherever the routing is the same; a near tie decided the other way would
    otherwise change a sequence's output entirely). With ``residual``: the block's contribution."""
    from clusterfuse.reference.moe import routed_experts_ffn
    from clusterfuse.reference.ops import rms_norm

    out, ids, weights = got
    ref_weights, ref_experts = _reference_routing(x, w, moe)
    _check_routing(ids, weights, ref_weights, ref_experts, _scores(x, w) if scores is None else scores, exact)
    ref = routed_experts_ffn(rms_norm(x, w.norm, EPS), weights, ids.long(), list(w.gate_up), list(w.down), w.shared)
    if residual is None:
        return _rel_err(out, ref)
    ref = (residual.float() + ref).to(residual.dtype)
    return _rel_err(out.float() - residual.float(), ref.float() - residual.float())


# Shape outermost, so the large weight sets are made once per shape and dtype.
_CASES = list(itertools.product(SHAPES, DTYPES, BATCHES, CLUSTERS))


@pytest.mark.parametrize(("shape", "dtype", "batch", "cluster"), _CASES,
                         ids=[f"{s}-{str(d)[6:]}-b{b}-c{c}" for s, d, b, c in _CASES])
def test_matches_reference(shape, dtype, batch, cluster):
    _, moe = SHAPES[shape]
    w = _weights(shape, dtype)
    x = torch.randn(batch, w.norm.shape[0], device="cuda").to(dtype)
    got = _run_poisoned(x, w, moe, cluster)
    assert got[0].dtype == torch.float32 and got[0].shape == x.shape
    err = _check(x, w, moe, got)
    assert err < TOL, f"relative error {err:.3e}"


@pytest.mark.parametrize("batch", (3, 9))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_odd_batches(shape, batch):
    _, moe = SHAPES[shape]
    w = _weights(shape, torch.bfloat16)
    x = torch.randn(batch, w.norm.shape[0], device="cuda").to(torch.bfloat16)
    assert _check(x, w, moe, _run_poisoned(x, w, moe, 4)) < TOL


def _masked(scores: torch.Tensor, moe: MoEConfig) -> torch.Tensor:
    """One sequence's scores as its top-k sees them: group-limited routing zeroes the dropped groups."""
    from clusterfuse.reference.moe import topk_lowest_index_first

    if moe.topk_method != "group_limited_greedy":
        return scores
    per_group = moe.n_routed_experts // moe.n_group
    kept = topk_lowest_index_first(scores.view(moe.n_group, per_group).max(dim=-1).values, moe.topk_group)[1]
    keep = torch.zeros(moe.n_group, dtype=torch.bool, device=scores.device)
    keep[kept] = True
    return scores.masked_fill(~keep.repeat_interleave(per_group), 0.0)


def _router_with_ties(x: torch.Tensor, w: Weights, moe: MoEConfig) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """A copy of the router with exact ties for sequence 0: the expert ranked k+1 gets the row of the
    one ranked k (a tie at the cut), the one ranked 2 the row of the one ranked 1 (a tie inside the
    top-k); with group-limited routing then also a tie at the cut of the groups (the best expert of
    the group ranked topk_group + 1 gets the row of the best of the group ranked topk_group; made
    last, so that it stays a tie of the groups' best scores). Returns the router and the pairs."""
    router = w.router.clone()
    pairs: list[tuple[int, int]] = []
    order = _masked(_scores(x, w)[0], moe).argsort(descending=True)
    k = moe.num_experts_per_tok
    for hi, lo in ((k - 1, k), (0, 1)):
        a, b = int(order[hi]), int(order[lo])
        router[b] = router[a]
        pairs.append((a, b))
    if moe.topk_method == "group_limited_greedy":
        per_group = moe.n_routed_experts // moe.n_group
        best = _scores(x, w.replace(router=router))[0].view(moe.n_group, per_group).max(dim=-1)
        groups = best.values.argsort(descending=True)
        g_in, g_out = int(groups[moe.topk_group - 1]), int(groups[moe.topk_group])
        a, b = g_in * per_group + int(best.indices[g_in]), g_out * per_group + int(best.indices[g_out])
        router[b] = router[a]
        pairs.append((a, b))
    return router, pairs


@pytest.mark.parametrize("cluster", (1, 8))
@pytest.mark.parametrize("batch", (1, 4))
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", ["deepseek-v2-lite", "grouped-odd"])
def test_exact_ties_go_to_the_lower_expert_index(shape, dtype, batch, cluster):
    _, moe = SHAPES[shape]
    w = _weights(shape, dtype)
    x = torch.randn(batch, w.norm.shape[0], device="cuda").to(dtype)
    router, pairs = _router_with_ties(x, w, moe)
    tied = w.replace(router=router)
    scores = _scores(x, tied)
    for a, b in pairs:
        assert scores[0, a] == scores[0, b], "the reference's scores are not tied: the construction failed"
    assert _check(x, tied, moe, _run_poisoned(x, tied, moe, cluster), exact=True, scores=scores) < TOL


@pytest.mark.parametrize(("shape", "batch"), [("deepseek-v2-lite", 1), ("deepseek-v2-lite", 4),
                                              ("grouped-odd", 16), ("normalised-no-shared", 4)])
def test_unchosen_experts_are_never_used(shape, batch):
    """The weights of every expert no sequence chose (as the kernel routed them) are NaN: any use
    of them (even times a zero weight) would put NaN in the output."""
    from clusterfuse.ops.moe_block import expert_union

    _, moe = SHAPES[shape]
    w = _weights(shape, torch.bfloat16)
    x = torch.randn(batch, w.norm.shape[0], device="cuda").to(torch.bfloat16)
    chosen = expert_union(_run_poisoned(x, w, moe, 8)[1])
    assert len(chosen) < moe.n_routed_experts, "every expert chosen: nothing to poison"
    unchosen = torch.tensor([e for e in range(moe.n_routed_experts) if e not in chosen], device="cuda")
    gate_up, down = w.gate_up.clone(), w.down.clone()
    gate_up[unchosen] = float("nan")
    down[unchosen] = float("nan")
    poisoned = w.replace(gate_up=gate_up, down=down)
    for cluster in (2, 8):
        got = _run_poisoned(x, poisoned, moe, cluster)
        assert expert_union(got[1]) == chosen
        assert _check(x, w, moe, got) < TOL


@pytest.mark.parametrize("cluster", (1, 4, 16))
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_residual_variant(dtype, cluster):
    _, moe = SHAPES["deepseek-v2-lite"]
    w = _weights("deepseek-v2-lite", dtype)
    x = torch.randn(5, w.norm.shape[0], device="cuda").to(dtype)
    residual = torch.randn(5, w.norm.shape[0], device="cuda").to(dtype)
    got = _run_poisoned(x, w, moe, cluster, residual=residual)
    assert got[0].dtype == dtype
    # The block's contribution (out - residual), not the sum the residual dominates.
    err = _check(x, w, moe, got, residual=residual)
    assert err < 2 * TOL, f"relative error {err:.3e}"


@pytest.mark.parametrize("cluster", (2, 8))
def test_bit_identical_repeats(cluster):
    from clusterfuse.ops.moe_block import MoeRouting, moe_block

    _, moe = SHAPES["deepseek-v2-lite"]
    w = _weights("deepseek-v2-lite", torch.bfloat16)
    x = torch.randn(16, w.norm.shape[0], device="cuda").to(torch.bfloat16)

    def call():
        return moe_block(x, w.norm, w.router, w.gate_up, w.down, EPS, MoeRouting.from_config(moe),
                         shared_gate_up=w.shared[0],
                         shared_down=w.shared[1], cluster_size=cluster, return_routing=True)

    first = call()
    for _ in range(5):
        again = call()
        assert all(torch.equal(a, b) for a, b in zip(again, first, strict=True))


def test_public_op_tuner_and_cuda_graph(tmp_path, monkeypatch):
    """Tuned once, then captured: each replay routes the new x afresh (other experts)."""
    from clusterfuse.ops import moe_block as mod
    from clusterfuse.ops.tuner import Tuner

    monkeypatch.setattr(mod, "TUNER", Tuner(tmp_path / "tuner.json", samples=2, inner=2))
    _, moe = SHAPES["deepseek-v2-lite"]
    w = _weights("deepseek-v2-lite", torch.bfloat16)
    x = torch.randn(4, w.norm.shape[0], device="cuda").to(torch.bfloat16)
    residual = torch.randn(4, w.norm.shape[0], device="cuda").to(torch.bfloat16)

    def call():
        return mod.moe_block(x, w.norm, w.router, w.gate_up, w.down, EPS, mod.MoeRouting.from_config(moe),
                             shared_gate_up=w.shared[0],
                             shared_down=w.shared[1], residual=residual, return_routing=True)

    eager = call()  # tunes, caches
    assert (tmp_path / "tuner.json").exists() and eager[0].dtype == torch.bfloat16
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = call()
    seen = set()
    for _ in range(3):
        x.copy_(torch.randn_like(x, dtype=torch.float32))
        graph.replay()
        torch.cuda.synchronize()
        seen.add(tuple(captured[1].flatten().tolist()))
        assert _check(x, w, moe, captured, residual=residual) < 2 * TOL
    assert len(seen) == 3  # the replays did route differently


def test_validation_errors():
    from clusterfuse.ops.moe_block import MoeRouting, moe_block

    _, moe = SHAPES["normalised-no-shared"]
    w = _weights("normalised-no-shared", torch.bfloat16)
    hidden = w.norm.shape[0]
    x = torch.randn(2, hidden, device="cuda").to(torch.bfloat16)
    cases = {
        "x": [dict(x=x.float()), dict(x=x.cpu()), dict(x=x[:, :-8]),
              dict(x=torch.randn(17, hidden, device="cuda").to(torch.bfloat16)), dict(x=x.t().contiguous().t())],
        "norm_weight": [dict(norm_weight=w.norm[:-8]), dict(norm_weight=w.norm.half())],
        "w_router": [dict(w_router=w.router[:-1]), dict(w_router=w.router.half())],
        "w_gate_up": [dict(w_gate_up=w.gate_up[:, :-8]), dict(w_gate_up=w.gate_up[:-1])],
        "w_down": [dict(w_down=w.down[..., :-8]), dict(w_down=w.down.transpose(1, 2))],
        "shared_gate_up": [dict(shared_gate_up=w.gate_up[0]),
                           dict(shared_gate_up=w.gate_up[0], shared_down=w.down[0][:, :80].contiguous())],
        "residual": [dict(residual=x[:1]), dict(residual=x.half())],
        "eps": [dict(eps=0.0), dict(eps=-1e-5)],
        "routing": [dict(routing=moe)],
        "routing.n_group": [dict(routing=MoeRouting(top_k=3, n_group=5, topk_group=1))],
        "cluster_size": [dict(cluster_size=3), dict(cluster_size=32)],
        "return_routing": [dict(return_routing=1)],
        "options": [dict(options={"programmatic_launch": 0})],
    }
    base = dict(x=x, norm_weight=w.norm, w_router=w.router, w_gate_up=w.gate_up, w_down=w.down, eps=EPS,
                routing=MoeRouting.from_config(moe))
    for name, variants in cases.items():
        for change in variants:
            args = {**base, **change}
            with pytest.raises(ValueError, match=f"^{name}:"):
                moe_block(args.pop("x"), args.pop("norm_weight"), args.pop("w_router"), args.pop("w_gate_up"),
                          args.pop("w_down"), args.pop("eps"), args.pop("routing"), **args)
