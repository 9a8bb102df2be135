"""GPU tests of the persistent decode step (`clusterfuse.ops.decode_step`, issue 42): every layer
of a decode step in one launch must give the BIT-IDENTICAL hidden state and cache rows that the
per-block kernels give with the same launch choices (attention: ``cluster_size``, DSM exchange, 256
threads; FFN: ``cluster_size``, DSM), over shapes whose KV head groups and FFN slices outnumber the
resident clusters (each cluster then loops over several), batch 1/4/16, bf16/fp16, two cluster
sizes; and be close to the fp32 reference chain. Also: bit-identical repeats, CUDA-graph capture,
a 10 000-step loop without a hang, the timeline build (same bits, every stamp in order), the
refusal (``max_clusters=0``) and the engine's fallback, argument validation. Fresh random inputs
every run; cache rows at and beyond each length are NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from clusterfuse.ops import decode_step as step_op

pytestmark = pytest.mark.gpu

EPS = 1e-5
PAGE = 16
TOL = 2e-2  # the fp32 reference chain over 2-4 layers (the per-block tests' 1e-2 per block)


@dataclass(frozen=True)
class Shape:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    bias: bool = False     # a Q/K/V bias (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm of q and k (Qwen3)


SHAPES = {
    "smollm2": Shape(576, 9, 3, 64, 1536),          # SmolLM2-135M: 3 KV head groups, GQA 3
    "llama-3.2-1b": Shape(2048, 32, 8, 64, 8192),   # GQA 4, hd 64
    "llama-3-8b": Shape(4096, 32, 8, 128, 14336),   # GQA 4, hd 128
    "qwen2-0.5b": Shape(896, 14, 2, 64, 4864, bias=True),                  # GQA 7, bias
    "qwen3-0.6b": Shape(1024, 16, 8, 128, 3072, qk_norm=True),             # GQA 2, nh x hd != hidden
}

# (shape, layers, dtype, seq lens = keys attended incl. the new token, cluster sizes)
CASES = [
    ("smollm2", 2, torch.bfloat16, [1], (2, 8)),
    ("smollm2", 2, torch.float16, [17, 64, 3, 200], (4, 16)),
    ("smollm2", 3, torch.bfloat16, [1 + 29 * i for i in range(16)], (2, 8)),
    ("llama-3.2-1b", 2, torch.bfloat16, [1000], (4, 8)),
    ("llama-3.2-1b", 4, torch.float16, [5, 300, 17, 1024], (2, 16)),
    ("llama-3.2-1b", 2, torch.bfloat16, [64 + 50 * i for i in range(16)], (4, 8)),
    ("llama-3-8b", 2, torch.bfloat16, [1000], (4, 8)),
    ("llama-3-8b", 2, torch.float16, [33, 1, 512, 1024], (8, 16)),
    ("llama-3-8b", 2, torch.bfloat16, [1 + 61 * i for i in range(16)], (4, 8)),
]


def _needs_hopper() -> None:
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the fused kernels need a Hopper (sm_90) GPU")


def _rope(head_dim: int, max_pos: int):
    inv = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    ang = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv[None, :]
    return ang.cos().cuda(), ang.sin().cuda()


def _layers(s: Shape, n: int, dtype: torch.dtype, capacity: int, batch: int, lens: torch.Tensor):
    """Random weights and paged caches (rows < lens random, the rest NaN) for ``n`` layers, and the
    block table they share."""
    dev = "cuda"
    max_pages = capacity // PAGE
    num_pages = batch * max_pages + 3  # spare pages nobody uses
    table = torch.randperm(num_pages, device=dev)[: batch * max_pages].view(batch, max_pages).to(torch.int32)
    row_ok = torch.arange(capacity, device=dev)[None, :] < lens[:, None]
    rows = (s.heads + 2 * s.kv_heads) * s.head_dim

    def cache() -> torch.Tensor:
        c = torch.full((num_pages, s.kv_heads, PAGE, s.head_dim), float("nan"), device=dev).to(dtype)
        rnd = torch.randn(batch, max_pages, s.kv_heads, PAGE, s.head_dim, device=dev).to(dtype)
        ok = row_ok.view(batch, max_pages, 1, PAGE, 1).expand_as(rnd)
        c[table.long()] = torch.where(ok, rnd, torch.full_like(rnd, float("nan")))
        return c

    def w(*shape: int, scale: float) -> torch.Tensor:
        return (torch.randn(*shape, device=dev) * scale).to(dtype)

    def norm(n: int) -> torch.Tensor:
        return (1.0 + 0.1 * torch.randn(n, device=dev)).to(dtype)

    layers = [step_op.StepLayer(
        attn_norm=norm(s.hidden), w_qkv=w(rows, s.hidden, scale=s.hidden ** -0.5),
        b_qkv=w(rows, scale=0.1) if s.bias else None,
        w_o=w(s.hidden, s.heads * s.head_dim, scale=(s.heads * s.head_dim) ** -0.5),
        q_norm=norm(s.head_dim) if s.qk_norm else None, k_norm=norm(s.head_dim) if s.qk_norm else None,
        k_cache=cache(), v_cache=cache(),
        ffn_norm=norm(s.hidden),
        w_gate_up=w(2 * s.intermediate, s.hidden, scale=s.hidden ** -0.5),
        w_down=w(s.hidden, s.intermediate, scale=s.intermediate ** -0.5)) for _ in range(n)]
    return layers, table


def _with_caches(layers, caches):
    return [step_op.StepLayer(**{**vars(w), "k_cache": k, "v_cache": v}) for w, (k, v) in zip(layers, caches,
                                                                                                  strict=True)]


def _fresh_caches(layers):
    return [(w.k_cache.clone(), w.v_cache.clone()) for w in layers]


def _inputs(name: str, n: int, dtype: torch.dtype, seq_lens: list[int]):
    s = SHAPES[name]
    capacity = max(64, -(-max(seq_lens) // PAGE) * PAGE)
    lens = torch.tensor([x - 1 for x in seq_lens], dtype=torch.int32, device="cuda")
    layers, table = _layers(s, n, dtype, capacity, len(seq_lens), lens)
    cos, sin = _rope(s.head_dim, capacity + 5)
    hidden = torch.randn(len(seq_lens), s.hidden, device="cuda").to(dtype)
    return dict(shape=s, layers=layers, table=table, lens=lens, positions=(lens + 3).to(torch.int64), cos=cos,
                sin=sin, hidden=hidden)


def _persistent(inp, layers, cluster: int, **kw) -> torch.Tensor:
    s = inp["shape"]
    return step_op.decode_step(inp["hidden"], layers, inp["cos"], inp["sin"], inp["positions"], inp["lens"],
                               num_heads=s.heads, num_kv_heads=s.kv_heads, head_dim=s.head_dim, eps=EPS,
                               cluster_size=cluster, block_table=inp["table"], page_size=PAGE, **kw)


def _per_block(inp, layers, cluster: int, window: int | None = None) -> torch.Tensor:
    """The per-block ops with the step's launch choices, layer after layer."""
    from clusterfuse.ops.attention_block import attention_block
    from clusterfuse.ops.ffn_block import ffn_block

    s, h = inp["shape"], inp["hidden"]
    for w in layers:
        h = attention_block(h, w.attn_norm, w.w_qkv, w.b_qkv, w.w_o, inp["cos"], inp["sin"], inp["positions"],
                            w.k_cache, w.v_cache, inp["lens"], num_heads=s.heads, num_kv_heads=s.kv_heads,
                            head_dim=s.head_dim, eps=EPS, block_table=inp["table"], page_size=PAGE, residual=h,
                            q_norm=w.q_norm, k_norm=w.k_norm, window=window, cluster_size=cluster,
                            exchange="dsm", block_threads=256)
        h = ffn_block(h, w.ffn_norm, w.w_gate_up, w.w_down, EPS, residual=h, cluster_size=cluster, exchange="dsm")
    return h


