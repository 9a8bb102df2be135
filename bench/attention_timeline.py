"""Where the fused attention block spends its time: per-phase durations measured inside the kernel.

    python -m bench.attention_timeline [--model llama-2-7b] [--batch 1] [--seq-len 1024] [--cluster 4]
        [--page-size 16] [--back-to-back 8] [--repeats 20] [--out bench/results/attention_timeline_h100.json]

Runs the kernel's timeline build (``CF_ATTN_TIMELINE=1``, chosen by the op when it is given a
``timeline`` buffer: (thread 0 of every block records ``clock64`` at each
phase boundary and ``%globaltimer`` at its start and end), launches it over rotating copies of the
weights and caches (so that no launch reads from L2 what the previous one left there), and prints,
for every phase, the median and the maximum over blocks and launches of its duration in µs, plus
the kernel's span (first block start to last block end), how late the last block started, and the
SM clock. Clocks are converted with each block's own ns-per-clock (globaltimer span over clock64
span).

``--back-to-back N`` also captures N launches in one CUDA graph, as bench.attention_block times
them, each with its own buffer, and reports (medians over consecutive launches) when a launch's
first block starts and its wait for the previous kernel ends, relative to the previous launch's
last block end and to its last release of its successor (programmatic launch, pdl.cuh), and the
period from one launch's last block end to the next one's.

``--page-size N`` runs the paged-cache path: the same caches cut into pages of N rows (pool
``[pages, kv_heads, N, head_dim]``, pages of a sequence in order, as the engine allocates them).
"""

from __future__ import annotations

import argparse
import statistics
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch

import clusterfuse.ops.attention_block as attn
from bench.attention_block import _ours_fns, setup_blocks
from bench.common import (
    add_kernel_option_args,
    capture_graph,
    kernel_options,
    non_default_knobs,
    option_fields,
    parse_dtype,
    print_phase_table,
    results_dir,
    save_timeline,
)
from clusterfuse.ops.options import DEFAULT_KERNEL_OPTIONS, KernelOptions

#: The kernel's stamps (attention_block.cu, enum Stamp); a phase ends at its stamp.
PHASES = ("start", "wait for the previous kernel", "norm + checks", "QKV GEMV", "q,k,v exchange", "RoPE + KV append",
          "attention", "state exchange + merge", "O-proj GEMV", "grid barrier", "partials reduction")
#: The phases whose medians by cluster rank the report shows (where a rank's share of the work differs).
RANK_PHASES = ("QKV GEMV", "q,k,v exchange", "attention", "state exchange + merge", "O-proj GEMV")


def _recorded_rows(tl: torch.Tensor) -> list[list[int]]:
    """The timeline's rows of the blocks that ran (a zero start: no block wrote the row)."""
    return [r for r in tl.tolist() if r[0]]


def _ns_per_clock(row: list[int]) -> float:
    """A block's own ns per clock64 tick: its globaltimer span over its clock64 span."""
    clk = row[3:]
    return (row[1] - row[0]) / max(1, clk[-1] - clk[0])


def phase_durations(tl: torch.Tensor) -> tuple[list[list[float]], float, float, float, list[int]]:
    """Per block, the µs of each phase after the first stamp; the span of the launch (µs), the
    latest block start relative to the first (µs), the median SM clock (GHz) and per block the
    SM it ran on. Rows never written (all zero: a grid smaller than the buffer) are left out."""
    rows = _recorded_rows(tl)
    per_block, clocks = [], []
    for r in rows:
        clk, ns_per_clk = r[3:], _ns_per_clock(r)
        clocks.append(1.0 / ns_per_clk if ns_per_clk else 0.0)
        per_block.append([(clk[i] - clk[i - 1]) * ns_per_clk / 1e3 for i in range(1, len(clk))])
    starts = [r[0] for r in rows]
    span = (max(r[1] for r in rows) - min(starts)) / 1e3
    return per_block, span, (max(starts) - min(starts)) / 1e3, statistics.median(clocks), [r[2] for r in rows]


