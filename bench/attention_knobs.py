"""A/B of the fused attention kernel's options (`KernelOptions`) in one process, on the same inputs.

    python -m bench.attention_knobs [--models llama-2-7b,llama-3-8b] [--batches 1] [--seq-lens 1024,4096]
        [--clusters 4,8,16] [--grid "kv_prefetch_keys=0,64,256;programmatic_launch=0,2"] [--out X.json] [--md X.md]

Every setting of the grid (the product of the listed values of `bench.common.OPTION_FIELDS`) is a
`KernelOptions` passed to the op, and runs on the same rotated weights and caches as the others, at every cluster
size, beside the PyTorch baseline and the floor; settings are timed in turn, round robin, so slow
drift of the clock does not favour one. Records: ``variant clusterfuse`` per (setting, cluster),
the best cluster size of each setting with ``chosen_cluster_size``, and ``torch_cuda_graph``.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from bench.attention_block import _ours_fns, setup_blocks
from bench.common import (
    OPTION_FIELDS,
    RecordWriter,
    add_report_args,
    attention_block_bytes,
    dtype_name,
    floor_us,
    int_list,
    measure_gemv_bandwidth,
    parse_dtype,
    results_dir,
    time_cuda_graph,
    write_report,
)
from clusterfuse.ops.options import DEFAULT_KERNEL_OPTIONS


def parse_grid(text: str) -> list[dict[str, int]]:
    """``"kv_prefetch_keys=0,64;programmatic_launch=0,2"`` → the 4 settings of the product, in order."""
    axes: list[tuple[str, list[int]]] = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, values = part.partition("=")
        name = name.strip()
        if name not in OPTION_FIELDS or not values:
            raise ValueError(f"--grid: expected 'option=v1,v2;...' with options {sorted(OPTION_FIELDS)}, got {part!r}")
        axes.append((name, int_list(values)))
    return [dict(zip((n for n, _ in axes), combo, strict=True)) for combo in itertools.product(*(v for _, v in axes))]


def _label(setting: Mapping[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in setting.items()) or "defaults"


def bench_config(name: str, batch: int, seq_len: int, clusters: Sequence[int], grid: Sequence[dict[str, int]],
                 dtype: torch.dtype, bw: float, writer: RecordWriter, rounds: int) -> list[dict]:
    cfg, pos, cache_lens, rope, blocks, x = setup_blocks(name, batch, seq_len, dtype)
    floor = floor_us(attention_block_bytes(cfg, batch, seq_len, torch.finfo(dtype).bits // 8), bw)
    common = dict(model=name, batch=batch, seq_len=seq_len, floor_us=floor, rotation=len(blocks))
    t_torch = time_cuda_graph([lambda b=b: b(x) for b in blocks])
    writer.append(variant="torch_cuda_graph", timing=t_torch, **common)

    samples: dict[tuple[int, int], list[float]] = {}
    for _ in range(rounds):  # round robin over (setting, cluster)
        for i, setting in enumerate(grid):
            for c in clusters:
                options = replace(DEFAULT_KERNEL_OPTIONS, **setting)
                fns = _ours_fns(blocks, x, rope, pos, cache_lens, c, "dsm", options=options)
                try:
                    t = time_cuda_graph(fns, warmup=5, repeats=20)
                except (ValueError, RuntimeError) as err:  # e.g. no cluster of 16 can be resident
                    print(f"{name} b={batch} S={seq_len} c={c} [{_label(setting)}]: skipped ({err})")
                    continue
                samples.setdefault((i, c), []).append(t.median_us)
    rows = []
    for i, setting in enumerate(grid):
        per_c = {c: statistics.median(samples[(i, c)]) for c in clusters if (i, c) in samples}
        for c, us in per_c.items():
            writer.append(variant="clusterfuse", cluster_size=c, time_us=us, **setting, **common)
        best = min(per_c, key=per_c.__getitem__)
        writer.append(variant="clusterfuse", chosen_cluster_size=best, time_us=per_c[best], **setting, **common)
        rows.append(dict(model=name, batch=batch, S=seq_len, setting=_label(setting), c=best, us=per_c[best],
                         sweep=per_c, torch=t_torch.median_us, floor=floor))
    del blocks
    torch.cuda.empty_cache()
    return rows


def table(rows: Sequence[Mapping]) -> str:
    lines = ["| model | batch | S | knobs | best c | ours (µs) | per cluster (µs) | torch + graph (µs) | floor (µs) "
             "| share of floor |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        sweep = ", ".join(f"c{c} {us:.1f}" for c, us in r["sweep"].items())
        lines.append(f"| {r['model']} | {r['batch']} | {r['S']} | {r['setting']} | {r['c']} | {r['us']:.1f} | {sweep} "
                     f"| {r['torch']:.1f} | {r['floor']:.1f} | {r['floor'] / r['us']:.0%} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="llama-2-7b,llama-3-8b")
    parser.add_argument("--batches", default="1")
    parser.add_argument("--seq-lens", default="1024,4096")
    parser.add_argument("--clusters", default="4,8,16")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--grid", default="kv_prefetch_keys=0,64,256",
                        help="option=v1,v2;... (product of the values; options: " + ", ".join(OPTION_FIELDS) + ")")
    parser.add_argument("--rounds", type=int, default=2, help="round-robin passes over the settings")
    parser.add_argument("--table", type=Path, default=None, help="write the summary table (markdown) here")
    add_report_args(parser, results_dir() / "attention_knobs.json")
    args = parser.parse_args(argv)
    grid = parse_grid(args.grid)
    dtype = parse_dtype(args.dtype)
    dev = torch.device("cuda")
    bw = measure_gemv_bandwidth(dev)
    writer = RecordWriter(args.out, device=dev, bench="attention_block", dtype=dtype_name(dtype), bandwidth_GBs=bw)
    rows = [r for name in args.models.split(",") for b in int_list(args.batches) for s in int_list(args.seq_lens)
            for r in bench_config(name, b, s, int_list(args.clusters), grid, dtype, bw, writer, args.rounds)]
    text = table(rows)
    print(f"GEMV bandwidth {bw:.0f} GB/s\n" + text)
    if args.table:
        args.table.write_text(text)
    write_report(args.out, args.md, args.png)


if __name__ == "__main__":
    main()
