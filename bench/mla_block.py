"""Fused MLA decode block benchmark (DeepSeek-V2-Lite attention): clusterfuse vs a PyTorch absorbed-MLA
baseline under a CUDA graph vs the memory floor.

    python -m bench.mla_block [--batches 1,4,16] [--seq-lens 1024,4096,16384,32768]
        [--clusters 1,2,4,8,16] [--key-loops simt,mma] [--dtype bf16] [--out bench/results/mla_block.json]
        [--md X.md] [--png X.png] [--quick]

For every batch and S (tokens already cached per sequence; the new token is the S+1-th key), one
run measures: the GEMV bandwidth (the floor's divisor: `bench.floor.mla_block_bytes`, the weights
incl. kv_b_proj, the latent cache read and the new row), the torch baseline
(`bench.baselines.torch_mla.absorbed_mla_block`: RMSNorm, one GEMM for q and the KV-down projection,
the latent norm, interleaved RoPE, the row scattered into the paged cache, q absorbed into W_UK,
attention over the block-table gather of the latent rows with an fp32 softmax, W_UV, W_o and the
residual; one CUDA graph), our kernel at every cluster size (``clusterfuse@cN`` records: variant
``clusterfuse``, ``cluster_size`` N) and the fastest of them as the headline ``clusterfuse``
record (``chosen_cluster_size``), and with the tensor-core key loop (``key_loop="mma"``, not the
op's default: ``clusterfuse_key_mma@cN`` and its fastest as ``clusterfuse_key_mma``). All compute
``x + MLA(x)`` in x's dtype from the same packed weights (`clusterfuse.ops.mla_block.prepare_mla_weights`)
and the same paged latent cache (pages of 64 rows). Sets are rotated so that no configuration is timed from L2.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from bench.baselines.torch_mla import absorbed_mla_block
from bench.common import (
    RecordWriter,
    add_block_bench_args,
    add_report_args,
    dtype_name,
    floor_us,
    int_list,
    measure_gemv_bandwidth,
    parse_dtype,
    print_block_summary,
    results_dir,
    rotating_copies,
    time_cuda_graph,
    write_report,
)
from bench.floor import mla_block_bytes
from clusterfuse.models.presets import preset
from clusterfuse.ops.mla_block import CLUSTER_SIZES, KEY_LOOPS, MlaBlockWeights, mla_block, prepare_mla_weights
from clusterfuse.reference.mla import MLAWeights
from clusterfuse.reference.rope import rope_cos_sin, yarn_softmax_scale_factor

MODEL = "deepseek-v2-lite"
DEFAULT_BATCHES = (1, 4, 16)
DEFAULT_SEQ_LENS = (1024, 4096, 16384, 32768)
#: Record variant of each key loop.
KEY_LOOP_VARIANTS = {"simt": "clusterfuse", "mma": "clusterfuse_key_mma"}
PAGE_SIZE = 64


def _timing_kwargs(quick: bool) -> dict[str, int]:
    return {"warmup": 5, "repeats": 10} if quick else {"warmup": 10, "repeats": 30}


def _make_set(batch: int, seq_len: int, dtype: torch.dtype, seed: int) -> dict:
    """One input set: packed weights of a random layer, the input, a paged latent cache whose
    sequences hold ``seq_len`` rows each (pages in order, as the engine allocates them)."""
    cfg, dev = preset(MODEL), torch.device("cuda")
    mla, heads, h = cfg.mla, cfg.num_attention_heads, cfg.hidden_size
    g = torch.Generator(device=dev).manual_seed(seed)

    def t(*shape: int, scale: float, offset: float = 0.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=dev) * scale + offset).to(dtype)

    latent = mla.kv_lora_rank + mla.qk_rope_head_dim
    w = MLAWeights(w_kv_a=t(latent, h, scale=h ** -0.5), kv_a_norm=t(mla.kv_lora_rank, scale=0.1, offset=1.0),
                   w_kv_b=t(heads * (mla.qk_nope_head_dim + mla.v_head_dim), mla.kv_lora_rank,
                            scale=mla.kv_lora_rank ** -0.5),
                   w_o=t(h, heads * mla.v_head_dim, scale=(heads * mla.v_head_dim) ** -0.5),
                   w_q=t(heads * mla.qk_head_dim, h, scale=h ** -0.5))
    pages = -(-(seq_len + 1) // PAGE_SIZE)
    return dict(norm=t(h, scale=0.1, offset=1.0), weights=prepare_mla_weights(w, mla, heads), x=t(batch, h, scale=1.0),
                pool=t(batch * pages, PAGE_SIZE, latent, scale=1.0),
                table=torch.arange(batch * pages, device=dev, dtype=torch.int32).view(batch, pages))


def _setup(batch: int, seq_len: int, dtype: torch.dtype) -> tuple:
    cfg, dev = preset(MODEL), torch.device("cuda")
    cos, sin = rope_cos_sin(cfg.rope, cfg.mla.qk_rope_head_dim, seq_len + 1, dev)
    scale = cfg.mla.qk_head_dim ** -0.5 * yarn_softmax_scale_factor(cfg.rope)
    positions = torch.full((batch,), seq_len, dtype=torch.int64, device=dev)
    lens = torch.full((batch,), seq_len, dtype=torch.int32, device=dev)
    seeds = iter(range(10**6))
    sets = rotating_copies(lambda: _make_set(batch, seq_len, dtype, next(seeds)))
    return cfg, cos, sin, scale, positions, lens, sets


def _torch_fn(s: dict, cfg, cos, sin, scale, positions, lens, seq_len):
    w: MlaBlockWeights = s["weights"]
    return lambda: absorbed_mla_block(s["x"], s["norm"], w, cos, sin, positions, s["pool"], lens, s["table"],
                                      eps=cfg.rms_norm_eps, softmax_scale=scale, max_len=seq_len + 1)


def _ours_fn(s: dict, cfg, cos, sin, scale, positions, lens, cluster: int, key_loop: str):
    return lambda: mla_block(s["x"], s["norm"], s["weights"], cos, sin, positions, s["pool"], lens,
                             eps=cfg.rms_norm_eps, softmax_scale=scale, block_table=s["table"], page_size=PAGE_SIZE,
                             residual=s["x"], cluster_size=cluster, key_loop=key_loop)


def _bench_config(batch: int, seq_len: int, clusters: Sequence[int], key_loops: Sequence[str], dtype: torch.dtype,
                  bw: float, writer: RecordWriter, tk: dict[str, int]) -> dict:
    cfg, cos, sin, scale, positions, lens, sets = _setup(batch, seq_len, dtype)
    nbytes = mla_block_bytes(cfg, batch, seq_len, torch.finfo(dtype).bits // 8)
    floor = floor_us(nbytes, bw)
    common = dict(model=MODEL, batch=batch, seq_len=seq_len, floor_us=floor, rotation=len(sets),
                  floor_bytes=nbytes.as_dict())

    t_torch = time_cuda_graph([_torch_fn(s, cfg, cos, sin, scale, positions, lens, seq_len) for s in sets], **tk)
    writer.append(variant="torch_cuda_graph", timing=t_torch, **common)
    sweep: dict[str, float] = {}
    headline: dict[str, float] = {}
    best_simt = None
    for loop in key_loops:
        times: dict[int, float] = {}
        for c in clusters:
            try:
                t = time_cuda_graph([_ours_fn(s, cfg, cos, sin, scale, positions, lens, c, loop) for s in sets], **tk)
            except (ValueError, RuntimeError) as err:  # e.g. no cluster of 16 can be resident
                print(f"{MODEL} b={batch} S={seq_len} c={c} {loop}: skipped ({err})")
                continue
            times[c] = t.median_us
            sweep[f"{c}" if loop == "simt" else f"{loop}{c}"] = t.median_us
            writer.append(variant=KEY_LOOP_VARIANTS[loop], cluster_size=c, timing=t, **common)
        best = min(times, key=times.__getitem__)
        t_best = time_cuda_graph([_ours_fn(s, cfg, cos, sin, scale, positions, lens, best, loop) for s in sets], **tk)
        writer.append(variant=KEY_LOOP_VARIANTS[loop], timing=t_best, chosen_cluster_size=best, **common)
        headline[loop] = t_best.median_us
        if loop == "simt":
            best_simt = best
    del sets
    torch.cuda.empty_cache()
    # The console's "ours" is the op's default key loop when it ran, else the one that did; "glob" shows
    # the tensor-core loop's best beside it.
    main_loop = "simt" if "simt" in headline else next(iter(headline))
    return dict(model=MODEL, batch=batch, S=seq_len, c=str(best_simt if main_loop == "simt" else "-"),
                ours=headline[main_loop], torch=t_torch.median_us, floor=floor,
                glob=headline.get("mma", float("nan")), sweep=sweep)


def run(batches: Sequence[int], seq_lens: Sequence[int], clusters: Sequence[int], dtype: torch.dtype, out: Path,
        quick: bool = False, key_loops: Sequence[str] = KEY_LOOPS) -> list[dict]:
    bad = [c for c in clusters if c not in CLUSTER_SIZES]
    if bad or not clusters:
        raise ValueError(f"clusters: expected some of {CLUSTER_SIZES}, got {list(clusters)}")
    if not key_loops or any(k not in KEY_LOOPS for k in key_loops):
        raise ValueError(f"key_loops: expected some of {KEY_LOOPS}, got {list(key_loops)}")
    dev = torch.device("cuda")
    bw = measure_gemv_bandwidth(dev)
    writer = RecordWriter(out, device=dev, bench="mla_block", dtype=dtype_name(dtype), bandwidth_GBs=bw)
    tk = _timing_kwargs(quick)
    summary = [_bench_config(b, s, clusters, key_loops, dtype, bw, writer, tk) for b in batches for s in seq_lens]
    print("(the 'global µs' column: the tensor-core key loop's best, key_loop='mma')")
    print_block_summary(summary, bw, dev, dtype)
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_block_bench_args(parser, (MODEL,), DEFAULT_BATCHES, CLUSTER_SIZES)
    parser.add_argument("--seq-lens", default=",".join(map(str, DEFAULT_SEQ_LENS)))
    parser.add_argument("--key-loops", default=",".join(KEY_LOOPS), help=f"key loops swept, of {','.join(KEY_LOOPS)}")
    add_report_args(parser, results_dir() / "mla_block.json")
    args = parser.parse_args(argv)
    if args.models != MODEL:
        parser.error(f"--models: this benchmark runs {MODEL} only (the kernel's build), got {args.models!r}")
    loops = args.key_loops.split(",")
    if not loops or any(k not in KEY_LOOPS for k in loops):
        parser.error(f"--key-loops: expected some of {','.join(KEY_LOOPS)}, got {args.key_loops!r}")
    run(int_list(args.batches), int_list(args.seq_lens), int_list(args.clusters), parse_dtype(args.dtype), args.out,
        args.quick, loops)
    write_report(args.out, args.md, args.png)


if __name__ == "__main__":
    main()
