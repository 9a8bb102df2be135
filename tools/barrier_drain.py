"""Does a barrier wait for the global reads a block still has in flight? (tools/probes/barrier_drain.cu)

    python -m tools.barrier_drain [--grids 32x4,8x8] [--launches 10] [--out F.json] [--table F.md]

Every block of a grid the size of the attention block's (clusters x cluster size, 128 threads)
issues `kb` KB of reads of its own HBM region, passes a barrier, then waits for the reads; per
(kind of read, barrier, kb) the record holds the median over blocks, rounds and launches of the
three intervals (µs): issuing, the barrier, waiting for the reads after it. A barrier that waits
for the reads carries their HBM time itself and leaves nothing to wait for after it.
Needs a Hopper GPU.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.common import RecordWriter, load_records

MODES = {"none": 0, "registers": 1, "l2_prefetch": 2, "bulk_to_smem": 3}
BARRIERS = {"cluster_release": 0, "cluster_relaxed": 1, "block": 2, "fence_gpu_block": 3, "st_async_exchange": 4}
#: KB per block for each kind of read (registers: at most 16 loads of 16 B per thread).
SIZES_KB = {"none": (0,), "registers": (16, 32), "l2_prefetch": (32, 128), "bulk_to_smem": (32, 128)}
BUFFER_BYTES = 1 << 30  # several times the L2: every round reads memory no block read before


PROBE_SOURCE = Path(__file__).resolve().parent / "probes" / "barrier_drain.cu"


def build_probe(out_dir: Path) -> Path:
    """The probe's shared library, built into ``out_dir`` with the package's nvcc flags (the probe
    is dev tooling: it lives outside the package's kernel folder and its cache)."""
    from clusterfuse.ops import build

    lib = out_dir / "barrier_drain.so"
    args = [build._require_nvcc(), *build.ARCH_FLAGS, *build.NVCC_FLAGS, "-shared", "-cudart=static",
            f"-I{build.INCLUDE_DIR}", str(PROBE_SOURCE),
            *(str(build.KERNEL_DIR / s) for s in build.COMMON_SOURCES), "-o", str(lib)]
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode:
        raise build.BuildError(f"nvcc failed building the barrier probe:\n{proc.stdout}{proc.stderr}")
    return lib


def _library() -> ctypes.CDLL:
    with tempfile.TemporaryDirectory(prefix="clusterfuse-probe-") as tmp:
        lib = ctypes.CDLL(str(build_probe(Path(tmp))))  # mapped: the file may go
    p, i, s = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
    lib.cf_barrier_drain.argtypes = [p, s, i, i, i, i, i, p, p, p]
    lib.cf_barrier_drain.restype = i
    return lib


def measure(lib: ctypes.CDLL, buf: torch.Tensor, mode: str, barrier: str, kb: int, clusters: int,
            cluster_size: int, launches: int) -> dict[str, float]:
    """Median issue / barrier / consume µs over blocks, rounds and launches (the first launch is a warm-up)."""
    slots, rounds = lib.cf_barrier_drain_slots(), lib.cf_barrier_drain_rounds()
    blocks = clusters * cluster_size
    rec = torch.zeros(blocks * slots, dtype=torch.int64, device=buf.device)
    sink = torch.zeros(1, dtype=torch.int32, device=buf.device)
    stream = torch.cuda.current_stream(buf.device).cuda_stream
    samples: dict[str, list[float]] = {"issue_us": [], "barrier_us": [], "consume_us": []}
    for launch in range(launches + 1):
        rc = lib.cf_barrier_drain(buf.data_ptr(), buf.numel(), MODES[mode], BARRIERS[barrier], kb, clusters,
                                  cluster_size, rec.data_ptr(), sink.data_ptr(), stream)
        if rc:
            raise RuntimeError(f"cf_barrier_drain({mode}, {barrier}, {kb} KB): CUDA error {rc}")
        torch.cuda.synchronize(buf.device)
        if launch == 0:
            continue
        for key, values in intervals_us(rec.view(blocks, slots).cpu().tolist(), rounds).items():
            samples[key].extend(values)
    return {k: statistics.median(v) for k, v in samples.items()}


def intervals_us(rows: Sequence[Sequence[int]], rounds: int) -> dict[str, list[float]]:
    """The kernel's records (one row per block: per round the issue, barrier and consume cycles,
    then clock64 and globaltimer at start and end) as µs, each block at its own clock rate."""
    out: dict[str, list[float]] = {"issue_us": [], "barrier_us": [], "consume_us": []}
    for row in rows:
        c0, c1, g0, g1 = row[3 * rounds: 3 * rounds + 4]
        ns_per_cycle = (g1 - g0) / max(c1 - c0, 1)
        for k in range(rounds):
            for j, key in enumerate(out):
                out[key].append(row[3 * k + j] * ns_per_cycle / 1e3)
    return out


def markdown(records: Sequence[dict[str, Any]]) -> str:
    """One table per grid: rows (read, KB), columns barrier, cells barrier µs / consume µs."""
    out = ["## barrier drain", "",
           "`python -m tools.barrier_drain`: per block, median µs of the barrier / of waiting for the reads "
           "after it (tools/probes/barrier_drain.cu). A barrier that waits for the reads in flight carries "
           "their HBM time and leaves ~0 to wait for after it.", ""]
    grids = sorted({(r["clusters"], r["cluster_size"]) for r in records})
    for clusters, size in grids:
        rows = [r for r in records if (r["clusters"], r["cluster_size"]) == (clusters, size)]
        out += [f"### {clusters} clusters of {size} ({rows[0]['device']}, {rows[0]['git_commit']})", "",
                "| reads | KB per block | " + " | ".join(BARRIERS) + " |",
                "| --- | --- | " + " | ".join("---" for _ in BARRIERS) + " |"]
        for mode, sizes in SIZES_KB.items():
            for kb in sizes:
                cells = []
                for barrier in BARRIERS:
                    hit = [r for r in rows if (r["mode"], r["barrier"], r["kb"]) == (mode, barrier, kb)]
                    cells.append(f"{hit[0]['barrier_us']:.2f} / {hit[0]['consume_us']:.2f}" if hit else "")
                out.append(f"| {mode} | {kb} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grids", default="32x4,8x8", help="clusters x cluster size, comma-separated")
    parser.add_argument("--launches", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("barrier_drain.json"))
    parser.add_argument("--table", type=Path, default=None, help="markdown table of every record in --out")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("tools.barrier_drain needs a CUDA GPU")
    lib = _library()
    buf = torch.empty(BUFFER_BYTES, dtype=torch.uint8, device="cuda").random_(0, 255)
    writer = RecordWriter(args.out, bench="barrier_drain")
    for grid in args.grids.split(","):
        clusters, size = (int(v) for v in grid.split("x"))
        for mode, sizes in SIZES_KB.items():
            for kb in sizes:
                for barrier in BARRIERS:
                    m = measure(lib, buf, mode, barrier, kb, clusters, size, args.launches)
                    writer.append(variant=f"{mode}/{barrier}", time_us=m["barrier_us"], mode=mode, barrier=barrier,
                                  kb=kb, clusters=clusters, cluster_size=size, **m)
                    print(f"{clusters}x{size} {mode:>12} {kb:>3} KB {barrier:>17}: issue {m['issue_us']:6.2f}  "
                          f"barrier {m['barrier_us']:6.2f}  consume {m['consume_us']:6.2f} µs", flush=True)
    if args.table:
        args.table.write_text(markdown(load_records([args.out])) + "\n")


if __name__ == "__main__":
    main()
