"""The benchmark harness on the CPU: floors reproduce DESIGN.md's anchors, records carry
DESIGN's fields, reports render, and the PyTorch baselines compute the right function."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

# `bench` is a top-level folder of the repository, not part of the installed package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common, report  # noqa: E402
from bench.baselines.gpt_fast_decode import build  # noqa: E402
from bench.baselines.torch_blocks import DecodePositions, TorchAttentionBlock, TorchFFNBlock  # noqa: E402
from bench.floor import (  # noqa: E402
    ByteCount,
    attention_block_bytes,
    decode_step_bytes,
    ffn_block_bytes,
    floor_us,
    kv_cache_bytes,
    mla_block_bytes,
)
from clusterfuse.models.config import ModelConfig, RopeConfig  # noqa: E402
from clusterfuse.models.presets import preset  # noqa: E402
from clusterfuse.models.weights import expected_shapes  # noqa: E402

# ------------------------------------------------------------------ floors vs the anchors


@pytest.mark.parametrize(("model", "seq_len", "weight_bytes", "kv_bytes", "floor_ms", "bw"), [
    # shared/anchors/h100_decode_step_baselines.json
    ("llama-2-7b", 1024, 13_214_687_232, 537_395_200, 4.768829770045413, 2883.7436216283813),
    ("llama-2-7b", 8192, 13_214_687_232, 4_295_491_584, 6.072030358271731, 2883.7436216283813),
    ("llama-3-8b", 1024, 15_009_849_344, 134_348_800, 5.251575774773082, 2883.7436216283813),
    ("llama-3-8b", 8192, 15_009_849_344, 1_073_872_896, 5.5773759218296615, 2883.7436216283813),
])
def test_decode_step_bytes_match_anchors(model, seq_len, weight_bytes, kv_bytes, floor_ms, bw):
    b = decode_step_bytes(preset(model), 1, seq_len, 2)
    assert b.weights + b.norms == weight_bytes
    assert b.kv == kv_bytes
    assert floor_us(weight_bytes + kv_bytes, bw) / 1e3 == pytest.approx(floor_ms, rel=1e-12)
    # the rest (embedding row) is negligible
    assert b.total - weight_bytes - kv_bytes == b.activations == 4096 * 2


@pytest.mark.parametrize(("seq_len", "floor", "bw"), [
    # shared/anchors/h100_attention_block_reference.json: W_qkv + W_o + cached KV
    (1024, 52.23554849624634, 2890.654895886669),
    (4096, 69.64739799499512, 2890.654895886669),
    (16384, 139.29479598999023, 2890.654895886669),
])
def test_attention_block_bytes_match_anchors(seq_len, floor, bw):
    b = attention_block_bytes(preset("llama-2-7b"), 1, seq_len, 2)
    assert floor_us(b.weights + b.kv_read, bw) == pytest.approx(floor, rel=1e-12)
    assert round(floor_us(b, bw)) == round(floor)  # everything counted: the same to the µs
    assert b.norms == 4096 * 2 and b.kv_write == 2 * 4096 * 2


@pytest.mark.parametrize(("model", "floor"), [
    # shared/anchors/h100_ffn_block_baseline.json: gate + up + down
    ("llama-2-7b", 94.92416448891163), ("llama-3-8b", 123.62216770648958), ("smollm2-135m", 1.8626107857562602),
])
def test_ffn_block_bytes_match_anchors(model, floor):
    b = ffn_block_bytes(preset(model), 16, 2)
    assert floor_us(b.weights, 2849.9867178878535) == pytest.approx(floor, rel=1e-12)
    assert b.activations == 2 * 16 * preset(model).hidden_size * 2


def test_mla_block_bytes_match_anchor():
    # shared/anchors/h100_mla_block_reference.json: DeepSeek-V2-Lite, S=4096, weights + latent cache + append
    b = mla_block_bytes(preset("deepseek-v2-lite"), 1, 4096, 2)
    assert floor_us(b.weights + b.kv, 2830.5752301608663) == pytest.approx(11.39162939618018, rel=1e-12)
    assert attention_block_bytes(preset("deepseek-v2-lite"), 1, 4096, 2) == b


@pytest.mark.parametrize("model", ["llama-2-7b", "llama-3-8b", "qwen2-7b", "smollm2-135m", "deepseek-v2-lite"])
def test_decode_step_weights_agree_with_weight_contract(model):
    """Every weight of the model but the embedding table (read by rows) is read once per step;
    at a batch large enough to route to every expert, that is all of them."""
    cfg = preset(model)
    batch = 64 if cfg.moe else 1
    shapes = expected_shapes(cfg)
    params = sum(math.prod(s) for s in shapes.values())
    if not cfg.tie_word_embeddings:  # tied: the embedding table is the LM head, read whole
        params -= math.prod(shapes["model.embed_tokens.weight"])
    b = decode_step_bytes(cfg, batch, 100, 2)
    assert b.weights + b.norms == params * 2


def test_byte_count_per_sequence_lengths():
    cfg = preset("llama-3-8b")
    ragged = attention_block_bytes(cfg, 3, [10, 20, 30], 2)
    assert ragged.kv_read == attention_block_bytes(cfg, 1, 60, 2).kv_read
    assert ragged.kv_write == 3 * 2 * 8 * 128 * 2
    assert kv_cache_bytes(cfg, 1025) == decode_step_bytes(cfg, 1, 1024).kv
    with pytest.raises(ValueError, match="expected 3 lengths"):
        attention_block_bytes(cfg, 3, [1, 2], 2)
    total = ByteCount(weights=1, kv_read=2) + 2 * ByteCount(norms=3)
    assert total.total == 9 and total.as_dict()["total"] == 9


# ------------------------------------------------------------------ timing helpers (CPU parts)


def test_rotation_count_exceeds_four_l2():
    l2 = 50 * 2**20
    assert common.rotation_count(400 * 2**20, l2) == 1
    n = common.rotation_count(5_308_416, l2)  # the SmolLM2 FFN
    assert n * 5_308_416 >= 4 * l2 > (n - 1) * 5_308_416
    with pytest.raises(ValueError):
        common.rotation_count(0, l2)


def test_rotating_copies_counts_tensor_bytes():
    calls = []

    def make():
        calls.append(1)
        shared = torch.randn(2**20)  # 4 MiB, counted once although listed twice
        return {"a": shared, "b": [shared, torch.randn(2**20)]}

    sets = common.rotating_copies(make)
    assert common.tensor_bytes(sets[0]) == 8 * 2**20
    assert len(sets) == len(calls) == common.rotation_count(8 * 2**20, common.l2_cache_bytes())


def test_timing_fields():
    t = common.Timing(2.0, 1.0, 3.0, repeats=5, inner=4)
    assert t.record_fields() == {"time_us": 2.0, "time_us_min": 1.0, "time_us_max": 3.0}


@pytest.mark.gpu
def test_time_cuda_graph_on_gpu():
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
    sets = common.rotating_copies(lambda: (a.clone(), torch.randn(4096, device="cuda", dtype=torch.float16)))
    t = common.time_cuda_graph([lambda m=m, x=x: m @ x for m, x in sets], repeats=10)
    assert 0 < t.min_us <= t.median_us <= t.max_us
    assert t.inner % len(sets) == 0
    assert common.measure_gemv_bandwidth(gib=0.25) > 100


# ------------------------------------------------------------------ records


def test_record_writer_fields(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "REPO_ROOT", tmp_path)  # no git here: only the env var names a commit
    monkeypatch.setenv("CLUSTERFUSE_GIT_COMMIT", "abc123")
    path = tmp_path / "results" / "x.json"
    writer = common.RecordWriter(path, bench="ffn_block", dtype="bf16")
    timing = common.Timing(10.0, 9.0, 11.0, 7, 3)
    first = writer.append(model="llama-2-7b", batch=1, variant="torch_cuda_graph", timing=timing,
                          floor_us=5.0, bandwidth_GBs=2890.0, extra_field=[1, 2])
    writer.append({"variant": "clusterfuse", "time_us": 6.0, "cluster_size": 4})
    records = json.loads(path.read_text())
    assert len(records) == 2 and records[0] == first
    assert list(first)[: len(common.RECORD_FIELDS)] == list(common.RECORD_FIELDS)
    assert first["git_commit"] == "abc123" and first["extra_field"] == [1, 2]
    assert first["time_us_min"] == 9.0 and first["dtype"] == "bf16"
    assert first["torch"] == torch.__version__ and first["device"] and first["date"] and first["command"]
    assert records[1]["cluster_size"] == 4 and records[1]["seq_len"] is None
    with pytest.raises(ValueError, match="time_us"):
        writer.append(variant="x")
    monkeypatch.delenv("CLUSTERFUSE_GIT_COMMIT")
    assert common.git_commit() is None


def test_git_commit_env_overrides_checkout(monkeypatch):
    """The GPU machine's copy may carry a stale .git: the commit the caller names wins."""
    monkeypatch.setenv("CLUSTERFUSE_GIT_COMMIT", "f00d")
    assert common.git_commit() == "f00d"


