"""Fused attention block benchmark: clusterfuse vs PyTorch ops under a CUDA graph vs the memory floor.

    python -m bench.attention_block [--models llama-2-7b,llama-3-8b] [--batches 1,4,16]
        [--seq-lens 128,1024,4096,16384,32768] [--clusters 1,2,4,8,16] [--exchanges dsm]
        [--dtype bf16] [--out bench/results/attention_block_h100.json] [--md X.md] [--png X.png] [--quick]

For every model, batch and S (tokens already cached; the new token is the S+1-th key), one run
measures: the GEMV bandwidth (the floor's divisor: weights + KV bytes), the torch baseline
(`TorchAttentionBlock`: rms_norm + fused QKV GEMM + RoPE + KV append + SDPA + O-proj + residual,
one CUDA graph), our kernel at every cluster size with DSM exchange (``clusterfuse@cN``) and, with
``--exchanges dsm,flat``, the flat exchange (``clusterfuse_flat@cN``: groups of blocks without a
hardware cluster, ordered launches, sizes 2 and up; never chosen by the op's tuner, see
`clusterfuse.ops.attention_block.FLAT_RACE`), the global-memory exchange at the best DSM size
(``clusterfuse_global_memory@cN``, the ablation), and the fastest of the swept (exchange, cluster
size) pairs as the headline ``clusterfuse`` record (its ``chosen_exchange`` and
``chosen_cluster_size``): the kernel alone. All variants compute
``x + attention(x)`` in x's dtype on the same weights and caches. Sets are rotated so that no
configuration is timed from L2.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from bench.baselines.torch_blocks import DecodePositions, TorchAttentionBlock
from bench.common import (
    RecordWriter,
    add_block_bench_args,
    add_kernel_option_args,
    add_report_args,
    attention_block_bytes,
    dtype_name,
    floor_us,
    int_list,
    kernel_options,
    measure_gemv_bandwidth,
    option_fields,
    parse_dtype,
    print_block_summary,
    results_dir,
    rotating_copies,
    time_cuda_graph,
    write_report,
)
from clusterfuse.models.presets import preset
from clusterfuse.ops.attention_block import CLUSTER_SIZES, attention_block
from clusterfuse.ops.options import DEFAULT_KERNEL_OPTIONS, KernelOptions
from clusterfuse.reference.rope import rope_cos_sin

DEFAULT_MODELS = ("llama-2-7b", "llama-3-8b")
DEFAULT_BATCHES = (1, 4, 16)
DEFAULT_SEQ_LENS = (128, 1024, 4096, 16384, 32768)
DEFAULT_EXCHANGES = ("dsm",)
#: Record variant of each swept exchange (the global one is the ablation at the best DSM size).
EXCHANGE_VARIANTS = {"dsm": "clusterfuse", "flat": "clusterfuse_flat"}



def _timing_kwargs(quick: bool) -> dict[str, int]:
    return {"warmup": 5, "repeats": 10} if quick else {"warmup": 10, "repeats": 30}


def _paged(cache: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A contiguous cache ``[B, kv_heads, capacity, hd]`` as a paged pool ``[pages, kv_heads,
    page_size, hd]`` (each sequence's pages in order, as the engine allocates them) and its block table."""
    bsz, nkv, cap, hd = cache.shape
    if cap % page_size:
        raise ValueError(f"page_size: the capacity {cap} is not a multiple of {page_size}")
    per = cap // page_size
    pool = cache.view(bsz, nkv, per, page_size, hd).transpose(1, 2).reshape(bsz * per, nkv, page_size, hd)
    table = torch.arange(bsz * per, device=cache.device, dtype=torch.int32).view(bsz, per)
    return pool.contiguous(), table


def _ours_fns(blocks: Sequence[TorchAttentionBlock], x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
              pos: DecodePositions, cache_lens: torch.Tensor, cluster: int, exchange: str,
              page_size: int | None = None, options: KernelOptions = DEFAULT_KERNEL_OPTIONS,
              window: int | None = None) -> list:
    """Our op on the torch blocks' weights and caches, computing the same ``x + attention(x)``;
    with ``page_size``, on copies of the caches cut into pages of that many rows; with ``window``,
    sliding-window attention over the last ``window`` rows (bench.window_tiles). Each function
    takes an optional ``timeline`` buffer (the op's profiling argument, bench.attention_timeline)."""
    cfg = blocks[0].config
    fns = []
    for b in blocks:
        k, v, table = b.k_cache, b.v_cache, None
        if page_size:
            (k, table), (v, _) = _paged(k, page_size), _paged(v, page_size)
        fns.append(lambda timeline=None, b=b, k=k, v=v, table=table: attention_block(
            x, b.norm_weight, b.w_qkv, b.b_qkv, b.w_o, rope[0], rope[1], pos.positions, k, v, cache_lens,
            num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
            eps=cfg.rms_norm_eps, block_table=table, page_size=page_size or None,
            residual=x, cluster_size=cluster, exchange=exchange, options=options, timeline=timeline, window=window))
    return fns