def _reference(inp, layers, window: int | None = None) -> torch.Tensor:
    from clusterfuse.reference import ops as ref

    s, h = inp["shape"], inp["hidden"]
    for w in layers:
        h = ref.attention_block(h, w.attn_norm, w.w_qkv, w.b_qkv, w.w_o, inp["cos"], inp["sin"], inp["positions"],
                                w.k_cache, w.v_cache, inp["lens"], num_heads=s.heads, num_kv_heads=s.kv_heads,
                                head_dim=s.head_dim, eps=EPS, block_table=inp["table"], page_size=PAGE,
                                residual=h, q_norm=w.q_norm, k_norm=w.k_norm, window=window)
        h = ref.ffn_block(h, w.ffn_norm, w.w_gate_up, w.w_down, EPS, residual=h)
    return h


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


def _case_id(c) -> str:
    name, n, dtype, seq_lens, clusters = c
    return f"{name}-L{n}-{str(dtype).removeprefix('torch.')}-b{len(seq_lens)}-c{'+'.join(map(str, clusters))}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_bit_identical_to_per_block_kernels(case):
    _needs_hopper()
    name, n, dtype, seq_lens, clusters = case
    inp = _inputs(name, n, dtype, seq_lens)
    for cluster in clusters:
        per_caches, step_caches = _fresh_caches(inp["layers"]), _fresh_caches(inp["layers"])
        want = _per_block(inp, _with_caches(inp["layers"], per_caches), cluster)
        got = _persistent(inp, _with_caches(inp["layers"], step_caches), cluster)
        torch.cuda.synchronize()
        assert not torch.isnan(got).any(), f"cluster {cluster}: NaN in the step's output"
        assert torch.equal(_bits(got), _bits(want)), (
            f"cluster {cluster}: not bit-identical to the per-block kernels "
            f"(max |diff| {(got.float() - want.float()).abs().max().item():.3e})")
        for i, ((pk, pv), (sk, sv)) in enumerate(zip(per_caches, step_caches, strict=True)):
            assert torch.equal(_bits(pk), _bits(sk)) and torch.equal(_bits(pv), _bits(sv)), \
                f"cluster {cluster}: layer {i}'s cache differs from the per-block kernels'"
        plan = step_op.plan(dtype, len(seq_lens), inp["shape"].hidden, inp["shape"].heads, inp["shape"].kv_heads,
                            inp["shape"].head_dim, inp["shape"].intermediate, n, cluster, device=got.device)
        print(f"{_case_id(case)} cluster {cluster}: {plan.clusters} resident clusters "
              f"({plan.plan.active_clusters} possible), smem {plan.plan.smem_bytes} B")
    ref = _reference(inp, _with_caches(inp["layers"], _fresh_caches(inp["layers"]))).float()
    err = ((got.float() - ref).norm() / ref.norm()).item()
    assert err < TOL, f"relative error {err:.3e} against the fp32 reference"


