"""Where a kernel's warp-stall samples fall, per source line: ncu's per-instruction export joined
with the source lines nvdisasm gives for the same build.

    ncu --section SourceCounters -o rep ...            (on the GPU machine)
    ncu --import rep.ncu-rep --page source --csv --print-source sass > rep.csv
    python -m tools.ncu_source rep.csv attention/attention_block.cu -D CF_ATTN_GQA=4 [--top 30]

ncu's export has no source lines unless the report imported the sources; nvdisasm of a cubin
built here from the same source and defines (`tools.machine_code`, the library's nvcc
flags) has them. Instructions are matched function by function on their opcodes, so a build
that differs is reported, not silently misattributed. Per function and per source line it prints
the instructions that ran at least once ("executed": the code the warps had to fetch), the stall
samples, and how many of those waited on instruction fetch (``stall_no_inst``); per function also
its main stall reasons (ncu's ``stall_*`` columns, e.g. ``long_sb``: waiting on a global load,
``wait``: a fixed-latency dependency). Needs nvcc and nvdisasm, no GPU.
"""

from __future__ import annotations

import argparse
import csv
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tools.machine_code import _define, demangle, disassemble, parse_disassembly

SAMPLES, NO_INST, EXECUTED = "Warp Stall Sampling (All Samples)", "stall_no_inst", "Instructions Executed"


@dataclass
class Counts:
    executed: int = 0  # instructions that ran at least once
    samples: int = 0
    no_inst: int = 0
    reasons: Counter = field(default_factory=Counter)  # samples per stall reason (ncu's stall_* columns)

    def add(self, row: dict[str, str]) -> None:
        self.executed += int(row.get(EXECUTED) or 0) > 0
        self.samples += int(row.get(SAMPLES) or 0)
        self.no_inst += int(row.get(NO_INST) or 0)
        for name, value in row.items():
            if name.startswith("stall_") and not name.endswith("(Not Issued)") and value:
                self.reasons[name.removeprefix("stall_")] += int(float(value))

    def main_reasons(self, n: int = 3) -> str:
        """``long_sb 45%, wait 23%, selected 14%``: the ``n`` reasons with the most samples."""
        total = sum(self.reasons.values()) or 1
        return ", ".join(f"{r} {100 * v / total:.0f}%" for r, v in self.reasons.most_common(n))


def listing_functions(listing: str) -> dict[str, list[tuple[str, str]]]:
    """``nvdisasm -g -c`` output → {function: [(opcode, file:line), ...]} in address order."""
    return {f.name: [(opcode(text), source) for text, source in f.code] for f in parse_disassembly(listing)}


def opcode(sass: str) -> str:
    """``@!P0 LDG.E.128 R4, [R2.64]`` → ``LDG``."""
    words = sass.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0].split(".")[0] if words else ""


def read_export(path: Path) -> list[dict[str, str]]:
    """Rows of ``ncu --page source --csv --print-source sass`` (a kernel-name line, a header, rows)."""
    with open(path, newline="") as f:
        lines = list(csv.reader(f))
    header = next(i for i, row in enumerate(lines) if row and row[0] == "Address")
    names = lines[header]
    return [dict(zip(names, row, strict=False)) for row in lines[header + 1:] if row]


def align(rows: Sequence[dict[str, str]], functions: dict[str, list[tuple[str, str]]],
          probe: int = 24) -> dict[str, int]:
    """Where each function's instructions start in the export (matched on its first ``probe``
    opcodes); functions not found are left out."""
    ops = [opcode(r.get("Source", "")) for r in rows]
    starts: dict[str, int] = {}
    for name, ins in functions.items():
        want = [op for op, _ in ins]
        head = want[:probe]
        for i in range(len(ops) - len(want) + 1):
            if ops[i:i + len(head)] == head and ops[i:i + len(want)] == want:
                if i not in starts.values():  # identical code of two kernels: count it once
                    starts[name] = i
                break
    return starts


def attribute(rows: Sequence[dict[str, str]], functions: dict[str, list[tuple[str, str]]]):
    """({function: Counts}, {(function, file:line): Counts}) over the functions found in the export."""
    per_function: dict[str, Counts] = defaultdict(Counts)
    per_line: dict[tuple[str, str], Counts] = defaultdict(Counts)
    for name, start in align(rows, functions).items():
        for (_, source), row in zip(functions[name], rows[start:start + len(functions[name])], strict=False):
            per_function[name].add(row)
            per_line[(name, source)].add(row)
    return per_function, per_line


def report(per_function: dict[str, Counts], per_line: dict[tuple[str, str], Counts], top: int) -> str:
    names = list(per_function)
    short = dict(zip(names, (n.split(" / ")[-1][:90] for n in demangle(names)), strict=True))
    total = sum(c.samples for c in per_function.values()) or 1
    out = ["| function | executed instructions | stall samples | of them instruction fetch | main stall reasons |",
           "| --- | --- | --- | --- | --- |"]
    for name, c in sorted(per_function.items(), key=lambda kv: -kv[1].samples):
        if not c.samples and not c.executed:
            continue  # matched but never ran (runtime helpers)
        out.append(f"| {short[name]} | {c.executed} | {c.samples} ({100 * c.samples / total:.0f}%) | {c.no_inst} | "
                   f"{c.main_reasons()} |")
    out += ["", "| function | source line | executed instructions | stall samples | instruction fetch |",
            "| --- | --- | --- | --- | --- |"]
    for (name, source), c in sorted(per_line.items(), key=lambda kv: -kv[1].executed)[:top]:
        out.append(f"| {short[name][:40]} | {source} | {c.executed} | {c.samples} | {c.no_inst} |")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("export", type=Path, help="ncu --page source --csv --print-source sass output")
    parser.add_argument("source", help="kernel source, relative to clusterfuse/kernels")
    parser.add_argument("-D", dest="defines", action="append", default=[], metavar="NAME[=VALUE]")
    parser.add_argument("--top", type=int, default=30, help="source lines shown (most executed instructions first)")
    args = parser.parse_args(argv)
    rows = read_export(args.export)
    _, listing = disassemble(args.source, dict(_define(d) for d in args.defines))
    per_function, per_line = attribute(rows, listing_functions(listing))
    if not per_function:
        raise SystemExit("no function of the build matched the export: not the same source, defines or nvcc")
    print(report(per_function, per_line, args.top))


if __name__ == "__main__":
    main()
