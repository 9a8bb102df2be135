"""Sliding-window attention block against the same block without a window reading as many rows.

    python -m bench.window_tiles [--model mistral-7b] [--batches 1,16] [--window 4096]
        [--seq-len 16384] [--page-size 16] [--clusters 4,8] [--dtype bf16] [--out FILE] [--quick]

The window build's key ranges start on the 16-key tile of the window's first row (issue 40,
`at::window_key_range`), so that a paged cache's tiles load whole, as without a window (ranges
that started at the window's first row made every tile straddle two pages and load row by row).
One run, paged caches (pages of ``--page-size`` rows, each sequence's in order), per batch:

* ``clusterfuse_window``: the window build over ``--seq-len`` cached rows per sequence, attending
  the last ``window - 1`` of them and the new token;
* ``clusterfuse``: the build without a window over ``window - 1`` cached rows: the same number of
  rows read, from row 0 (the floor of both: weights + those rows).

Each at the fastest of ``--clusters`` (DSM exchange), with rotated inputs. The two should be within
the noise of each other.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from bench import common
from bench.attention_block import _ours_fns, setup_blocks
from clusterfuse.engine.paged_cache import pages_for
from clusterfuse.models.presets import preset


def _fastest(model: str, batch: int, cached: int, capacity: int, window: int | None, page_size: int,
             clusters: Sequence[int], dtype: torch.dtype, tk: dict[str, int]) -> tuple[int, object, int]:
    """(cluster size, timing, rotation) of the fastest cluster size for one variant."""
    _, pos, cache_lens, rope, blocks, x = setup_blocks(model, batch, cached, dtype, capacity=capacity)
    best = None
    for c in clusters:
        try:
            fns = _ours_fns(blocks, x, rope, pos, cache_lens, c, "dsm", page_size, window=window)
            t = common.time_cuda_graph(fns, **tk)
        except (ValueError, RuntimeError) as err:  # e.g. no cluster of 16 can be resident
            print(f"{model} b={batch} rows={cached} window={window} c={c}: skipped ({err})")
            continue
        if best is None or t.median_us < best[1].median_us:
            best = (c, t)
    rotation = len(blocks)
    del blocks
    torch.cuda.empty_cache()
    if best is None:
        raise RuntimeError(f"{model} b={batch}: no cluster size of {list(clusters)} ran")
    return best[0], best[1], rotation


def run(model: str, batches: Sequence[int], window: int, seq_len: int, page_size: int, clusters: Sequence[int],
        dtype: torch.dtype, out: Path, quick: bool = False) -> list[dict]:
    if not 1 < window <= seq_len:
        raise ValueError(f"window: expected 2 .. --seq-len ({seq_len}), got {window}")
    if page_size < 16:
        raise ValueError(f"page_size: expected at least 16 rows, got {page_size}")
    dev = torch.device("cuda")
    bw = common.measure_gemv_bandwidth(dev)
    writer = common.RecordWriter(out, device=dev, bench="window_tiles", dtype=common.dtype_name(dtype),
                                 bandwidth_GBs=bw)
    tk = {"warmup": 5, "repeats": 10} if quick else {"warmup": 10, "repeats": 30}
    cfg = preset(model)
    summary = []
    for batch in batches:
        floor = common.floor_us(common.attention_block_bytes(cfg, batch, window - 1, torch.finfo(dtype).bits // 8), bw)
        row = dict(batch=batch, floor=floor)
        for variant, cached, w in (("clusterfuse_window", seq_len, window), ("clusterfuse", window - 1, None)):
            capacity = pages_for(cached + 1, page_size) * page_size  # room for the new token, whole pages
            c, t, rotation = _fastest(model, batch, cached, capacity, w, page_size, clusters, dtype, tk)
            writer.append(variant=variant, model=model, batch=batch, seq_len=cached, cluster_size=c, timing=t,
                          floor_us=floor, rotation=rotation, window=w, page_size=page_size)
            row[variant] = t.median_us
        summary.append(row)
    print(f"{model} {common.dtype_name(dtype)}, pages of {page_size} rows: window {window} over {seq_len} cached rows "
          f"vs no window over {window - 1} ({torch.cuda.get_device_name(dev)}, GEMV {bw:.0f} GB/s)")
    print(f"{'batch':>5} {'window µs':>10} {'no window µs':>13} {'ratio':>6} {'floor µs':>9}")
    for r in summary:
        print(f"{r['batch']:>5} {r['clusterfuse_window']:>10.1f} {r['clusterfuse']:>13.1f} "
              f"{r['clusterfuse_window'] / r['clusterfuse']:>6.3f} {r['floor']:>9.1f}")
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="mistral-7b", help="a Llama-family preset (its attention shapes)")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=16384, help="cached rows of the window variant")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--clusters", default="4,8")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--out", type=Path, default=common.results_dir() / "window_tiles.json",
                        help="JSON records (appended)")
    args = parser.parse_args(argv)
    run(args.model, common.int_list(args.batches), args.window, args.seq_len, args.page_size,
        common.int_list(args.clusters), common.parse_dtype(args.dtype), args.out, args.quick)


if __name__ == "__main__":
    main()