# (shape, dtype, seq lens, cluster, window): the model features, each a build of its own
FEATURE_CASES = [
    ("qwen2-0.5b", torch.bfloat16, [40, 1, 300, 77], 4, None),          # Q/K/V bias, GQA 7
    ("qwen3-0.6b", torch.bfloat16, [1000, 9], 8, None),                 # QK-norm, GQA 2
    ("qwen3-0.6b", torch.float16, [1 + 70 * i for i in range(12)], 4, 256),  # QK-norm + sliding window
    ("llama-3.2-1b", torch.bfloat16, [700, 33, 1024], 4, 100),          # sliding window
]


@pytest.mark.parametrize("case", FEATURE_CASES, ids=lambda c: f"{c[0]}-{str(c[1]).removeprefix('torch.')}-"
                                                            f"b{len(c[2])}-c{c[3]}-w{c[4]}")
def test_model_features_bit_identical_to_per_block_kernels(case):
    _needs_hopper()
    name, dtype, seq_lens, cluster, window = case
    inp = _inputs(name, 2, dtype, seq_lens)
    per_caches, step_caches = _fresh_caches(inp["layers"]), _fresh_caches(inp["layers"])
    want = _per_block(inp, _with_caches(inp["layers"], per_caches), cluster, window)
    got = _persistent(inp, _with_caches(inp["layers"], step_caches), cluster, window=window)
    assert not torch.isnan(got).any()
    assert torch.equal(_bits(got), _bits(want)), f"max |diff| {(got.float() - want.float()).abs().max().item():.3e}"
    for (pk, pv), (sk, sv) in zip(per_caches, step_caches, strict=True):
        assert torch.equal(_bits(pk), _bits(sk)) and torch.equal(_bits(pv), _bits(sv))
    ref = _reference(inp, _with_caches(inp["layers"], _fresh_caches(inp["layers"])), window).float()
    err = ((got.float() - ref).norm() / ref.norm()).item()
    assert err < TOL, f"relative error {err:.3e} against the fp32 reference"