def test_load_records_reads_json_lines(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"bench": "a", "variant": "v", "time_us": 1}\n\n{"bench": "b", "variant": "v", "time_us": 2}\n')
    assert [r["bench"] for r in common.load_records([path])] == ["a", "b"]


def test_dtype_names():
    assert common.dtype_name(torch.bfloat16) == "bf16"
    assert common.parse_dtype("fp16") is torch.float16 and common.parse_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError):
        common.parse_dtype("int3")


# ------------------------------------------------------------------ report


def _sample_records() -> list[dict]:
    base = {"bench": "attention_block", "model": "llama-2-7b", "batch": 1, "dtype": "fp16", "floor_us": 52.0}
    return [
        {**base, "seq_len": 1024, "variant": "torch_cuda_graph", "time_us": 114.0},
        {**base, "seq_len": 1024, "variant": "clusterfuse", "time_us": 57.0},
        {**base, "seq_len": 1024, "variant": "clusterfuse", "cluster_size": 8, "time_us": 60.0},
        {**base, "seq_len": 4096, "variant": "torch_cuda_graph", "time_us": 130.0, "floor_us": 70.0},
        {"bench": "decode_step", "model": "llama-2-7b", "batch": 1, "seq_len": 1024, "dtype": "fp16",
         "variant": "torch_cuda_graph", "time_us": 7606.0, "floor_us": 4769.0},
    ]


