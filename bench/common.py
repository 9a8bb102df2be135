"""The benchmark harness every clusterfuse benchmark uses (its rules: bench/README.md).

* Ceilings: `measure_gemv_bandwidth` (cuBLAS ``torch.mv`` over a ~1 GiB matrix: the
  bandwidth every floor divides by) and `measure_copy_bandwidth`.
* Timing: `time_cuda_graph` captures a callable (or a rotation of them) into one CUDA
  graph and times its replays with CUDA events; `time_eager` for what cannot be captured.
  Both return a `Timing` (median, min, max over the repeats, per call).
* L2: the H100 has 50 MB of L2.  A kernel whose inputs fit in it, timed over one buffer,
  measures the cache, not HBM.  **Anything that reads less than ~4× L2 per call must be
  timed over `rotating_copies` of its inputs**, one call per copy, round robin.
* Records: `RecordWriter` appends result records with the `RECORD_FIELDS` to a JSON list
  (the current ones: ``bench/results/<gpu>/<bench>.json``), filling in device, versions,
  command, commit and date.
* Floors: byte counts from `bench.floor`, re-exported here.

Typical use::

    from bench.common import RecordWriter, measure_gemv_bandwidth, time_cuda_graph, ...
    bw = measure_gemv_bandwidth(dev)
    sets = rotating_copies(lambda: make_inputs(dev))
    t = time_cuda_graph([lambda s=s: block(*s) for s in sets])
    nbytes = attention_block_bytes(cfg, batch, seq_len, 2)
    RecordWriter(results_dir() / "attention_block.json").append(
        bench="attention_block", model=cfg.name, batch=batch, seq_len=seq_len, dtype="bf16",
        variant="clusterfuse", timing=t, floor_us=floor_us(nbytes, bw), bandwidth_GBs=bw)
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import torch

from bench.floor import (  # noqa: F401  (re-exported: one import for benchmark scripts)
    ByteCount,
    attention_block_bytes,
    decode_step_bytes,
    ffn_block_bytes,
    floor_us,
    kv_cache_bytes,
    mla_block_bytes,
)
from clusterfuse.ops.options import DEFAULT_KERNEL_OPTIONS, KernelOptions

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parent.parent

#: H100 L2 size; used when the device does not report its own.
DEFAULT_L2_BYTES = 50 * 2**20

#: The fields of a result record (bench/README.md says what each holds).  Records may carry extra keys.
RECORD_FIELDS: tuple[str, ...] = (
    "bench", "device", "model", "batch", "seq_len", "dtype", "cluster_size", "variant",
    "time_us", "time_us_min", "time_us_max", "floor_us", "bandwidth_GBs",
    "command", "git_commit", "torch", "cuda", "date",
)

_DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
}


def dtype_name(dtype: torch.dtype) -> str:
    """Short name used in records: ``fp16``, ``bf16``, ``fp32``."""
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def parse_dtype(name: str) -> torch.dtype:
    """Inverse of `dtype_name` (also accepts ``float16``/``bfloat16``)."""
    for dtype, short in _DTYPE_NAMES.items():
        if name in (short, str(dtype).removeprefix("torch.")):
            return dtype
    raise ValueError(f"dtype: expected one of {', '.join(_DTYPE_NAMES.values())}, got {name!r}")


# ----------------------------------------------------------------------------- timing
@dataclass(frozen=True)
class Timing:
    """Time of one call: median and spread over ``repeats`` timed samples.

    Each sample is one graph replay (or one eager loop) of ``inner`` calls divided by
    ``inner``, so launch gaps between calls are included but the host is not.
    """

    median_us: float
    min_us: float
    max_us: float
    repeats: int
    inner: int

    def record_fields(self) -> dict[str, float]:
        """The record fields ``time_us``, ``time_us_min``, ``time_us_max``."""
        return {"time_us": self.median_us, "time_us_min": self.min_us, "time_us_max": self.max_us}


Work = Callable[[], Any] | Sequence[Callable[[], Any]]


def _as_list(fn: Work) -> list[Callable[[], Any]]:
    fns = [fn] if callable(fn) else list(fn)
    if not fns:
        raise ValueError("fn: expected a callable or a non-empty sequence of callables")
    return fns


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _time_events(run: Callable[[], None], *, warmup: int, repeats: int, inner: int) -> Timing:
    """Time ``run`` (which does ``inner`` calls) with CUDA events, ``repeats`` times after
    ``warmup`` untimed runs.  All samples are queued before one synchronisation so the GPU
    runs them back to back and the host never sits between them."""
    for _ in range(warmup):
        run()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(repeats)]
    for start, end in events:
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    samples = [start.elapsed_time(end) * 1e3 / inner for start, end in events]
    return Timing(statistics.median(samples), min(samples), max(samples), repeats, inner)


def _auto_inner(fns: list[Callable[[], Any]], target_us: float, max_inner: int) -> int:
    """Calls per sample so that one sample lasts about ``target_us`` (amortises the
    ~10 µs cost of launching a graph / timing events on short kernels)."""
    quick = _time_events(lambda: [f() for f in fns], warmup=2, repeats=3, inner=len(fns))
    return max(1, min(max_inner, math.ceil(target_us / max(quick.median_us, 1e-3))))


def capture_graph(fn: Work, inner: int = 1) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``inner`` calls of ``fn`` (round robin over a sequence of callables).

    The calls run once eagerly on a side stream first: lazy initialisation (cuBLAS handles
    and workspaces, autotuning) must not happen inside capture (PyTorch's documented recipe).
    """
    fns = _as_list(fn)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(inner):
            fns[i % len(fns)]()
    return graph


