"""Latency of the cluster primitives: ClusterReduce (tree / ring) and ClusterGather, over DSM
and through global memory, against message size (4 B .. 64 KB per block) and cluster size.

    python -m bench.primitives [--quick] [--out F.json --md F.md --png F.png]
    clusterfuse bench primitives [...]

Timed in the kernel: one cluster runs ``repeats`` back-to-back calls between two cluster
barriers and block 0 reads %globaltimer around the loop, so launch overhead is excluded and
the time per call is what a fused kernel pays for one collective. Each configuration is
launched several times; the record holds the median and spread of the per-call time.
Messages are fp32 (``message_bytes`` = bytes of one block's tile). Records go to
``bench/results/primitives_<gpu>.json``; the markdown table and the PNG are made from them.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

SIZES = (4, 16, 64, 256, 1024, 1536, 4096, 16384, 65536)
CLUSTERS = (2, 4, 8, 16)
REDUCE_VARIANTS = ("dsm_tree", "dsm_ring", "global_tree", "global_ring")
GATHER_VARIANTS = ("dsm_gather", "global_gather")
TARGET_LOOP_NS = 200_000  # repeats chosen so the timed loop lasts about this long


def gpu_tag(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100' (file-name tag)."""
    m = re.search(r"\b([A-Z]{1,2}\d{2,4})\b", name)
    return m.group(1).lower() if m else re.sub(r"\W+", "_", name.lower()).strip("_")