def test_report_markdown_and_png(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(_sample_records()))
    md, png = tmp_path / "out.md", tmp_path / "out.png"
    report.main([str(path), "--md", str(md), "--png", str(png)])
    text = md.read_text()
    assert "## attention_block" in text and "## decode_step" in text
    header = next(line for line in text.splitlines() if line.startswith("| model"))
    assert header.index("clusterfuse (µs)") < header.index("torch_cuda_graph (µs)")
    assert "clusterfuse@c8 (µs)" in header
    row = next(line for line in text.splitlines() if line.startswith("| llama-2-7b | 1 | 1024"))
    assert "57.0 (91%)" in row and "114.0 (46%)" in row and "2.00×" in row
    assert "7.606 (63%)" in text  # decode steps in ms
    assert png.stat().st_size > 1000


def test_report_by_code_puts_versions_side_by_side(tmp_path):
    """--by-code: one column of ours per (commit, extra defines, knobs off their defaults); --variants keeps
    only the named columns."""
    base = {"bench": "attention_block", "model": "llama-2-7b", "batch": 1, "seq_len": 1024, "dtype": "bf16",
            "floor_us": 36.8}
    records = [{**base, "variant": "clusterfuse", "time_us": 74.4, "git_commit": "286a817ef"},
               {**base, "variant": "clusterfuse", "time_us": 69.9, "git_commit": "ec5ecbe00"},
               {**base, "variant": "clusterfuse", "time_us": 76.6, "git_commit": "194d06c", "defines": "X=0"},
               {**base, "variant": "clusterfuse", "cluster_size": 8, "time_us": 99.0, "git_commit": "194d06c"},
               {**base, "variant": "clusterfuse", "time_us": 77.0, "git_commit": "abc1234", "programmatic_launch": 0,
                "kv_prefetch_keys": 64},
               {**base, "variant": "torch_cuda_graph", "time_us": 96.1, "git_commit": "194d06c"}]
    path, md = tmp_path / "r.json", tmp_path / "out.md"
    path.write_text(json.dumps(records))
    report.main([str(path), "--by-code", "--variants", "clusterfuse,torch_cuda_graph", "--md", str(md)])
    header = next(line for line in md.read_text().splitlines() if line.startswith("| model"))
    for col in ("clusterfuse [286a817ef] (µs)", "clusterfuse [ec5ecbe00] (µs)", "clusterfuse [194d06c; X=0] (µs)",
                "clusterfuse [abc1234; programmatic_launch=0] (µs)", "torch_cuda_graph (µs)"):
        assert col in header
    assert "@c8" not in header