def shared_sm_stats(per_block: list[list[float]], sms: list[int]) -> tuple[int, float | None, float | None]:
    """How many blocks of a launch shared their SM with another of its blocks, and the median µs
    from the end of the wait for the previous kernel to the end of the O-projection of blocks that
    shared / had their SM alone."""
    counts = Counter(sms)
    # The block's own work: the phases after the wait, up to the barrier.
    first, work = PHASES.index("norm + checks") - 1, PHASES.index("grid barrier") - 1
    busy = [sum(d[first:work]) for d in per_block]
    shared = [b for b, sm in zip(busy, sms, strict=True) if counts[sm] > 1]
    alone = [b for b, sm in zip(busy, sms, strict=True) if counts[sm] == 1]
    return len(shared), statistics.median(shared) if shared else None, statistics.median(alone) if alone else None


def _timeline_slots(cfg, dtype: torch.dtype, batch: int) -> int:
    spec = attn._spec(dtype, batch, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, timeline=True)
    return attn._lib(*spec).timeline_slots


def _collect(launch, buffer: torch.Tensor, repeats: int) -> dict:
    """Runs `launch(i, buffer)` `repeats` times; per-phase statistics of what it wrote in `buffer`."""
    durations: list[list[float]] = []
    by_block: list[list[list[float]]] = []  # [block index][launch][phase]
    spans, skews, clocks, shared, busy_shared, busy_alone = [], [], [], [], [], []
    for i in range(repeats):
        launch(i, buffer)
        torch.cuda.synchronize()
        per_block, span, skew, clock, sms = phase_durations(buffer.cpu())
        durations += per_block
        for b, d in enumerate(per_block):
            if b == len(by_block):
                by_block.append([])
            by_block[b].append(d)
        spans.append(span)
        skews.append(skew)
        clocks.append(clock)
        n_shared, b_shared, b_alone = shared_sm_stats(per_block, sms)
        shared.append(n_shared)
        busy_shared += [b_shared] if b_shared is not None else []
        busy_alone += [b_alone] if b_alone is not None else []
    phases = {}
    for i, name in enumerate(PHASES[1:]):
        col = [d[i] for d in durations]
        phases[name] = {"median_us": statistics.median(col), "max_us": max(col)}
    return {"phases": phases, "span_us": statistics.median(spans), "last_block_start_us": statistics.median(skews),
            "sm_clock_GHz": statistics.median(clocks), "launches": repeats, "blocks": len(per_block),
            "blocks_sharing_an_sm": statistics.median(shared),
            "work_us_shared_sm": statistics.median(busy_shared) if busy_shared else None,
            "work_us_alone_on_sm": statistics.median(busy_alone) if busy_alone else None, "_by_block": by_block}


def by_rank(by_block: list[list[list[float]]], cluster: int) -> dict[str, list[float]]:
    """Per phase, the median µs over the blocks of each cluster rank (block index % cluster) and
    the launches: where a rank's share of the work (e.g. its Q/K/V pieces) makes it slower."""
    out = {}
    for i, name in enumerate(PHASES[1:]):
        out[name] = [statistics.median(d[i] for b in range(rank, len(by_block), cluster) for d in by_block[b])
                     for rank in range(cluster)]
    return out


def run(model: str, batch: int, seq_len: int, cluster: int, dtype: torch.dtype, repeats: int,
        page_size: int | None = None, back_to_back_launches: int = 0,
        options: KernelOptions = DEFAULT_KERNEL_OPTIONS) -> dict:
    """The isolated block's timeline; with `back_to_back_launches`, also run_back_to_back's medians
    on the same weights and caches (``back_to_back``)."""
    cfg, pos, cache_lens, rope, blocks, x = setup_blocks(model, batch, seq_len, dtype)
    fns = _ours_fns(blocks, x, rope, pos, cache_lens, cluster, "dsm", page_size=page_size, options=options)

    def buffer() -> torch.Tensor:
        return torch.zeros(cfg.num_key_value_heads * cluster, _timeline_slots(cfg, dtype, batch), dtype=torch.int64,
                           device="cuda")

    warm = buffer()
    for fn in fns * 2:  # build, plan, tune, warm up
        fn(timeline=warm)
    torch.cuda.synchronize()
    res = _collect(lambda i, buf: fns[i % len(fns)](timeline=buf), buffer(), repeats)
    res["by_rank"] = by_rank(res.pop("_by_block"), cluster)
    if back_to_back_launches:
        res["back_to_back"] = run_back_to_back(fns, [buffer() for _ in range(back_to_back_launches)], repeats)
    return {"model": model, "batch": batch, "seq_len": seq_len, "cluster_size": cluster, "page_size": page_size,
            "context": "isolated", **res}