def test_groups_loop_when_few_clusters_are_resident():
    """A cap of one resident cluster: that cluster runs every KV head group and FFN slice in turn,
    and the output is still the per-block kernels' bits."""
    _needs_hopper()
    inp = _inputs("llama-3.2-1b", 2, torch.bfloat16, [100, 7, 1000, 64])
    for cap in (1, 3):
        step_caches, per_caches = _fresh_caches(inp["layers"]), _fresh_caches(inp["layers"])
        got = _persistent(inp, _with_caches(inp["layers"], step_caches), 4, max_clusters=cap)
        want = _per_block(inp, _with_caches(inp["layers"], per_caches), 4)
        assert torch.equal(_bits(got), _bits(want)), f"max_clusters={cap}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_repeats_and_cuda_graph_are_bit_identical(dtype):
    _needs_hopper()
    inp = _inputs("smollm2", 3, dtype, [5, 64, 200, 1])
    outs = []
    for _ in range(3):
        outs.append(_persistent(inp, _with_caches(inp["layers"], _fresh_caches(inp["layers"])), 4))
    caches = _fresh_caches(inp["layers"])
    layers = _with_caches(inp["layers"], caches)
    _persistent(inp, layers, 4)  # eager first: plan, pointer table, counters
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _persistent(inp, layers, 4)
    graph.replay()
    torch.cuda.synchronize()
    for o in (*outs[1:], out):
        assert torch.equal(_bits(o), _bits(outs[0]))


def test_ten_thousand_steps_without_a_hang():
    """10 000 graph replays of a 2-layer step (4 grid barriers per layer, one counter): every replay
    rewrites the same cache rows with the same values, so every output must equal the first."""
    _needs_hopper()
    inp = _inputs("smollm2", 2, torch.bfloat16, [17, 300])
    layers = _with_caches(inp["layers"], _fresh_caches(inp["layers"]))
    first = _persistent(inp, layers, 8).clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _persistent(inp, layers, 8)
    mismatches = torch.zeros((), dtype=torch.int64, device="cuda")
    for _ in range(10_000):
        graph.replay()
        mismatches += (_bits(out) != _bits(first)).any()
    torch.cuda.synchronize()
    assert mismatches.item() == 0
    assert step_op.error_flag(out.device).item() == 0


@pytest.mark.parametrize("cluster", [2, 8])
def test_timeline_build_changes_no_result_and_stamps_in_order(cluster):
    """The profiling build (CF_STEP_TIMELINE=1) gives the plain build's bits; in every block's row
    the stamps that were written increase, every layer has its end stamp, and the blocks of the
    clusters that ran a KV head group and an FFN slice stamped those programs' phases."""
    from bench.step_timeline import HEAD, PHASES

    _needs_hopper()
    n = 3
    inp = _inputs("smollm2", n, torch.bfloat16, [17, 300, 5])
    s = inp["shape"]
    plain = _persistent(inp, _with_caches(inp["layers"], _fresh_caches(inp["layers"])), cluster)
    sp = step_op.plan(torch.bfloat16, 3, s.hidden, s.heads, s.kv_heads, s.head_dim, s.intermediate, n, cluster,
                      device=plain.device, timeline=True)
    blocks, slots = sp.timeline_shape()
    assert slots == HEAD + n * len(PHASES)
    timeline = torch.full((blocks + 2, slots), -1, dtype=torch.int64, device="cuda")  # the op zeroes it
    got = _persistent(inp, _with_caches(inp["layers"], _fresh_caches(inp["layers"])), cluster, timeline=timeline)
    assert torch.equal(_bits(got), _bits(plain))
    rows = timeline.cpu().tolist()
    assert all(v == 0 for r in rows[blocks:] for v in r)  # rows beyond the grid untouched but zeroed
    nc = sp.shape.ffn.num_clusters
    for b, r in enumerate(rows[:blocks]):
        assert r[1] > r[0] > 0, f"block {b}: globaltimer start/end"
        written = [v for v in r[3:] if v]
        assert written == sorted(written), f"block {b}: stamps out of order"
        cluster_id = b // cluster
        for layer in range(n):
            stamps = r[HEAD + layer * len(PHASES):HEAD + (layer + 1) * len(PHASES)]
            assert stamps[-1] > 0, f"block {b} layer {layer}: no end stamp"
            assert (stamps[0] > 0) == (cluster_id < s.kv_heads), f"block {b} layer {layer}: attention stamps"
            ffn_first = PHASES.index("FFN: norm")
            assert (stamps[ffn_first] > 0) == (cluster_id < nc), f"block {b} layer {layer}: FFN stamps"


