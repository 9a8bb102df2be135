"""Before/after table of two decode-step benchmark runs (``bench.decode_step`` records).

    python -m tools.compare_decode BEFORE.json AFTER.json [--md OUT.md]

Rows: every (model, batch, S) measured in both files, the fused backend's ``clusterfuse`` record:
median ms per token before and after, the ratio, each side's spread (min-max over the repeats)
and a verdict: ``same`` where the difference is inside the larger of the two spreads, else
``faster`` / ``slower``. Made for tools/gpu_run.sh bench-compare, which runs both sides in one
device call (same GPU, same clocks).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.common import load_records

Key = tuple[str, int, int]


def fused_steps(records: Sequence[Mapping[str, Any]]) -> dict[Key, Mapping[str, Any]]:
    """(model, batch, seq_len) -> the last ``clusterfuse`` decode_step record of that configuration."""
    return {(r["model"], r["batch"], r["seq_len"]): r for r in records
            if r.get("bench") == "decode_step" and r.get("variant") == "clusterfuse"}


def verdict(before: Mapping[str, Any], after: Mapping[str, Any]) -> str:
    """``same`` when the medians differ by less than the larger spread, else faster / slower."""
    def spread(r: Mapping[str, Any]) -> float:
        lo, hi = r.get("time_us_min"), r.get("time_us_max")
        return (hi - lo) if lo is not None and hi is not None else 0.0

    diff = after["time_us"] - before["time_us"]
    if abs(diff) <= max(spread(before), spread(after)):
        return "same"
    return "slower" if diff > 0 else "faster"


def table(before: Sequence[Mapping[str, Any]], after: Sequence[Mapping[str, Any]]) -> str:
    """The markdown table (see the module docstring)."""
    b, a = fused_steps(before), fused_steps(after)
    keys = sorted(set(b) & set(a))
    if not keys:
        raise ValueError("no configuration measured on both sides (clusterfuse decode_step records)")
    commits = {r.get("git_commit") or "?" for r in b.values()}, {r.get("git_commit") or "?" for r in a.values()}
    device = next(iter(a.values())).get("device", "?")

    def ms(r: Mapping[str, Any]) -> str:
        lo, hi = r.get("time_us_min"), r.get("time_us_max")
        rng = f" ({lo / 1e3:.3f}-{hi / 1e3:.3f})" if lo is not None and hi is not None else ""
        return f"{r['time_us'] / 1e3:.3f}{rng}"

    lines = [f"## Decode step before / after ({device})", "",
             f"before: {', '.join(sorted(commits[0]))}; after: {', '.join(sorted(commits[1]))}; ms per token, "
             "median (min-max over the repeats); same run, same GPU.", "",
             "| model | batch | S | before (ms) | after (ms) | after / before | verdict |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for k in keys:
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {ms(b[k])} | {ms(a[k])} | "
                     f"{a[k]['time_us'] / b[k]['time_us']:.3f} | {verdict(b[k], a[k])} |")
    only = sorted(set(b) ^ set(a))
    if only:
        lines += ["", "Measured on one side only: " + ", ".join(f"{m} b{n} S{s}" for m, n, s in only)]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--md", type=Path, default=None, help="write the table here too")
    args = parser.parse_args(argv)
    try:
        md = table(load_records([args.before]), load_records([args.after]))
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(md, end="")
    if args.md:
        args.md.write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
