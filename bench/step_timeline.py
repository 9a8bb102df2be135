"""Where the persistent decode step spends a layer: per-phase durations measured inside the kernel.

    python -m bench.step_timeline [--model llama-3-8b] [--batch 1] [--seq-len 1024] [--cluster N]
        [--dtype bf16] [--repeats 20] [--out bench/results/step_timeline.json] [--md FILE]

Runs the step's timeline build (``CF_STEP_TIMELINE=1``, which the op picks when it is given a
``timeline`` buffer: thread 0 of every block records ``clock64`` at every phase boundary of every
layer and ``%globaltimer`` at its start and end; kernels/include/clusterfuse/step/timeline.cuh) on
a random-weight model of the preset's shape with a paged cache filled to ``--seq-len`` rows, and
prints, for every phase of a layer, the median and maximum over blocks, layers and launches of its
duration in µs, the median layer, and the step's span beside the plain build's time (CUDA graph,
same inputs): the stamps' own cost. Clocks are converted with each block's own ns per clock
(globaltimer span over clock64 span). A block whose cluster has no KV head group (or FFN slice) in
a layer has no stamps for that program's phases; the inner phases of a program are those of the
cluster's first group (slice), and the rest of its groups show as "further groups".
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from pathlib import Path

import torch

from bench.common import parse_dtype, print_phase_table, results_dir, save_timeline, time_cuda_graph

#: The stamps of one layer (step/timeline.cuh, enum LayerStamp), each the end of the phase it names.
PHASES = ("attention: norm + checks", "attention: QKV GEMV", "attention: q,k,v exchange",
          "attention: QK-norm / RoPE + KV append", "attention: split-KV attention", "attention: state merge",
          "attention: O-proj GEMV", "attention: further groups + cluster waits", "grid barrier: attention partials",
          "sum of attention partials", "grid barrier: mid", "FFN: norm", "FFN: gate/up GEMV",
          "FFN: SiLU·up + activation gather", "FFN: down GEMV", "FFN: further slices + cluster waits",
          "grid barrier: FFN partials", "sum of FFN partials", "grid barrier: next layer")
#: Slots before the layers' in a block's row: globaltimer at start, at end, SM id, clock64 at start.
HEAD = 4


def block_layers(row: Sequence[int], num_layers: int) -> tuple[list[list[float | None]], float]:
    """One block's row -> per layer, the µs of each phase (None where the block did not run it),
    and the block's ns per clock. A phase lasts from the latest earlier stamp (the previous
    layer's end, or the kernel's start) to its own."""
    slots = len(PHASES)
    if len(row) != HEAD + num_layers * slots:
        raise ValueError(f"timeline row: expected {HEAD + num_layers * slots} slots, got {len(row)}")
    clocks = row[HEAD:]
    last = max(c for c in clocks if c)
    ns_per_clock = (row[1] - row[0]) / max(1, last - row[3])
    layers, prev = [], row[3]
    for layer in range(num_layers):
        durations: list[float | None] = []
        for stamp in clocks[layer * slots:(layer + 1) * slots]:
            if stamp:
                durations.append((stamp - prev) * ns_per_clock / 1e3)
                prev = stamp
            else:
                durations.append(None)
        layers.append(durations)
    return layers, ns_per_clock


def summarise(timelines: Sequence[torch.Tensor], num_layers: int) -> dict:
    """Per phase, the min, median and max µs over every block, layer and launch that ran it (a
    barrier's min is its latency, its median the wait for the slowest block too); the median
    layer (previous layer's end to its end, layers after the first); the launch's span (µs, first
    block start to last block end, median over launches); the median SM clock (GHz)."""
    per_phase: list[list[float]] = [[] for _ in PHASES]
    layer_us, spans, clocks = [], [], []
    for tl in timelines:
        rows = [r for r in tl.tolist() if r[0]]  # blocks that ran (the buffer may have spare rows)
        for r in rows:
            layers, ns_per_clock = block_layers(r, num_layers)
            clocks.append(1.0 / ns_per_clock if ns_per_clock else 0.0)
            for i, durations in enumerate(layers):
                for p, d in enumerate(durations):
                    if d is not None:
                        per_phase[p].append(d)
                if i > 0:
                    layer_us.append(sum(d for d in durations if d is not None))
        spans.append((max(r[1] for r in rows) - min(r[0] for r in rows)) / 1e3)
    phases = {name: {"min_us": min(v), "median_us": statistics.median(v), "max_us": max(v)}
              for name, v in zip(PHASES, per_phase, strict=True) if v}
    return {"phases": phases, "layer_us": statistics.median(layer_us) if layer_us else None,
            "span_us": statistics.median(spans), "sm_clock_GHz": statistics.median(clocks)}


def run(model: str, batch: int, seq_len: int, cluster: int | None, dtype: torch.dtype, repeats: int) -> dict:
    """The timeline of ``repeats`` eager launches of the persistent step, and the plain build's time."""
    from bench.decode_step import filled_cache
    from clusterfuse.engine.fused_model import FusedModel
    from clusterfuse.models.presets import preset
    from clusterfuse.models.random_init import random_weights
    from clusterfuse.ops import attention_block as attn_op
    from clusterfuse.ops import decode_step as step_op

    config = preset(model)
    if config.family != "llama":
        raise ValueError(f"--model: the persistent step runs the Llama family, {model} is {config.family}")
    fused = FusedModel(config, random_weights(config, device="cuda", dtype=dtype, seed=0), device="cuda",
                       step="persistent", step_cluster=cluster)
    cache, slots, ids = filled_cache(fused, batch, seq_len)
    cache.check_room(slots, 1)  # the page of the row the step writes (row seq_len)
    ref, dev = fused.ref, torch.device("cuda")
    hidden = ref.embed[ids]
    lens = torch.full((batch,), seq_len, dtype=torch.int32, device=dev)
    cluster = fused.step_cluster_size(dev)
    layers = fused.step_layers(cache)
    kwargs = dict(num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads,
                  head_dim=config.head_dim, eps=config.rms_norm_eps, cluster_size=cluster,
                  block_table=cache.block_table[:batch], page_size=cache.page_size, window=config.sliding_window)

    def step(timeline: torch.Tensor | None = None) -> torch.Tensor:
        return step_op.decode_step(hidden, layers, ref.cos, ref.sin, lens, lens, timeline=timeline, **kwargs)

    sp = step_op.plan(dtype, batch, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                      config.head_dim, config.intermediate_size, len(layers), cluster, device=dev,
                      qk_norm=config.qk_norm, timeline=True,
                      window=attn_op.kernel_window(config.sliding_window, layers[0].k_cache, kwargs["block_table"],
                                                   cache.page_size) > 0)  # the build the op will pick
    timeline = torch.zeros(sp.timeline_shape(), dtype=torch.int64, device=dev)
    plain = step()  # build, plan, pointer table
    with_stamps = step(timeline)
    if not torch.equal(plain, with_stamps):
        raise RuntimeError("the timeline build's output differs from the plain build's")
    timelines = []
    for _ in range(repeats):
        step(timeline)
        torch.cuda.synchronize()
        timelines.append(timeline.cpu())
    plain_timing = time_cuda_graph(step, warmup=3, repeats=20, inner=1)
    return {"model": model, "batch": batch, "seq_len": seq_len, "cluster_size": cluster, "layers": len(layers),
            "grid_blocks": sp.timeline_shape()[0], "launches": repeats, "plain_step_us": plain_timing.median_us,
            **summarise(timelines, len(layers))}


def markdown(records: Sequence[dict]) -> str:
    """One column per timeline record, one row per phase of a layer (min / median / max µs)."""
    def title(r: dict) -> str:
        return (f"{r['model']} b{r['batch']} S{r['seq_len']} c{r['cluster_size']} {r.get('device') or ''} "
                f"({(r.get('git_commit') or '?')[:7]})")

    lines = ["## persistent decode step timeline", "",
             "`python -m bench.step_timeline` (CF_STEP_TIMELINE=1): per phase of a layer, min / median / max over "
             "blocks, layers and launches (µs).", "",
             "| phase | " + " | ".join(title(r) for r in records) + " |", "| --- |" + " --- |" * len(records)]
    for ph in PHASES:
        cells = (f"{d['min_us']:.1f} / {d['median_us']:.1f} / {d['max_us']:.1f}" if (d := r["phases"].get(ph))
                 else "–" for r in records)
        lines.append(f"| {ph} | " + " | ".join(cells) + " |")
    lines.append("| layer (median) | " + " | ".join(
        f"{r['layer_us']:.1f}" if r.get("layer_us") else "–" for r in records) + " |")
    lines.append("| step span, timeline build | " + " | ".join(f"{r['time_us']:.1f}" for r in records) + " |")
    lines.append("| step, plain build (graph) | " + " | ".join(f"{r['plain_step_us']:.1f}" for r in records) + " |")
    lines.append("| SM clock (GHz) | " + " | ".join(f"{r['sm_clock_GHz']:.2f}" for r in records) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--cluster", type=int, default=None, help="the step's cluster size (default: the engine's)")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=results_dir() / "step_timeline.json")
    parser.add_argument("--md", type=Path, default=None, help="markdown of every record in --out")
    args = parser.parse_args(argv)
    if not 1 <= args.batch <= 16:
        parser.error(f"--batch: expected 1..16, got {args.batch}")
    if args.seq_len < 1:
        parser.error(f"--seq-len: expected at least 1, got {args.seq_len}")
    if args.repeats < 1:
        parser.error(f"--repeats: expected at least 1, got {args.repeats}")
    from clusterfuse.ops.decode_step import CLUSTER_SIZES

    if args.cluster is not None and args.cluster not in CLUSTER_SIZES:
        parser.error(f"--cluster: expected one of {CLUSTER_SIZES}, got {args.cluster}")
    res = run(args.model, args.batch, args.seq_len, args.cluster, parse_dtype(args.dtype), args.repeats)
    print(f"{args.model} batch {args.batch} S={args.seq_len} cluster {res['cluster_size']}, {res['grid_blocks']} "
          f"blocks: span {res['span_us']:.1f} µs with stamps, {res['plain_step_us']:.1f} µs plain (graph); "
          f"median layer {res['layer_us']:.1f} µs; SM clock {res['sm_clock_GHz']:.2f} GHz")
    print_phase_table(res["phases"])
    save_timeline(args.out, args.md, markdown, res, bench="step_timeline", variant="clusterfuse_persistent",
                  dtype=args.dtype)


if __name__ == "__main__":
    main()