def time_cuda_graph(fn: Work, *, warmup: int = 10, repeats: int = 50, inner: int | None = None,
                    target_us: float = 2000.0, max_inner: int = 200) -> Timing:
    """Median time of one call of ``fn``, captured in a CUDA graph and replayed.

    ``fn`` is a no-argument callable doing GPU work, or a sequence of them (one per
    rotated input set, see `rotating_copies`): the graph then calls them round robin.
    ``inner`` calls go into one graph (rounded up to a multiple of the rotation; by default
    enough for one replay to last ``target_us``); each timed sample is one replay / inner.
    """
    fns = _as_list(fn)
    if inner is None:
        inner = _auto_inner(fns, target_us, max_inner)
    inner = _round_up(inner, len(fns))
    graph = capture_graph(fns, inner)
    return _time_events(graph.replay, warmup=warmup, repeats=repeats, inner=inner)


def time_eager(fn: Work, *, warmup: int = 10, repeats: int = 50, inner: int | None = None,
               target_us: float = 2000.0, max_inner: int = 200) -> Timing:
    """Like `time_cuda_graph`, for work that cannot be captured (host syncs, dynamic shapes):
    the calls are launched from Python, so launch overhead is part of the time."""
    fns = _as_list(fn)
    if inner is None:
        inner = _auto_inner(fns, target_us, max_inner)
    inner = _round_up(inner, len(fns))

    def run() -> None:
        for i in range(inner):
            fns[i % len(fns)]()

    return _time_events(run, warmup=warmup, repeats=repeats, inner=inner)


# ----------------------------------------------------------------------------- L2 rotation
def l2_cache_bytes(device: torch.device | str | int | None = None) -> int:
    """The device's L2 size (50 MB on an H100), or `DEFAULT_L2_BYTES` without a GPU."""
    if not torch.cuda.is_available():
        return DEFAULT_L2_BYTES
    props = torch.cuda.get_device_properties(torch.device("cuda") if device is None else device)
    return int(getattr(props, "L2_cache_size", 0) or DEFAULT_L2_BYTES)


