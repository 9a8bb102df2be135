"""Pack the local kernel cache for a device call and check that the call's carry fits.

    python tools/pack_kcache.py [--cache .kcache] [--out .kcache.tar.xz] [--carry .weights .whl]
                                  [--keep-primitives] [--leave-out KERNEL ...] [--limit-mib 63.5]

A device call carries the working tree (tracked files and untracked ones git does not ignore)
plus the ignored paths it names, 64 MiB in all (the device README). The attention and FFN
libraries take minutes to build on the device; the 70 primitive libraries (cluster_gather,
cluster_reduce) take ~25 s there in parallel, so they are left out unless asked for. Lock files
are dropped. Prints what the call would carry and exits 1 when that is over the limit (63.5 MiB by
default: a call with 63.8 MiB by this count was refused).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRIMITIVES = ("cluster_gather-", "cluster_reduce-")


def tree_bytes(root: Path = ROOT) -> int:
    """Bytes of the files a device call copies from the working tree: tracked files and untracked
    files that git does not ignore."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         check=True, capture_output=True).stdout
    return sum((root / name).stat().st_size for name in out.decode().split("\0") if name and (root / name).is_file())


def path_bytes(paths: Iterable[Path]) -> int:
    """Bytes of the files under `paths` (files or folders; missing ones count 0)."""
    total = 0
    for p in paths:
        if p.is_file():
            total += p.stat().st_size
        elif p.is_dir():
            total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return total


def libraries(cache: Path, keep_primitives: bool, leave_out: Iterable[str] = ()) -> list[str]:
    """The cache's libraries to pack with their digest files (a library without its digest is rebuilt
    where it is loaded), as paths relative to the cache's parent; `leave_out` names kernels (e.g.
    ``mla_block``) whose libraries stay behind, for the device's build stage to make."""
    dropped = tuple(f"{name}-" for name in leave_out) + (() if keep_primitives else PRIMITIVES)
    files = [*cache.glob("*.so"), *cache.glob("*.so.sha256")]
    return sorted(f"{cache.name}/{f.name}" for f in files if not f.name.startswith(dropped))


def pack(cache: Path, out: Path, keep_primitives: bool, leave_out: Iterable[str] = ()) -> int:
    """Writes `out` (tar, xz -9) with the selected libraries and their digests; returns how many libraries."""
    for lock in cache.glob("*.lock"):
        lock.unlink()
    names = libraries(cache, keep_primitives, leave_out)
    if not names:
        raise SystemExit(f"{cache}: no kernel libraries to pack")
    with out.open("wb") as f:
        # Owned by root in the archive: root (the device call's user) unpacks files it owns, which the
        # kernel cache requires (clusterfuse.ops.build refuses a library owned by another user).
        tar = subprocess.Popen(["tar", "cf", "-", "--owner=0", "--group=0", "--numeric-owner", *names],
                               cwd=cache.parent, stdout=subprocess.PIPE)
        subprocess.run(["xz", "-9", "-T2"], stdin=tar.stdout, stdout=f, check=True)
        if tar.wait():
            raise SystemExit("tar failed")
    return sum(name.endswith(".so") for name in names)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=ROOT / ".kcache")
    parser.add_argument("--out", type=Path, default=ROOT / ".kcache.tar.xz")
    parser.add_argument("--carry", type=Path, nargs="*", default=[ROOT / ".weights", ROOT / ".whl"],
                        help="the other ignored paths the call carries")
    parser.add_argument("--keep-primitives", action="store_true", help="pack the primitive libraries too")
    parser.add_argument("--leave-out", nargs="*", default=[], metavar="KERNEL",
                        help="kernels whose libraries are not packed (e.g. mla_block moe_block): the device's "
                             "build stage makes them, 16 at a time")
    parser.add_argument("--limit-mib", type=float, default=63.5)
    args = parser.parse_args(argv)
    n = pack(args.cache.resolve(), args.out.resolve(), args.keep_primitives, args.leave_out)
    mib = 1 << 20
    tree, archive, other = tree_bytes(), args.out.stat().st_size, path_bytes(args.carry)
    total = tree + archive + other
    print(f"{n} libraries -> {args.out.name} {archive / mib:.1f} MiB; tree {tree / mib:.1f} MiB, "
          f"{' '.join(p.name for p in args.carry)} {other / mib:.1f} MiB; carry {total / mib:.1f} MiB "
          f"(limit {args.limit_mib} MiB)")
    if total > args.limit_mib * mib:
        print("over the limit: leave libraries out of the cache (or carry less)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