#: Stamps (attention_block.cu, enum Stamp) whose times back_to_back reads: the wait for the previous
#: kernel done, and the O-projection done (where the kernel lets its successor start, pdl.cuh).
_WAITED, _PROJECTED = PHASES.index("wait for the previous kernel"), PHASES.index("O-proj GEMV")


def launch_edges(tl: torch.Tensor) -> dict[str, float]:
    """globaltimer ns of one launch's first block start, last block end, the last block's release of
    its successor (the end of its O-projection) and the median end of the blocks' wait for the
    previous kernel (clock64 stamps converted with each block's own ns per clock)."""
    rows = _recorded_rows(tl)

    def at(r: list[int], stamp: int) -> float:
        return r[0] + (r[3 + stamp] - r[3]) * _ns_per_clock(r)

    return {"first_start": min(r[0] for r in rows), "last_end": max(r[1] for r in rows),
            "last_release": max(at(r, _PROJECTED) for r in rows),
            "median_waited": statistics.median(at(r, _WAITED) for r in rows)}


def back_to_back(edges: Sequence[dict[str, float]]) -> dict[str, float]:
    """Medians over consecutive launches (µs): how long after the previous launch's last block ended
    (negative: before) the next one's first block started, and its blocks' wait ended; how long
    after the previous launch's last release (programmatic launch) it started; and the period, last
    block end to last block end (the per-launch time of a stream of launches)."""
    pairs = list(zip(edges[:-1], edges[1:], strict=True))
    if not pairs:
        raise ValueError("edges: need at least two launches")

    def med(f) -> float:
        return statistics.median(f(a, b) for a, b in pairs) / 1e3

    return {"start_after_previous_end_us": med(lambda a, b: b["first_start"] - a["last_end"]),
            "start_after_previous_release_us": med(lambda a, b: b["first_start"] - a["last_release"]),
            "wait_done_after_previous_end_us": med(lambda a, b: b["median_waited"] - a["last_end"]),
            "period_us": med(lambda a, b: b["last_end"] - a["last_end"])}


def back_to_back_label(key: str) -> str:
    """A back_to_back key as words, e.g. "period" for ``period_us``."""
    return key.removesuffix("_us").replace("_", " ")


def run_back_to_back(fns: Sequence, buffers: Sequence[torch.Tensor], repeats: int) -> dict:
    """One launch per buffer, round robin over `fns`, captured in one CUDA graph (as
    bench.attention_block times them, each launch writing its own timeline buffer), replayed
    `repeats` times: whether a launch starts, and its wait ends, before the previous one has
    finished (back_to_back)."""
    launches = len(buffers)
    # Each captured launch keeps its own buffer.
    graph = capture_graph([lambda i=i: fns[i % len(fns)](timeline=buffers[i]) for i in range(launches)],
                          inner=launches)
    samples = []
    for _ in range(repeats):
        for b in buffers:
            b.zero_()
        graph.replay()
        torch.cuda.synchronize()
        samples.append(back_to_back([launch_edges(b.cpu()) for b in buffers]))
    return {k: statistics.median(s[k] for s in samples) for k in samples[0]}