# ------------------------------------------------------------------ baselines vs a float64 oracle

TINY = ModelConfig(family="llama", architecture="LlamaForCausalLM", name="tiny", vocab_size=97, hidden_size=64,
                   intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=16, rope=RopeConfig(theta=10000.0))


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _rope(x: torch.Tensor, pos: int, cfg: ModelConfig) -> torch.Tensor:
    """Rotate-half rope of one vector ``x [d]`` at position ``pos``, written out pairwise."""
    d = x.shape[-1]
    out = x.clone()
    for i in range(d // 2):
        angle = pos * cfg.rope.theta ** (-2 * i / d)
        c, s = math.cos(angle), math.sin(angle)
        out[i] = x[i] * c - x[i + d // 2] * s
        out[i + d // 2] = x[i + d // 2] * c + x[i] * s
    return out


def _attention_oracle(block: TorchAttentionBlock, x: torch.Tensor, lens: list[int],
                      k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """One decode step for each sequence, head by head, in float64."""
    cfg, d = block.config, block.config.head_dim
    qd, kvd = block.q_dim, block.kv_dim
    out = []
    for b, n in enumerate(lens):
        h = _rms_norm(x[b], block.norm_weight, cfg.rms_norm_eps)
        qkv = block.w_qkv @ h + (block.b_qkv if block.b_qkv is not None else 0)
        q, k, v = qkv[:qd].view(-1, d), qkv[qd:qd + kvd].view(-1, d), qkv[qd + kvd:].view(-1, d)
        if block.qk_norm is not None:  # Qwen3: every head of q and k RMSNormed before RoPE
            q = torch.stack([_rms_norm(r, block.qk_norm[0], cfg.rms_norm_eps) for r in q])
            k = torch.stack([_rms_norm(r, block.qk_norm[1], cfg.rms_norm_eps) for r in k])
        heads = []
        for head in range(cfg.num_attention_heads):
            kvh = head // cfg.gqa_group
            keys = torch.cat([k_cache[b, kvh, :n], _rope(k[kvh], n, cfg)[None]])
            values = torch.cat([v_cache[b, kvh, :n], v[kvh][None]])
            scores = keys @ _rope(q[head], n, cfg) / math.sqrt(d)
            heads.append(torch.softmax(scores, 0) @ values)
        out.append(x[b] + block.w_o @ torch.cat(heads))
    return torch.stack(out)


@pytest.mark.parametrize("lens", [[5, 5, 5], [0, 3, 7]])
@pytest.mark.parametrize("bias", [False, True])
def test_torch_attention_block_matches_float64_oracle(lens, bias):
    cfg = TINY.replace(attention_bias=bias)
    block = TorchAttentionBlock(cfg, 3, 8, dtype=torch.float64, device="cpu", seed=1)
    block.positions.set(lens)
    x = torch.randn(3, 64, dtype=torch.float64)
    k0, v0 = block.k_cache.clone(), block.v_cache.clone()
    expected = _attention_oracle(block, x, lens, k0, v0)
    out = block(x)
    # float32 rope (as gpt-fast and the reference compute it) bounds the agreement
    assert (out - expected).norm() / expected.norm() < 1e-6
    # the new token's K/V landed at each sequence's position and nothing else moved
    for b, n in enumerate(lens):
        assert not torch.equal(block.k_cache[b, :, n], k0[b, :, n])
        keep = [i for i in range(8) if i != n]
        assert torch.equal(block.v_cache[b, :, keep], v0[b, :, keep])


def test_torch_attention_block_qk_norm_with_wide_heads_matches_float64_oracle():
    """The baseline's QK-norm (Qwen3) with heads x head_dim (4 x 32) != hidden (64), against the oracle;
    the other weights are drawn as without QK-norm (its weights come last)."""
    cfg = TINY.replace(qk_norm=True, head_dim=32)
    block = TorchAttentionBlock(cfg, 3, 8, dtype=torch.float64, device="cpu", seed=1)
    plain = TorchAttentionBlock(TINY.replace(head_dim=32), 3, 8, dtype=torch.float64, device="cpu", seed=1)
    assert torch.equal(block.w_qkv, plain.w_qkv) and torch.equal(block.v_cache, plain.v_cache)
    assert plain.qk_norm is None and block.qk_norm[0].shape == (32,)
    block.positions.set([0, 3, 7])
    x = torch.randn(3, 64, dtype=torch.float64)
    expected = _attention_oracle(block, x, [0, 3, 7], block.k_cache.clone(), block.v_cache.clone())
    assert (block(x) - expected).norm() / expected.norm() < 1e-6


def test_floor_bytes_count_qk_norm_weights_and_the_window():
    cfg = TINY.replace(qk_norm=True, head_dim=32)
    assert attention_block_bytes(cfg, 1, 10).norms == attention_block_bytes(TINY.replace(head_dim=32), 1, 10).norms \
        + 2 * 32 * 2
    windowed = TINY.replace(sliding_window=5)
    # 10 and 3 cached rows: the window of 5 reads the last 4 of the first and all 3 of the second
    assert attention_block_bytes(windowed, 2, [10, 3]).kv_read == attention_block_bytes(TINY, 2, [4, 3]).kv_read


def test_torch_blocks_bf16_close_to_float64():
    block = TorchAttentionBlock(TINY, 2, 8, dtype=torch.bfloat16, device="cpu", seed=2)
    block.positions.set(6)
    x = torch.randn(2, 64).bfloat16()
    as64 = lambda t: t.double()  # noqa: E731
    ref = TorchAttentionBlock(TINY, 2, 8, dtype=torch.float64, device="cpu", seed=2)
    for name in ("norm_weight", "w_qkv", "w_o", "k_cache", "v_cache"):
        setattr(ref, name, as64(getattr(block, name)))
    ref.positions.set(6)
    out, expected = block(x).double(), ref(as64(x))
    assert (out - expected).norm() / expected.norm() < 1e-2


def test_torch_ffn_block_matches_float64_oracle():
    block = TorchFFNBlock(TINY, dtype=torch.float64, device="cpu", seed=3)
    x = torch.randn(4, 64, dtype=torch.float64)
    h = _rms_norm(x, block.norm_weight, TINY.rms_norm_eps)
    inter = TINY.intermediate_size
    gate, up = h @ block.w_gate_up[:inter].T, h @ block.w_gate_up[inter:].T
    expected = x + (gate * torch.sigmoid(gate) * up) @ block.w_down.T
    assert (block(x) - expected).norm() / expected.norm() < 1e-12


def test_decode_positions_validate():
    pos = DecodePositions(2, 8, "cpu")
    with pytest.raises(ValueError, match="capacity"):
        pos.set(8)
    with pytest.raises(ValueError, match="expected 2 lengths"):
        pos.set([1, 2, 3])
    pos.set([2, 4])
    assert pos.kv_len == 5 and pos.mask is not None and pos.mask.shape == (2, 1, 1, 5)


def test_gpt_fast_decoder_step_is_blocks_then_greedy_head():
    dec = build(TINY, 2, 8, dtype=torch.float64, device="cpu", seed=4)
    dec.set_seq_len([3, 6])
    tokens = dec.tokens.clone()
    caches = [(a.k_cache.clone(), a.v_cache.clone()) for a, _ in dec.layers]
    x = dec.embedding[tokens]
    for (attention, ffn), (k, v) in zip(dec.layers, caches, strict=True):
        x = ffn(_attention_oracle(attention, x, [3, 6], k, v))
    logits = _rms_norm(x, dec.final_norm, TINY.rms_norm_eps) @ dec.lm_head.T
    assert torch.equal(dec.forward(), logits.argmax(-1))
    with pytest.raises(ValueError, match="Llama family"):
        build(preset("deepseek-v2-lite"), 1, 8, device="cpu")


def test_kernel_option_args_build_the_options():
    """``--kv-prefetch-keys / --programmatic-launch`` give the benchmark's `KernelOptions` (only
    those given differ from the defaults) and the records get every option's value."""
    import argparse

    from clusterfuse.ops.options import DEFAULT_KERNEL_OPTIONS, KernelOptions

    parser = argparse.ArgumentParser()
    common.add_kernel_option_args(parser)
    opts = common.kernel_options(parser.parse_args(["--kv-prefetch-keys", "256"]))
    assert opts == KernelOptions(kv_prefetch_keys=256)
    assert common.option_fields(opts) == {"programmatic_launch": 2, "kv_prefetch_keys": 256}
    assert common.kernel_options(parser.parse_args([])) == DEFAULT_KERNEL_OPTIONS
    with pytest.raises(SystemExit) as exc:
        common.kernel_options(parser.parse_args(["--programmatic-launch", "7"]))
    assert exc.value.code == 2


def test_options_launch_modes_and_validation():
    """mode -> (attention, ffn) library ints: 0 ordered, 1 successor at exit, 2 before the grid
    barrier; flat attention launches stay ordered unless flat_ordered_launch is off."""
    from clusterfuse.ops.options import KernelOptions

    for mode, want in ((0, (0, 0)), (1, (1, 1)), (2, (2, 1)), (3, (2, 2))):
        opts = KernelOptions(programmatic_launch=mode)
        assert (opts.launch_mode("attention", "dsm"), opts.launch_mode("ffn")) == want
        assert opts.launch_mode("attention", "flat") == 0
        assert KernelOptions(programmatic_launch=mode, flat_ordered_launch=False).launch_mode("attention", "flat") \
            == want[0]
    for field, bad in (("programmatic_launch", 4), ("programmatic_launch", True), ("kv_prefetch_keys", -1),
                       ("kv_prefetch_keys", 2.0), ("flat_ordered_launch", 1), ("attention_launch", (16, "flat"))):
        with pytest.raises(ValueError, match=f"^{field}: expected"):
            KernelOptions(**{field: bad})
    with pytest.raises(ValueError, match="kernel: expected"):
        KernelOptions().launch_mode("mla")
    assert KernelOptions(kv_prefetch_keys=0).non_default() == {"kv_prefetch_keys": 0}


def test_attention_knobs_grid_is_the_product():
    from bench.attention_knobs import parse_grid

    assert parse_grid("programmatic_launch=0,2; kv_prefetch_keys=0,64") == [
        {"programmatic_launch": 0, "kv_prefetch_keys": 0}, {"programmatic_launch": 0, "kv_prefetch_keys": 64},
        {"programmatic_launch": 2, "kv_prefetch_keys": 0}, {"programmatic_launch": 2, "kv_prefetch_keys": 64}]
    assert parse_grid("") == [{}]
    with pytest.raises(ValueError, match="--grid"):
        parse_grid("kv_mma=0,1")


def test_knob_defaults_are_the_options_defaults():
    """bench.common.KNOB_DEFAULTS (labels of records) equals what KernelOptions ships."""
    from clusterfuse.ops.options import DEFAULT_KERNEL_OPTIONS

    assert {k: common.KNOB_DEFAULTS[k] for k in common.OPTION_FIELDS} == {
        k: getattr(DEFAULT_KERNEL_OPTIONS, k) for k in common.OPTION_FIELDS}
    assert common.non_default_knobs({"kv_mma": 0, "kv_prefetch_keys": 64}) == ["kv_mma=0"]
    assert common.non_default_knobs({"programmatic_launch": 0}) == ["programmatic_launch=0"]


def test_flat_pdl_race_names_a_bad_mode():
    from bench import flat_pdl_race

    with pytest.raises(SystemExit, match="--modes: expected 'guarded' or one of"):
        flat_pdl_race.main(["--modes", "2,7"])


def test_decode_step_models_checked_before_the_gpu(capsys):
    """bench.decode_step takes the issue's presets (DeepSeek-V2-Lite included) and refuses an unknown one
    with a usage error (exit 2) naming --models, before it asks for a GPU."""
    from bench import decode_step

    with pytest.raises(SystemExit) as exc:
        decode_step.main(["--models", "qwen3-8b,nope"])
    assert exc.value.code == 2 and "unknown preset 'nope'" in capsys.readouterr().err
    if not torch.cuda.is_available():  # the presets pass the check; only the GPU is missing here
        for models in ("qwen3-8b,llama-3.2-1b,llama-3.2-3b", "deepseek-v2-lite"):
            with pytest.raises(SystemExit, match="needs a CUDA GPU"):
                decode_step.main(["--models", models, "--qk-norm-ablation"])


# ------------------------------------------------------------------ bench.decode_step's arguments
@pytest.mark.parametrize(("argv", "message"), [
    (["--step-clusters", "4,8"], "needs --persistent-ablation"),
    (["--persistent-ablation", "--step-clusters", "3"], "expected sizes among"),
    (["--persistent-ablation", "--step-clusters", "four"], "expected sizes like"),
])
def test_step_clusters_are_checked_before_any_gpu_work(argv, message, capsys):
    from bench.decode_step import main

    with pytest.raises(SystemExit) as exc:
        main(["--models", "llama-3-8b", *argv])
    assert exc.value.code == 2
    assert f"--step-clusters: {message}" in capsys.readouterr().err


def test_step_clusters_apply_to_the_persistent_variant_only():
    from bench.decode_step import _step_clusters_of

    assert _step_clusters_of("clusterfuse_persistent", [4, 8, 16]) == [4, 8, 16]
    assert _step_clusters_of("clusterfuse_persistent", None) == [None]
    assert _step_clusters_of("clusterfuse", [4, 8]) == [None]


# ------------------------------------------------------------------ bench.serve's sampled loads
def test_serve_table_keeps_greedy_and_sampled_loads_apart():
    from bench.serve import markdown, sharegpt_like

    def rec(variant: str, temperature: float, tok_s: float) -> dict:
        return {"model": "llama-3-8b", "variant": variant, "clients": 16, "requests": 64, "output_tok_s": tok_s,
                "ttft_ms_p50": 50.0, "ttft_ms_p99": 90.0, "itl_ms_p50": 10.0, "itl_ms_p99": 20.0, "device": "H100",
                "mix": {"seed": 0, "temperature": temperature, "top_p": 0.9 if temperature else 1.0}}

    md = markdown([rec("clusterfuse", 0.0, 1000.0), rec("clusterfuse", 0.8, 900.0),
                   rec("torch_cuda_graph", 0.0, 800.0), rec("torch_cuda_graph", 0.8, 600.0)])
    assert "| llama-3-8b | clusterfuse | 16 | 64 | 1000.0 |" in md
    assert "| llama-3-8b, T 0.8 top-p 0.9 | clusterfuse | 16 | 64 | 900.0 |" in md
    assert "| llama-3-8b | 16 | 1.250 |" in md and "| llama-3-8b, T 0.8 top-p 0.9 | 16 | 1.500 |" in md
    reqs = sharegpt_like(4, 7, prompt_median=16, prompt_max=48, output_median=6, output_max=12)
    assert [r.seed for r in reqs] == [7, 8, 9, 10]  # each request's sampling seed, the same for a mix seed
