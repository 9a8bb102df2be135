"""GPU tests of the fused FFN block kernel against `clusterfuse.reference.ops.ffn_block` (fp32).

Fresh random inputs every run (never zeros), outputs poisoned with NaN before each launch,
relative error ‖out − ref‖ / ‖ref‖ < 1e-2, NaN never passes; bit-identical repeats; every
cluster size and both exchanges; the residual variant; CUDA-graph capture; argument validation.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from clusterfuse.ops.options import DEFAULT_KERNEL_OPTIONS

pytestmark = pytest.mark.gpu

SHAPES = {  # name: (hidden, intermediate)
    "smollm2": (576, 1536),
    "non-multiple": (1000, 2752),
    "llama-2-7b": (4096, 11008),
    "llama-3-8b": (4096, 14336),
}
DTYPES = (torch.bfloat16, torch.float16)
BATCHES = (1, 3, 16)
CLUSTERS = (1, 2, 4, 8, 16)
EXCHANGES = ("dsm", "global")
EPS = 1e-5
TOL = 1e-2


def _reference(x, norm_weight, w_gate_up, w_down, eps, residual=None):
    """The reference op (fp32, no residual); with ``residual``, the engine's next residual
    stream ``(residual.float() + out).to(x.dtype)`` as its docstring defines it."""
    from clusterfuse.reference.ops import ffn_block as ref

    y = ref(x, norm_weight, w_gate_up, w_down, eps)
    return y if residual is None else (residual.float() + y).to(x.dtype)


_WEIGHTS: dict[tuple, tuple[torch.Tensor, ...]] = {}


def _weights(hidden: int, inter: int, dtype: torch.dtype):
    """Random weights (fresh per test session, shared by the tests of one shape: 270 MB each)."""
    key = (hidden, inter, dtype)
    if key not in _WEIGHTS:
        _WEIGHTS.clear()  # keep one large set alive at a time
        dev = "cuda"
        norm_weight = (1.0 + 0.1 * torch.randn(hidden, device=dev)).to(dtype)
        w_gate_up = (torch.randn(2 * inter, hidden, device=dev) * hidden**-0.5).to(dtype)
        w_down = (torch.randn(hidden, inter, device=dev) * inter**-0.5).to(dtype)
        _WEIGHTS[key] = (norm_weight, w_gate_up, w_down)
    return _WEIGHTS[key]


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    assert not torch.isnan(out).any(), "NaN in the output (unwritten element or overflow)"
    return ((out - ref).norm() / ref.norm()).item()


def _run_poisoned(x, norm_weight, w_gate_up, w_down, residual, cluster, exchange):
    """The op's launch path into a NaN-filled output buffer: every element must be written."""
    from clusterfuse.ops import ffn_block as mod

    mod._validate(x, norm_weight, w_gate_up, w_down, EPS, residual, cluster, exchange)
    out = torch.full(x.shape, float("nan"), device=x.device,
                     dtype=x.dtype if residual is not None else torch.float32)
    mod._launch(x, norm_weight, w_gate_up, w_down, EPS, residual, out, cluster, exchange,
                DEFAULT_KERNEL_OPTIONS.launch_mode("ffn"))
    torch.cuda.synchronize()
    return out


# Shape outermost, so the large weight sets are made once per shape and dtype.
_CASES = list(itertools.product(SHAPES, DTYPES, BATCHES, CLUSTERS, EXCHANGES))


@pytest.mark.parametrize(("shape", "dtype", "batch", "cluster", "exchange"), _CASES,
                         ids=[f"{s}-{str(d)[6:]}-b{b}-c{c}-{e}" for s, d, b, c, e in _CASES])
def test_matches_reference(shape, dtype, batch, cluster, exchange):
    hidden, inter = SHAPES[shape]
    norm_weight, w_gate_up, w_down = _weights(hidden, inter, dtype)
    x = torch.randn(batch, hidden, device="cuda").to(dtype)
    out = _run_poisoned(x, norm_weight, w_gate_up, w_down, None, cluster, exchange)
    assert out.dtype == torch.float32 and out.shape == (batch, hidden)
    err = _rel_err(out, _reference(x, norm_weight, w_gate_up, w_down, EPS))
    assert err < TOL, f"relative error {err:.3e}"


@pytest.mark.parametrize("cluster", (1, 4, 16))
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_residual_variant(dtype, cluster):
    hidden, inter = SHAPES["non-multiple"]
    norm_weight, w_gate_up, w_down = _weights(hidden, inter, dtype)
    x = torch.randn(5, hidden, device="cuda").to(dtype)
    residual = torch.randn(5, hidden, device="cuda").to(dtype)
    out = _run_poisoned(x, norm_weight, w_gate_up, w_down, residual, cluster, "dsm")
    assert out.dtype == dtype
    ref = _reference(x, norm_weight, w_gate_up, w_down, EPS, residual=residual)
    # Compare the FFN contribution (out - residual), not the sum the residual dominates.
    err = _rel_err(out.float() - residual.float(), ref.float() - residual.float())
    assert err < 2 * TOL, f"relative error {err:.3e}"