def tensor_bytes(obj: Any) -> int:
    """Total ``nbytes`` of the tensors in a (nested) tuple/list/dict/object attribute tree.
    Tensors sharing storage are counted once."""
    seen: set[int] = set()
    total = 0

    def walk(x: Any) -> None:
        nonlocal total
        if isinstance(x, torch.Tensor):
            key = x.untyped_storage().data_ptr() if x.device.type != "meta" else id(x)
            if key not in seen:
                seen.add(key)
                total += x.untyped_storage().nbytes()
        elif isinstance(x, Mapping):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        elif hasattr(x, "__dict__") and not isinstance(x, type):
            for v in vars(x).values():
                walk(v)

    walk(obj)
    return total


def rotation_count(bytes_per_set: int, l2_bytes: int = DEFAULT_L2_BYTES, factor: float = 4.0,
                   max_sets: int = 4096) -> int:
    """Input sets needed so that together they exceed ``factor × L2`` (1 if one set does)."""
    if bytes_per_set <= 0:
        raise ValueError(f"bytes_per_set: expected a positive byte count, got {bytes_per_set}")
    return max(1, min(max_sets, math.ceil(factor * l2_bytes / bytes_per_set)))


def rotating_copies(make_inputs: Callable[[], T], bytes_per_set: int | None = None, *,
                    device: torch.device | str | int | None = None, factor: float = 4.0) -> list[T]:
    """Enough independent input sets (each from a fresh ``make_inputs()`` call) that
    together they exceed ``factor × L2``, so that timing them round robin reads HBM, not L2.

    ``bytes_per_set`` defaults to the bytes of the tensors in the first set (`tensor_bytes`);
    pass it explicitly when a set shares tensors with others or holds more than a call reads.
    """
    first = make_inputs()
    per_set = bytes_per_set if bytes_per_set is not None else tensor_bytes(first)
    n = rotation_count(per_set, l2_cache_bytes(device), factor)
    return [first] + [make_inputs() for _ in range(n - 1)]


# ----------------------------------------------------------------------------- ceilings
def _device(device: torch.device | str | int | None) -> torch.device:
    dev = torch.device("cuda") if device is None else torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"device: bandwidth is measured on a CUDA device, got {dev}")
    return dev


def measure_gemv_bandwidth(device: torch.device | str | int | None = None, gib: float = 1.0,
                           dtype: torch.dtype = torch.float16, cols: int = 8192) -> float:
    """Read bandwidth in GB/s (10^9 B/s) of cuBLAS ``torch.mv`` over a ``gib`` GiB matrix:
    the ceiling that floors divide by (2.83-2.99 TB/s on the H100s measured so far)."""
    dev = _device(device)
    rows = int(gib * 2**30) // (cols * torch.finfo(dtype).bits // 8)
    a = torch.randn(rows, cols, device=dev, dtype=dtype)  # random, never zeros
    x = torch.randn(cols, device=dev, dtype=dtype)
    y = torch.empty(rows, device=dev, dtype=dtype)
    t = time_cuda_graph(lambda: torch.mv(a, x, out=y), inner=4)
    return (a.nbytes + x.nbytes + y.nbytes) / (t.median_us * 1e-6) / 1e9


