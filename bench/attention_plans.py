"""The fused attention block's launch plan per cluster size and block size on this GPU: shared
memory per block, whether the whole grid is co-resident, how many clusters can be.

    python -m bench.attention_plans --models llama-2-7b,llama-3-8b --batches 1,16 [--out plans.json]

It explains the tuner's choices: a grid that is not co-resident runs part of its clusters in a
second wave (and sums its partials by arrival order), which no cluster size is worth. Needs a
Hopper GPU (the plan asks the CUDA occupancy API).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from clusterfuse.models.presets import preset
from clusterfuse.ops import attention_block as ab


def plans(model: str, batch: int, device: int = 0) -> list[dict]:
    """One row per (block threads, exchange, cluster size): the plan's numbers, or why there is
    none. With the flat exchange (no hardware cluster) "active clusters" counts resident blocks."""
    cfg = preset(model)
    rows = []
    for threads in ab.BLOCK_THREADS:
        spec = ab._spec(torch.bfloat16, batch, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                        threads=threads)
        for exchange, cluster in ((x, c) for x in ("dsm", "flat") for c in ab.CLUSTER_SIZES):
            row = {"model": model, "batch": batch, "threads": threads, "exchange": exchange, "cluster": cluster,
                   "blocks": cfg.num_key_value_heads * cluster}
            dims = (batch, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cluster,
                    ab._EXCHANGE_CODES[exchange])
            try:
                plan = ab._plan(device, spec, dims)
                row.update(smem_bytes=plan.smem_bytes, coresident=bool(plan.coresident),
                           active_clusters=plan.active_clusters)
            except (ValueError, RuntimeError) as err:
                row["error"] = str(err)
            rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="llama-2-7b,llama-3-8b")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--out", type=Path, default=None, help="JSON list of the rows")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.attention_plans needs a CUDA GPU (Hopper)")
    rows = [r for m in args.models.split(",") for b in map(int, args.batches.split(",")) for r in plans(m, b)]
    print(f"{torch.cuda.get_device_name()}: {torch.cuda.get_device_properties(0).multi_processor_count} SMs")
    print("| model | batch | threads | exchange | cluster | blocks | smem KB | co-resident | active clusters |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        head = f"| {r['model']} | {r['batch']} | {r['threads']} | {r['exchange']} | {r['cluster']} | {r['blocks']} | "
        if "error" in r:
            print(head + f"{r['error']} | | |")
        else:
            print(head + f"{r['smem_bytes'] / 1024:.1f} | {r['coresident']} | {r['active_clusters']} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