@pytest.mark.parametrize("exchange", EXCHANGES)
def test_bit_identical_repeats(exchange):
    from clusterfuse.ops.ffn_block import ffn_block

    hidden, inter = SHAPES["llama-2-7b"]
    norm_weight, w_gate_up, w_down = _weights(hidden, inter, torch.bfloat16)
    x = torch.randn(16, hidden, device="cuda").to(torch.bfloat16)
    first = ffn_block(x, norm_weight, w_gate_up, w_down, EPS, cluster_size=8, exchange=exchange)
    for _ in range(5):
        assert torch.equal(ffn_block(x, norm_weight, w_gate_up, w_down, EPS, cluster_size=8, exchange=exchange),
                           first)


def test_batch_larger_than_shared_memory_is_split():
    """hidden 8192 × batch 16 does not fit in shared memory: the op runs two halves."""
    norm_weight, w_gate_up, w_down = _weights(8192, 1024, torch.bfloat16)
    x = torch.randn(16, 8192, device="cuda").to(torch.bfloat16)
    out = _run_poisoned(x, norm_weight, w_gate_up, w_down, None, 4, "dsm")
    assert _rel_err(out, _reference(x, norm_weight, w_gate_up, w_down, EPS)) < TOL


def test_public_op_tuner_and_cuda_graph(tmp_path, monkeypatch):
    from clusterfuse.ops import ffn_block as mod
    from clusterfuse.ops.tuner import Tuner

    monkeypatch.setattr(mod, "TUNER", Tuner(tmp_path / "tuner.json", samples=2, inner=2))
    hidden, inter = SHAPES["smollm2"]
    norm_weight, w_gate_up, w_down = _weights(hidden, inter, torch.bfloat16)
    x = torch.randn(4, hidden, device="cuda").to(torch.bfloat16)
    residual = torch.randn(4, hidden, device="cuda").to(torch.bfloat16)
    eager = mod.ffn_block(x, norm_weight, w_gate_up, w_down, EPS, residual=residual)  # tunes, caches
    assert (tmp_path / "tuner.json").exists()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = mod.ffn_block(x, norm_weight, w_gate_up, w_down, EPS, residual=residual)
    for _ in range(3):
        x.copy_(torch.randn_like(x, dtype=torch.float32))
        graph.replay()
        torch.cuda.synchronize()
        ref = _reference(x, norm_weight, w_gate_up, w_down, EPS, residual=residual)
        assert _rel_err(captured.float() - residual.float(), ref.float() - residual.float()) < 2 * TOL
    assert eager.dtype == torch.bfloat16


def test_validation_errors():
    from clusterfuse.ops.ffn_block import ffn_block

    hidden, inter = SHAPES["smollm2"]
    nw, wgu, wd = _weights(hidden, inter, torch.bfloat16)
    x = torch.randn(2, hidden, device="cuda").to(torch.bfloat16)
    cases = {
        "x": [dict(x=x.float()), dict(x=x.cpu()), dict(x=x[:, :-8]), dict(x=torch.randn(17, hidden, device="cuda")
                                                                        .to(torch.bfloat16)),
              dict(x=x.t().contiguous().t()),  # not contiguous
              dict(x=torch.empty(2 * hidden + 1, device="cuda", dtype=torch.bfloat16)[1:].view(2, hidden))],
        "norm_weight": [dict(norm_weight=nw[:-8]), dict(norm_weight=nw.half())],
        "w_gate_up": [dict(w_gate_up=wgu[:-8]), dict(w_gate_up=wgu.half()), dict(w_gate_up=wgu[:, :-8])],
        "w_down": [dict(w_down=wd[:, :-8]), dict(w_down=wd.t())],
        "residual": [dict(residual=x[:1]), dict(residual=x.half())],
        "eps": [dict(eps=0.0), dict(eps=-1e-5)],
        "cluster_size": [dict(cluster_size=3), dict(cluster_size=32)],
        "exchange": [dict(exchange="nvlink")],
    }
    base = dict(x=x, norm_weight=nw, w_gate_up=wgu, w_down=wd, eps=EPS)
    for name, variants in cases.items():
        for change in variants:
            args = {**base, **change}
            with pytest.raises(ValueError, match=f"^{name}:"):
                ffn_block(args.pop("x"), args.pop("norm_weight"), args.pop("w_gate_up"), args.pop("w_down"),
                          args.pop("eps"), **args)
