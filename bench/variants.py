"""Compile-time variant sweep: one benchmark run per set of extra kernel defines.

    python -m bench.variants --bench attention_block \\
        --variants "CF_ATTN_L2_AHEAD=0,CF_ATTN_KV_AHEAD=0;CF_ATTN_L2_AHEAD=4" \\
        --out bench/results/attention_variants_h100.json -- --models llama-2-7b --batches 1 --clusters 4

Each variant runs ``python -m bench.<bench> <args after --> --out <tmp>.json`` in its own process
with ``CLUSTERFUSE_EXTRA_DEFINES`` set (so its kernels are built with those defines, see
`clusterfuse.ops.build`). The records of every run are tagged with ``defines`` and appended to
``--out``; a table of the headline records (time, floor, share) per variant is printed and, with
``--md``, written. An empty variant (``""``) runs the kernels' defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.common import load_records

#: Records of a run that the table shows (the tuned headline of each block benchmark).
HEADLINE_VARIANTS = ("clusterfuse", "torch_cuda_graph")


def parse_variants(text: str) -> list[str]:
    """``"A=1,B=2;A=3"`` → ``["A=1,B=2", "A=3"]`` (``;`` separates variants; blanks kept as defaults)."""
    return [v.strip() for v in text.split(";")]


def run_variant(bench: str, defines: str, bench_args: Sequence[str]) -> list[dict]:
    """Runs one benchmark process with these extra defines; returns its records tagged with them."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "records.json"
        env = {**os.environ, "CLUSTERFUSE_EXTRA_DEFINES": defines}
        cmd = [sys.executable, "-m", f"bench.{bench}", *bench_args, "--out", str(out)]
        print(f"== variant [{defines or 'defaults'}]: {' '.join(cmd[1:])}", flush=True)
        subprocess.run(cmd, env=env, check=True)
        records = load_records([out])
    for r in records:
        r["defines"] = defines
    return records


def table(records: Sequence[dict]) -> str:
    """Markdown: one row per (defines, model, batch, S, variant) headline record."""
    rows = ["| defines | model | batch | S | variant | cluster | time (µs) | floor (µs) | share of floor |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        if r.get("variant") not in HEADLINE_VARIANTS:
            continue
        if r["variant"] == "clusterfuse" and r.get("cluster_size") is not None and r.get("chosen_cluster_size") is None:
            continue  # per-cluster sweep rows of a block benchmark; the headline row names the chosen size
        share = f"{100 * r['floor_us'] / r['time_us']:.0f}%" if r.get("floor_us") else "–"
        cluster = r.get("chosen_cluster_size") or r.get("cluster_size") or "–"
        rows.append(f"| {r['defines'] or 'defaults'} | {r.get('model')} | {r.get('batch')} | {r.get('seq_len', '–')} "
                    f"| {r['variant']} | {cluster} | {r['time_us']:.1f} | {r.get('floor_us') or 0:.1f} | {share} |")
    return "\n".join(rows) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    bench_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, bench_args = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bench", required=True, help="benchmark module under bench/, e.g. attention_block")
    parser.add_argument("--variants", required=True, help="';'-separated define sets, each 'NAME=value,...'")
    parser.add_argument("--out", type=Path, required=True, help="JSON list the tagged records are appended to")
    parser.add_argument("--md", type=Path, default=None, help="markdown table of the headline records")
    args = parser.parse_args(argv)
    if "--out" in bench_args:
        parser.error("the benchmark's --out is set per variant; give --out before '--'")

    records = [r for defines in parse_variants(args.variants) for r in run_variant(args.bench, defines, bench_args)]
    old = load_records([args.out]) if args.out.exists() else []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(old + records, indent=1) + "\n")
    text = table(records)
    print(text)
    if args.md:
        args.md.write_text(f"## {args.bench} compile-time variants\n\n{text}")


if __name__ == "__main__":
    main()
