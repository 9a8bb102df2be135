"""What nvcc made of a kernel source, without a GPU: per function, the SASS instruction count,
the local-memory loads and stores (register spills, arguments passed through the stack,
dynamically indexed arrays) with the source line of each, and the loop bodies.

    python -m tools.machine_code attention/attention_block.cu -D CF_ATTN_GQA=4 -D CF_ATTN_NT=2

ptxas -v only gives totals. b212eb2 found the batch-1 attention kernel's local loads by reading
where they sat: 40 bytes of attend_items_mma's 16 arguments went through the stack. Needs nvcc
and nvdisasm. nvdisasm is found on PATH, next to nvcc, or in the ``nvidia-cuda-nvdisasm`` wheel
(``pip install nvidia-cuda-nvdisasm``).
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from clusterfuse.ops import build

_LINE_INFO = re.compile(r'//## File "([^"]+)", line (\d+)')
_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")
_LABEL = re.compile(r"^([$\w.]+):\s*$")
_LOCAL = re.compile(r"\b(LDL|STL)\b")


@dataclass
class Loop:
    """A backward branch: the body runs from the target's address to the branch's."""

    start: int
    end: int
    source: str  # file:line of the branch

    @property
    def instructions(self) -> int:
        return (self.end - self.start) // 16 + 1  # sm_90 instructions are 16 bytes


@dataclass
class FunctionCode:
    name: str
    instructions: int = 0
    local_ops: list[tuple[str, str]] = field(default_factory=list)  # (file:line, instruction)
    loops: list[Loop] = field(default_factory=list)
    code: list[tuple[str, str]] = field(default_factory=list)  # every (instruction, file:line), in order


def parse_disassembly(text: str) -> list[FunctionCode]:
    """The functions of ``nvdisasm -g -c`` output (kernels, subroutines, runtime helpers)."""
    functions: list[FunctionCode] = []
    labels: dict[str, int] = {}  # branch label -> address of the instruction after it
    pending_labels: list[str] = []
    branches: list[tuple[FunctionCode, int, str, str]] = []  # (function, address, target, source)
    source = "?"
    current: FunctionCode | None = None
    for line in text.splitlines():
        info = _LINE_INFO.search(line)
        if info:
            source = f"{Path(info.group(1)).name}:{info.group(2)}"
            continue
        label = _LABEL.match(line.strip())
        if label:
            name = label.group(1)
            if name.startswith(".L_"):
                pending_labels.append(name)
            elif not name.startswith(".text."):
                current = FunctionCode(name)
                functions.append(current)
            continue
        instruction = _INSTRUCTION.search(line)
        if not instruction or current is None:
            continue
        address, text_ = int(instruction.group(1), 16), instruction.group(2)
        for name in pending_labels:
            labels[name] = address
        pending_labels.clear()
        current.instructions += 1
        current.code.append((text_, source))
        if _LOCAL.search(text_):
            current.local_ops.append((source, " ".join(text_.split())))
        branch = _BRANCH.search(text_)
        if branch:
            branches.append((current, address, branch.group(1), source))
    for function, address, target, src in branches:
        start = labels.get(target)
        if start is not None and start <= address:
            function.loops.append(Loop(start, address, src))
    return functions


def demangle(names: Sequence[str]) -> list[str]:
    """C++ names of mangled symbols (each ``$``-separated part demangled; as given if no c++filt)."""
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool is None:
        return list(names)
    parts = [name.split("$") for name in names]
    flat = [p for ps in parts for p in ps]
    out = subprocess.run([tool], input="\n".join(flat), capture_output=True, text=True, check=True).stdout.splitlines()
    if len(out) != len(flat):
        return list(names)
    result, i = [], 0
    for ps in parts:
        result.append(" / ".join(o for o in out[i:i + len(ps)] if o))
        i += len(ps)
    return result


def find_nvdisasm() -> str | None:
    """nvdisasm on PATH, next to nvcc, or in the nvidia-cuda-nvdisasm wheel; None if absent."""
    found = shutil.which("nvdisasm")
    if found:
        return found
    nvcc = build.find_nvcc()
    if nvcc and (Path(nvcc).parent / "nvdisasm").is_file():
        return str(Path(nvcc).parent / "nvdisasm")
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        for candidate in sorted(Path(root).glob("*/bin/nvdisasm")):
            return str(candidate)
    return None


def disassemble(source: str, defines: dict[str, build.Define] | None = None) -> tuple[str, str]:
    """(ptxas -v report, nvdisasm listing with line info) of one kernel source; raises
    `build.BuildError` when nvcc fails and `RuntimeError` when nvdisasm is missing."""
    nvdisasm = find_nvdisasm()
    if nvdisasm is None:
        raise RuntimeError("nvdisasm not found: put it on PATH or `pip install nvidia-cuda-nvdisasm`")
    with tempfile.TemporaryDirectory(prefix="clusterfuse-sass-") as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        ptxas = build.compile_one(source, cubin, defines, ["-cubin", "-Xptxas", "-v"])
        listing = subprocess.run([nvdisasm, "-g", "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
    return ptxas, listing


def report(functions: Sequence[FunctionCode], min_loop: int = 32, max_local: int = 40) -> str:
    """Readable summary: one block per function, loops of at least ``min_loop`` instructions."""
    lines = []
    for function, name in zip(functions, demangle([f.name for f in functions]), strict=True):
        loads = sum("LDL" in op for _, op in function.local_ops)
        stores = len(function.local_ops) - loads
        lines.append(f"{name}\n  {function.instructions} instructions, {loads} local loads, {stores} local stores")
        for src, op in function.local_ops[:max_local]:
            lines.append(f"    {src:<28} {op}")
        if len(function.local_ops) > max_local:
            lines.append(f"    ... {len(function.local_ops) - max_local} more")
        for loop in sorted(function.loops, key=lambda lp: lp.start):
            if loop.instructions >= min_loop:
                lines.append(f"  loop {loop.start:#x}..{loop.end:#x}: {loop.instructions} instructions "
                             f"(branch at {loop.source})")
    return "\n".join(lines)


def _define(text: str) -> tuple[str, build.Define]:
    name, _, value = text.partition("=")
    return name, (int(value) if value.lstrip("-").isdigit() else value) if value else 1


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", help="relative to clusterfuse/kernels, e.g. attention/attention_block.cu")
    parser.add_argument("-D", dest="defines", action="append", default=[], metavar="NAME[=VALUE]")
    parser.add_argument("--min-loop", type=int, default=32, help="hide loops shorter than this (instructions)")
    args = parser.parse_args(argv)
    ptxas, listing = disassemble(args.source, dict(_define(d) for d in args.defines))
    print("\n".join(line for line in ptxas.splitlines() if "Used" in line or "spill" in line))
    print(report(parse_disassembly(listing), min_loop=args.min_loop))


if __name__ == "__main__":
    main()