def test_refusal_is_a_clear_error():
    _needs_hopper()
    inp = _inputs("smollm2", 2, torch.bfloat16, [3])
    with pytest.raises(step_op.PersistentStepRefused, match="resident"):
        _persistent(inp, inp["layers"], 4, max_clusters=0)


def test_validation_errors():
    _needs_hopper()
    inp = _inputs("smollm2", 2, torch.bfloat16, [3, 9])
    with pytest.raises(ValueError, match="cluster_size"):
        _persistent(inp, inp["layers"], 3)
    with pytest.raises(ValueError, match="layers"):
        _persistent(inp, [], 4)
    bad = [inp["layers"][0], step_op.StepLayer(**{**vars(inp["layers"][1]), "w_o": inp["layers"][1].w_o[:, :64]})]
    with pytest.raises(ValueError, match=r"layers\[1\]: w_o"):
        _persistent(inp, bad, 4)
    lens = inp["lens"].clone()
    lens[1] = 10_000
    with pytest.raises(ValueError, match="cache_lens"):
        step_op.decode_step(inp["hidden"], inp["layers"], inp["cos"], inp["sin"], inp["positions"], lens,
                            num_heads=9, num_kv_heads=3, head_dim=64, eps=EPS, cluster_size=4,
                            block_table=inp["table"], page_size=PAGE)
    with pytest.raises(ValueError, match="max_clusters"):
        _persistent(inp, inp["layers"], 4, max_clusters=-1)
    for bad_timeline in (torch.zeros(1, 1, dtype=torch.int64, device="cuda"),           # too small
                         torch.zeros(4096, 4096, dtype=torch.int32, device="cuda"),     # not int64
                         torch.zeros(4096, 4096, dtype=torch.int64)):                   # not on the GPU
        with pytest.raises(ValueError, match="timeline: expected a contiguous int64 tensor"):
            _persistent(inp, inp["layers"], 4, timeline=bad_timeline)


# ------------------------------------------------------------------------------- engine
def _engine_models(step_max_clusters):
    from clusterfuse.engine.fused_model import FusedModel
    from clusterfuse.models.presets import preset
    from clusterfuse.models.random_init import random_weights
    from clusterfuse.reference import build_reference_model

    config = preset("llama-3.2-1b").replace(num_hidden_layers=3)
    weights = random_weights(config, device="cuda", dtype=torch.bfloat16, seed=7)
    fused = FusedModel(config, weights, device="cuda", step="persistent", step_max_clusters=step_max_clusters)
    return config, fused, build_reference_model(config, weights, device="cuda"), weights


@pytest.mark.parametrize("cap", [None, 0], ids=["persistent", "refused-falls-back"])
def test_engine_teacher_forced(cap):
    """The engine's decode step with step="persistent" against the fp32 oracle, teacher-forced (CUDA
    graphs of the persistent step), within the bf16 reference's own error (the yardstick rule of
    `clusterfuse.engine.parity`); with the residency refused (cap 0), the per-block kernels run, the
    refusal is recorded and the result is as correct."""
    _needs_hopper()
    from clusterfuse.engine.parity import fp32_oracle, teacher_forced

    config, fused, reference, weights = _engine_models(cap)
    r = teacher_forced(fused, fp32_oracle(config, weights, "cuda"), config.vocab_size, steps=64, yardstick=reference)
    print(f"{r.summary()}; refused: {fused.persistent_refused}")
    assert not r.problems(), r.problems()
    assert (1 in fused.persistent_refused) == (cap == 0)