def setup_blocks(name: str, batch: int, seq_len: int, dtype: torch.dtype, capacity: int | None = None) -> tuple:
    """``(cfg, pos, cache_lens, rope, blocks, x)`` for one configuration: rotating copies of a
    torch attention block (weights + caches of ``capacity`` rows, default ``seq_len + 16``, holding
    ``seq_len`` tokens), the decode positions, the RoPE tables and the input."""
    dev = torch.device("cuda")
    cfg = preset(name)
    capacity = seq_len + 16 if capacity is None else capacity
    pos = DecodePositions(batch, capacity, dev)
    pos.set(seq_len)
    cache_lens = pos.positions.to(torch.int32)
    rope = rope_cos_sin(cfg.rope, cfg.head_dim, capacity, dev)
    seeds = iter(range(10**6))
    blocks = rotating_copies(lambda: TorchAttentionBlock(cfg, batch, capacity, dtype=dtype, device=dev,
                                                         seed=next(seeds), positions=pos))
    x = torch.randn(batch, cfg.hidden_size, device=dev).to(dtype)
    return cfg, pos, cache_lens, rope, blocks, x


def _label(exchange: str, cluster: int) -> str:
    """A swept launch in the console's c column and sweep: 4 (DSM), f4 (flat)."""
    return f"{cluster}" if exchange == "dsm" else f"{exchange[0]}{cluster}"


def _bench_config(name: str, batch: int, seq_len: int, clusters: Sequence[int], exchanges: Sequence[str],
                  dtype: torch.dtype, bw: float, writer: RecordWriter, tk: dict[str, int],
                  options: KernelOptions = DEFAULT_KERNEL_OPTIONS) -> dict:
    cfg, pos, cache_lens, rope, blocks, x = setup_blocks(name, batch, seq_len, dtype)
    floor = floor_us(attention_block_bytes(cfg, batch, seq_len, torch.finfo(dtype).bits // 8), bw)
    common = dict(model=name, batch=batch, seq_len=seq_len, floor_us=floor, rotation=len(blocks))

    t_torch = time_cuda_graph([lambda b=b: b(x) for b in blocks], **tk)
    writer.append(variant="torch_cuda_graph", timing=t_torch, **common)

    times: dict[tuple[str, int], float] = {}  # (exchange, cluster size) -> µs
    for x_name in exchanges:
        for c in clusters:
            if x_name == "flat" and c == 1:  # a group of one block: the global exchange at cluster 1
                continue
            try:
                t = time_cuda_graph(_ours_fns(blocks, x, rope, pos, cache_lens, c, x_name, options=options), **tk)
            except (ValueError, RuntimeError) as err:  # e.g. no cluster of 16 can be resident
                print(f"{name} b={batch} S={seq_len} {x_name} c={c}: skipped ({err})")
                continue
            times[x_name, c] = t.median_us
            writer.append(variant=EXCHANGE_VARIANTS[x_name], cluster_size=c, timing=t, **common)
    best_x, best_c = min(times, key=times.__getitem__)
    t_best = time_cuda_graph(_ours_fns(blocks, x, rope, pos, cache_lens, best_c, best_x, options=options), **tk)
    writer.append(variant="clusterfuse", timing=t_best, chosen_cluster_size=best_c, chosen_exchange=best_x, **common)
    dsm = {c: t for (x_name, c), t in times.items() if x_name == "dsm"}
    glob_c = min(dsm, key=dsm.__getitem__) if dsm else best_c
    t_glob = time_cuda_graph(_ours_fns(blocks, x, rope, pos, cache_lens, glob_c, "global", options=options), **tk)
    writer.append(variant="clusterfuse_global_memory", cluster_size=glob_c, timing=t_glob, **common)
    del blocks
    torch.cuda.empty_cache()
    return dict(model=name, batch=batch, S=seq_len, c=_label(best_x, best_c), ours=t_best.median_us,
                torch=t_torch.median_us, floor=floor, glob=t_glob.median_us,
                sweep={_label(*xc): t for xc, t in times.items()})


def run(models: Sequence[str], batches: Sequence[int], seq_lens: Sequence[int], clusters: Sequence[int],
        dtype: torch.dtype, out: Path, quick: bool = False, options: KernelOptions = DEFAULT_KERNEL_OPTIONS,
        exchanges: Sequence[str] = DEFAULT_EXCHANGES) -> list[dict]:
    unknown = [x for x in exchanges if x not in EXCHANGE_VARIANTS]
    if unknown or not exchanges:
        raise ValueError(f"exchanges: expected some of {sorted(EXCHANGE_VARIANTS)}, got {list(exchanges)}")
    dev = torch.device("cuda")
    bw = measure_gemv_bandwidth(dev)
    writer = RecordWriter(out, device=dev, bench="attention_block", dtype=dtype_name(dtype), bandwidth_GBs=bw,
                          **option_fields(options))
    tk = _timing_kwargs(quick)
    summary = [_bench_config(name, batch, s, clusters, exchanges, dtype, bw, writer, tk, options)
               for name in models for batch in batches for s in seq_lens]
    print_block_summary(summary, bw, dev, dtype)
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_block_bench_args(parser, DEFAULT_MODELS, DEFAULT_BATCHES, CLUSTER_SIZES)
    parser.add_argument("--seq-lens", default=",".join(map(str, DEFAULT_SEQ_LENS)))
    parser.add_argument("--exchanges", default=",".join(DEFAULT_EXCHANGES),
                        help=f"exchanges swept for the headline, of {','.join(EXCHANGE_VARIANTS)}")
    add_kernel_option_args(parser)
    add_report_args(parser, results_dir() / "attention_block.json")
    args = parser.parse_args(argv)
    run(args.models.split(","), int_list(args.batches), int_list(args.seq_lens), int_list(args.clusters),
        parse_dtype(args.dtype), args.out, args.quick, kernel_options(args), args.exchanges.split(","))
    write_report(args.out, args.md, args.png)


if __name__ == "__main__":
    main()