def markdown(records: Sequence[dict]) -> str:
    """One column per timeline record (model, batch, S, cluster, cache layout, kernel options other
    than the defaults, extra kernel defines of old records, commit), one row per phase."""
    def title(r: dict) -> str:
        layout = "engine" if r.get("context") == "engine" else "paged" if r.get("page_size") else "contiguous"
        c = f" c{r['cluster_size']}" if r.get("cluster_size") else ""
        knobs = "".join(" " + k for k in non_default_knobs(r))
        defines = [d for d in (r.get("defines") or "").split(",") if d and d != "CF_ATTN_TIMELINE=1"]
        knobs += "".join(" " + d for d in defines)  # an A/B of builds: the columns must differ
        return f"{r['model']} b{r['batch']} S{r['seq_len']}{c} {layout}{knobs} ({(r.get('git_commit') or '?')[:7]})"

    lines = ["## attention_block timeline", "",
             "`python -m bench.attention_timeline` (kernel built with CF_ATTN_TIMELINE=1): per phase, median / max "
             "over blocks and launches (µs); `engine` (old records): the last layer's launch inside the fused "
             "decode step.", "",
             "| phase | " + " | ".join(title(r) for r in records) + " |", "| --- |" + " --- |" * len(records)]
    def cell(r: dict, ph: str) -> str:  # records from before a phase existed show "–"
        d = r["phases"].get(ph)
        return f"{d['median_us']:.1f} / {d['max_us']:.1f}" if d else "–"

    for ph in PHASES[1:]:
        cells = (cell(r, ph) for r in records)
        lines.append(f"| {ph} | " + " | ".join(cells) + " |")
    lines.append("| span | " + " | ".join(f"{r['time_us']:.1f}" for r in records) + " |")
    lines.append("| last block start | " + " | ".join(f"{r['last_block_start_us']:.1f}" for r in records) + " |")
    lines.append("| SM clock (GHz) | " + " | ".join(
        f"{r['sm_clock_GHz']:.2f}" if r.get("sm_clock_GHz") else "–" for r in records) + " |")
    lines.append("| blocks sharing an SM | " + " | ".join(
        "–" if r.get("blocks_sharing_an_sm") is None else f"{r['blocks_sharing_an_sm']:.0f}" for r in records) + " |")
    lines.append("| work µs, shared SM / alone | " + " | ".join(
        f"{_us(r.get('work_us_shared_sm'))} / {_us(r.get('work_us_alone_on_sm'))}" for r in records) + " |")
    measured = next((r["back_to_back"] for r in records if r.get("back_to_back")), None)
    for key in measured or ():  # run_back_to_back's medians, where measured
        lines.append(f"| back to back: {back_to_back_label(key)} | " + " | ".join(
            _us((r.get("back_to_back") or {}).get(key)) for r in records) + " |")
    for ph in RANK_PHASES:  # medians by cluster rank, 0 first (records from before by_rank show "–")
        lines.append(f"| {ph} by rank | " + " | ".join(
            " / ".join(f"{v:.1f}" for v in r["by_rank"][ph]) if r.get("by_rank") else "–" for r in records) + " |")
    return "\n".join(lines) + "\n"


def _us(v: float | None) -> str:
    return "–" if v is None else f"{v:.1f}"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama-2-7b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--cluster", type=int, default=4)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--page-size", type=int, default=None, help="paged cache with pages of this many rows")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--back-to-back", type=int, default=0, metavar="N",
                        help="also replay N launches in one CUDA graph and report how each starts and waits "
                             "relative to the previous one's end (programmatic launch overlap)")
    parser.add_argument("--out", type=Path, default=results_dir() / "attention_timeline.json")
    parser.add_argument("--md", type=Path, default=None, help="markdown of every record in --out")
    add_kernel_option_args(parser)
    args = parser.parse_args(argv)
    if args.back_to_back == 1 or args.back_to_back < 0:
        parser.error(f"--back-to-back: expected 0 (off) or at least 2 launches, got {args.back_to_back}")
    options = kernel_options(args)
    dtype = parse_dtype(args.dtype)
    res = run(args.model, args.batch, args.seq_len, args.cluster, dtype, args.repeats, args.page_size,
              args.back_to_back, options)
    layout = f"cluster {args.cluster} " + (f"paged {args.page_size}" if args.page_size else "contiguous")
    print(f"{args.model} batch {args.batch} S={args.seq_len} {layout}: SM clock {res['sm_clock_GHz']:.2f} GHz, "
          f"span {res['span_us']:.1f} µs "
          f"(median of {args.repeats} launches), last block started {res['last_block_start_us']:.1f} µs late")
    print(f"blocks sharing an SM: {res['blocks_sharing_an_sm']:.0f}; work (start to O-proj end) median "
          f"{_us(res['work_us_shared_sm'])} µs on a shared SM, {_us(res['work_us_alone_on_sm'])} µs alone")
    print_phase_table(res["phases"])
    total = sum(d["median_us"] for d in res["phases"].values())
    print(f"| sum of medians | {total:.1f} | |")
    print("median µs by cluster rank: " + "; ".join(
        f"{name} " + " ".join(f"{v:.1f}" for v in res["by_rank"][name]) for name in RANK_PHASES))
    if res.get("back_to_back"):
        print(f"{args.back_to_back} launches in one graph, median over pairs (µs): " + ", ".join(
            f"{back_to_back_label(k)} {v:.1f}" for k, v in res["back_to_back"].items()))
    save_timeline(args.out, args.md, markdown, res, bench="attention_timeline", variant="clusterfuse",
                  dtype=args.dtype, **option_fields(options))


if __name__ == "__main__":
    main()