def _time_per_call(run, launches: int) -> tuple[float, float, float]:
    """run(repeats) -> ns of the loop. Calibrate repeats, then median/min/max µs per call."""
    probe = max(1, int(run(8)) // 8)
    repeats = max(8, min(4000, TARGET_LOOP_NS // max(probe, 1)))
    run(repeats)  # warm-up at the final size
    samples = [run(repeats) / repeats / 1e3 for _ in range(launches)]
    return statistics.median(samples), min(samples), max(samples)


def measure(sizes: Sequence[int], clusters: Sequence[int], launches: int) -> list[dict[str, Any]]:
    from clusterfuse.ops import primitives as P

    rows = []
    for n in clusters:
        for nbytes in sizes:
            elems = max(1, nbytes // 4)
            x = torch.randn(1, n, elems, device="cuda")
            for variant in REDUCE_VARIANTS:
                exchange, algo = variant.split("_")

                def run(repeats, x=x, exchange=exchange, algo=algo):
                    _, t = P.cluster_reduce_timed(x, "max", algo, exchange, repeats=repeats)
                    return int(t[0].item())

                med, lo, hi = _time_per_call(run, launches)
                rows.append(dict(cluster_size=n, variant=variant, message_bytes=elems * 4, time_us=med,
                                 time_us_min=lo, time_us_max=hi))
            stages = next((s for s in (2, 1) if P.smem_fits_gather(n, torch.float32, elems, s)), None)
            if stages is None:
                continue  # N tiles of this size do not fit in one block's shared memory
            for variant in GATHER_VARIANTS:
                exchange = variant.split("_")[0]

                def run(repeats, x=x, exchange=exchange, stages=stages):
                    _, t = P.cluster_gather_timed(x, exchange, repeats=repeats, stages=stages)
                    return int(t[0].item())

                med, lo, hi = _time_per_call(run, launches)
                rows.append(dict(cluster_size=n, variant=variant, message_bytes=elems * 4, time_us=med,
                                 time_us_min=lo, time_us_max=hi, gather_stages=stages))
            print(f"N={n:2d} {elems * 4:6d} B  " + "  ".join(
                f"{r['variant']} {r['time_us']:.2f}" for r in rows
                if r["cluster_size"] == n and r["message_bytes"] == elems * 4), flush=True)
    return rows


# ------------------------------------------------------------------------------- reports
def _fmt_bytes(b: int) -> str:
    return f"{b // 1024} KB" if b >= 1024 and b % 1024 == 0 else (f"{b / 1024:.1f} KB" if b >= 1024 else f"{b} B")


def markdown(records: Sequence[dict[str, Any]]) -> str:
    """One table per cluster size: rows = message size, columns = variants (µs per call)."""
    device = records[0].get("device") if records else "?"
    out = [f"# Cluster primitives latency ({device}), µs per call, fp32, one cluster", "",
           "Median over launches of the in-kernel time of back-to-back calls (min–max in the JSON). "
           "`global/dsm` = global_tree / dsm_tree.", ""]
    variants = [v for v in (*REDUCE_VARIANTS, *GATHER_VARIANTS) if any(r["variant"] == v for r in records)]
    for n in sorted({r["cluster_size"] for r in records}):
        cells = {(r["message_bytes"], r["variant"]): r["time_us"] for r in records if r["cluster_size"] == n}
        out += [f"## cluster size {n}", "", "| message | " + " | ".join(variants) + " | global/dsm (tree) |",
                "|---:|" + "---:|" * (len(variants) + 1)]
        for b in sorted({k[0] for k in cells}):
            vals = [f"{cells[(b, v)]:.2f}" if (b, v) in cells else "–" for v in variants]
            ratio = (f"{cells[(b, 'global_tree')] / cells[(b, 'dsm_tree')]:.2f}×"
                     if (b, "global_tree") in cells and (b, "dsm_tree") in cells else "–")
            out.append(f"| {_fmt_bytes(b)} | " + " | ".join(vals) + f" | {ratio} |")
        out.append("")
    return "\n".join(out)


def plot(records: Sequence[dict[str, Any]], path: str | Path) -> None:
    """One panel per cluster size: time per call vs message size (log-log), a line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["cluster_size"] for r in records})
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.2 * len(sizes), 3.8), squeeze=False, sharey=True)
    for ax, n in zip(axes[0], sizes, strict=True):
        for v in (*REDUCE_VARIANTS, *GATHER_VARIANTS):
            pts = sorted((r["message_bytes"], r["time_us"], r["time_us_min"], r["time_us_max"])
                         for r in records if r["cluster_size"] == n and r["variant"] == v)
            if not pts:
                continue
            xs, ys, lo, hi = zip(*pts, strict=True)
            ax.errorbar(xs, ys, yerr=[[y - a for y, a in zip(ys, lo, strict=True)],
                                      [b - y for y, b in zip(ys, hi, strict=True)]],
                        marker="o", ms=3, capsize=2, label=v, linestyle="--" if v.startswith("global") else "-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"cluster size {n}")
        ax.set_xlabel("message bytes per block")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("µs per call")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"ClusterReduce / ClusterGather latency ({records[0].get('device', '')})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    from bench.common import RecordWriter, load_records, results_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="message bytes per block")
    parser.add_argument("--clusters", type=int, nargs="+", default=list(CLUSTERS))
    parser.add_argument("--launches", type=int, default=7, help="timed launches per configuration")
    parser.add_argument("--quick", action="store_true", help="3 launches per configuration")
    parser.add_argument("--out", type=Path, help="records (default bench/results/primitives_<gpu>.json)")
    parser.add_argument("--md", type=Path, help="markdown table (default: next to --out)")
    parser.add_argument("--png", type=Path, help="plot (default: next to --out)")
    parser.add_argument("--report-only", action="store_true", help="only remake the table and plot from --out")
    args = parser.parse_args(argv)

    if args.report_only:
        if args.out is None:
            parser.error("--report-only needs --out")
        records = load_records([args.out])
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench primitives: needs a CUDA GPU (Hopper)")
        tag = gpu_tag(torch.cuda.get_device_name())
        args.out = args.out or results_dir() / f"primitives_{tag}.json"
        rows = measure(args.sizes, args.clusters, 3 if args.quick else args.launches)
        writer = RecordWriter(args.out, bench="primitives", model=None, batch=None, seq_len=None, dtype="fp32")
        records = [writer.make(r) for r in rows]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(records, indent=1) + "\n")  # one run = one file: tables from one run
    md = args.md or args.out.with_suffix(".md")
    png = args.png or args.out.with_suffix(".png")
    md.write_text(markdown(records))
    plot(records, png)
    print(markdown(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