def measure_copy_bandwidth(device: torch.device | str | int | None = None, gib: float = 1.0) -> float:
    """Device-to-device copy bandwidth in GB/s counting bytes read plus written (3.02 TB/s on H100).

    Timed eagerly on purpose: captured in a CUDA graph, ``copy_`` becomes a memcpy node that
    runs on a copy engine at ~2.44 TB/s (measured on an H100: ``git show 36a43be:bench/results/copy_methods_h100.txt``),
    while an eager ``cudaMemcpyAsync`` or any SM kernel reaches ~3.0 TB/s."""
    dev = _device(device)
    src = torch.randn(int(gib * 2**30) // 2, device=dev, dtype=torch.float16)
    dst = torch.empty_like(src)
    t = time_eager(lambda: dst.copy_(src), inner=4)
    return 2 * src.nbytes / (t.median_us * 1e-6) / 1e9


# ----------------------------------------------------------------------------- records
def results_dir() -> Path:
    """Where records go: ``$CLUSTERFUSE_RESULTS_DIR`` if set, else ``bench/results``."""
    return Path(os.environ.get("CLUSTERFUSE_RESULTS_DIR") or REPO_ROOT / "bench" / "results")


def git_commit() -> str | None:
    """``$CLUSTERFUSE_GIT_COMMIT`` when set (the GPU machine gets a copy of the working tree whose
    ``.git``, if any, may be stale: the caller names the commit it sent); else ``git rev-parse
    HEAD`` of this checkout (``+dirty`` if it has uncommitted changes); else None."""
    if os.environ.get("CLUSTERFUSE_GIT_COMMIT"):
        return os.environ["CLUSTERFUSE_GIT_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def command_line() -> str:
    """This process's command line, as ``python -m module ...`` when run with ``-m``."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    argv = ["-m", spec.name, *sys.argv[1:]] if spec is not None and spec.name else sys.argv
    return shlex.join([Path(sys.executable).name, *argv])


def environment(device: torch.device | str | int | None = None) -> dict[str, Any]:
    """The automatic record fields: device, command, git_commit, torch, cuda, date."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(torch.device("cuda") if device is None else device)
    else:
        name = "cpu"
    return {
        "device": name,
        "command": command_line(),
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def load_records(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Records from JSON files holding a list of objects, or JSON lines."""
    records: list[dict[str, Any]] = []
    for path in paths:
        text = Path(path).read_text().strip()
        if not text:
            continue
        if text.startswith("["):
            records.extend(json.loads(text))
        else:
            records.extend(json.loads(line) for line in text.splitlines() if line.strip())
    return records


class RecordWriter:
    """Appends result records to a JSON list file (created with its folders if missing).

    Every record gets all of `RECORD_FIELDS` (None where not given); ``device``,
    ``command``, ``git_commit``, ``torch``, ``cuda`` and ``date`` are filled from
    `environment` unless given.  Extra keys are kept as they are.
    """

    def __init__(self, path: str | Path, *, device: torch.device | str | int | None = None,
                 **defaults: Any) -> None:
        self.path = Path(path)
        self._auto = environment(device)
        self.defaults = defaults  # fields shared by every record of this writer, e.g. bench=

    def make(self, record: Mapping[str, Any] | None = None, /, *, timing: Timing | None = None,
             **fields: Any) -> dict[str, Any]:
        """The complete record (not written)."""
        given = {**self.defaults, **(record or {}), **(timing.record_fields() if timing else {}), **fields}
        for key in ("bench", "variant", "time_us"):
            if given.get(key) is None:
                raise ValueError(f"record: missing required field {key!r}")
        out = {k: given.get(k, self._auto.get(k)) for k in RECORD_FIELDS}
        out.update({k: v for k, v in given.items() if k not in out})
        return out

    def append(self, record: Mapping[str, Any] | None = None, /, *, timing: Timing | None = None,
               **fields: Any) -> dict[str, Any]:
        """Build a record (see `make`), add it to the file, and return it."""
        out = self.make(record, timing=timing, **fields)
        records = load_records([self.path]) if self.path.exists() else []
        records.append(out)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(records, indent=1) + "\n")
        os.replace(tmp, self.path)  # a reader never sees a half-written file
        return out


def print_phase_table(phases: Mapping[str, Mapping[str, float]]) -> None:
    """A timeline's phases as a markdown table of their median and max µs (bench.*_timeline)."""
    print("| phase | median (µs) | max (µs) |\n| --- | --- | --- |")
    for name, d in phases.items():
        print(f"| {name} | {d['median_us']:.1f} | {d['max_us']:.1f} |")


def save_timeline(out: Path, md: Path | None, markdown: Callable[[list[dict[str, Any]]], str],
                  result: Mapping[str, Any], **fields: Any) -> None:
    """Append a timeline's record (``time_us``: its span) to ``out`` and, with ``md``, write the
    markdown of every record there (bench.*_timeline)."""
    RecordWriter(out, device=torch.device("cuda")).append(
        time_us=result["span_us"], **fields, **{k: v for k, v in result.items() if k != "span_us"})
    if md:
        md.write_text(markdown(load_records([out])))


# ----------------------------------------------------------------------------- command lines
def int_list(text: str) -> list[int]:
    """``"1,4,16"`` -> ``[1, 4, 16]`` (command-line lists)."""
    return [int(v) for v in text.split(",") if v]


def add_block_bench_args(parser: Any, models: Sequence[str], batches: Sequence[int],
                         clusters: Sequence[int]) -> None:
    """The options shared by the fused-block benchmarks: models, batches, cluster sizes, dtype."""
    parser.add_argument("--models", default=",".join(models))
    parser.add_argument("--batches", default=",".join(map(str, batches)))
    parser.add_argument("--clusters", default=",".join(map(str, clusters)))
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--quick", action="store_true", help="fewer timing repeats")


#: The kernel options a benchmark takes on its command line (`KernelOptions` fields) and records.
OPTION_FIELDS = ("programmatic_launch", "kv_prefetch_keys")
_OPTION_HELP = {
    "programmatic_launch": "programmatic dependent launch: 0 off, 1 successors start as blocks exit, 2 the FFN "
                           "already before the attention kernel's grid barrier, 3 the attention kernel also before "
                           "the FFN's",
    "kv_prefetch_keys": "first keys per block and sequence prefetched into L2",
}
#: The options' defaults, for labels of records (records without a field ran with its default).
#: ``kv_mma`` is for records made before 2026-12-07, when the SIMT key loop (kv_mma=0) still existed.
KNOB_DEFAULTS = {**{k: getattr(DEFAULT_KERNEL_OPTIONS, k) for k in OPTION_FIELDS}, "kv_mma": 1}


def non_default_knobs(record: Mapping[str, Any]) -> list[str]:
    """``["option=value", ...]`` for the options a record ran with other than their defaults (labels)."""
    return [f"{k}={record[k]}" for k, default in KNOB_DEFAULTS.items() if record.get(k, default) != default]


def add_kernel_option_args(parser: Any) -> None:
    """``--programmatic-launch``, ``--kv-prefetch-keys``: the `KernelOptions` a benchmark runs with
    (unset: their defaults)."""
    for field in OPTION_FIELDS:
        parser.add_argument("--" + field.replace("_", "-"), dest=field, type=int, default=None,
                            help=f"{_OPTION_HELP[field]} (KernelOptions.{field})")


def kernel_options(args: Any) -> KernelOptions:
    """The `KernelOptions` of the command line (exit 2 with the option's name when a value is bad)."""
    given = {f: getattr(args, f) for f in OPTION_FIELDS if getattr(args, f, None) is not None}
    try:
        return replace(DEFAULT_KERNEL_OPTIONS, **given)
    except ValueError as err:  # "name: ..." -> "--name: ..."
        print(f"error: --{str(err).replace('_', '-', str(err).index(':'))}", file=sys.stderr)
        raise SystemExit(2) from err


def option_fields(options: KernelOptions) -> dict[str, int]:
    """The record fields of ``options`` (every field of `OPTION_FIELDS`)."""
    return {f: int(getattr(options, f)) for f in OPTION_FIELDS}


def add_report_args(parser: Any, default_out: Path | None) -> None:
    """``--out`` (the JSON records), ``--md`` and ``--png`` (`bench.report` of those records)."""
    parser.add_argument("--out", type=Path, default=default_out, help="JSON records (appended)")
    parser.add_argument("--md", type=Path, help="markdown table from the records (bench.report)")
    parser.add_argument("--png", type=Path, help="plot from the records (bench.report)")


def write_report(out: Path, md: Path | None, png: Path | None) -> None:
    """The markdown table and / or plot of the records in ``out``, where asked for."""
    if md or png:
        from bench import report

        report.main([str(out), *(["--md", str(md)] if md else []), *(["--png", str(png)] if png else [])])


def print_block_summary(summary: Sequence[Mapping[str, Any]], bandwidth: float, device: torch.device,
                        dtype: torch.dtype) -> None:
    """The console table of a fused-block benchmark: one row per configuration with keys model,
    batch, (S), c, ours, torch, floor, glob (µs) and sweep ({cluster size or label: µs}, printed in
    its own order)."""
    with_s = any("S" in row for row in summary)
    print(f"\nGEMV bandwidth {bandwidth:.0f} GB/s; {torch.cuda.get_device_name(device)}; {dtype_name(dtype)}")
    print(f"{'model':14} {'B':>3} " + (f"{'S':>6} " if with_s else "") + f"{'c':>3} {'ours µs':>8} {'torch µs':>9} "
          f"{'floor µs':>9} {'floor/ours':>10} {'vs torch':>8} {'global µs':>9}  sweep (c: µs)")
    for row in summary:
        sweep_txt = " ".join(f"{c}:{t:.1f}" for c, t in row["sweep"].items())
        print(f"{row['model']:14} {row['batch']:>3} " + (f"{row['S']:>6} " if with_s else "")
              + f"{row['c']:>3} {row['ours']:>8.1f} {row['torch']:>9.1f} {row['floor']:>9.1f} "
              f"{row['floor'] / row['ours']:>10.1%} {row['torch'] / row['ours']:>7.2f}x {row['glob']:>9.1f}  "
              + sweep_txt)


def block_timing_kwargs(quick: bool) -> dict[str, int]:
    """`time_cuda_graph`'s warm-up and repeats for a fused-block benchmark (fewer with --quick)."""
    return {"warmup": 5, "repeats": 10} if quick else {"warmup": 10, "repeats": 30}


def run_block_bench(bench: str, models: Sequence[str], batches: Sequence[int], clusters: Sequence[int],
                    dtype: torch.dtype, out: Path, quick: bool, bench_model: Callable[..., list[dict]]) -> list[dict]:
    """The frame of a fused-block benchmark's run: the GEMV bandwidth (the floors' divisor), one
    `RecordWriter` for ``out``, ``bench_model(name, batches, clusters, dtype, bandwidth, writer,
    timing_kwargs)`` per model (its console summary rows), then the summary table."""
    dev = torch.device("cuda")
    bw = measure_gemv_bandwidth(dev)
    writer = RecordWriter(out, device=dev, bench=bench, dtype=dtype_name(dtype), bandwidth_GBs=bw)
    summary = []
    for name in models:
        summary += bench_model(name, batches, clusters, dtype, bw, writer, block_timing_kwargs(quick))
        torch.cuda.empty_cache()
    print_block_summary(summary, bw, dev, dtype)
    return summary


def record_headline(writer: RecordWriter, sweep: Mapping[int, float], time_at: Callable[[int], Timing],
                    **fields: Any) -> tuple[int, Timing]:
    """The headline ``clusterfuse`` record of a cluster-size sweep (``{cluster size: µs}``): the
    fastest size, timed again by ``time_at(size)``; returns the size and that timing."""
    best = min(sweep, key=sweep.__getitem__)
    timing = time_at(best)
    writer.append(variant="clusterfuse", timing=timing, chosen_cluster_size=best, **fields)
    return best, timing


def block_bench_main(argv: Sequence[str] | None, doc: str, bench: str, models: Sequence[str],
                     batches: Sequence[int], clusters: Sequence[int], bench_model: Callable[..., list[dict]]) -> None:
    """The command line of a fused-block benchmark (`add_block_bench_args`, `add_report_args`; records
    by default in ``results_dir() / "<bench>_h100.json"``): `run_block_bench`, then the report where
    asked for."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    add_block_bench_args(parser, models, batches, clusters)
    add_report_args(parser, results_dir() / f"{bench}_h100.json")
    args = parser.parse_args(argv)
    run_block_bench(bench, args.models.split(","), int_list(args.batches), int_list(args.clusters),
                    parse_dtype(args.dtype), args.out, args.quick, bench_model)
    write_report(args.out, args.md, args.png)
