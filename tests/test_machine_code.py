"""The SASS summary of tools.machine_code: parsing nvdisasm listings (CPU only), and
one real kernel end to end where nvcc and nvdisasm exist."""

from __future__ import annotations

import pytest

from clusterfuse.ops import build
from tools import machine_code

# The shape of `nvdisasm -g -c` output: a kernel that calls a subroutine holding a loop.
LISTING = """\
//--------------------- .text.kern --------------------------
.text.kern:
kern:
\t//## File "/src/k.cu", line 10
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/               @P1 STL.128 [R1], R4 ;
\t//## File "/src/k.cu", line 12 inlined at "/src/k.cu", line 11
        /*0020*/                   CALL.REL.NOINC `($kern$sub) ;
        /*0030*/                   EXIT ;
$kern$sub:
\t//## File "/src/inc/loop.cuh", line 5
        /*0040*/                   LDL R2, [R1+0x8] ;
.L_x_7:
        /*0050*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0060*/                   ISETP.GE.AND P0, PT, R2, 0x10, PT ;
\t//## File "/src/inc/loop.cuh", line 7
        /*0070*/              @!P0 BRA `(.L_x_7) ;
        /*0080*/                   BRA `(.L_x_8) ;
.L_x_8:
        /*0090*/                   RET.REL.NODEC R20 `(kern) ;
"""


def test_parse_counts_functions_local_ops_and_loops():
    kern, sub = machine_code.parse_disassembly(LISTING)
    assert (kern.name, kern.instructions, sub.name, sub.instructions) == ("kern", 4, "$kern$sub", 6)
    assert kern.local_ops == [("k.cu:10", "@P1 STL.128 [R1], R4")]
    assert sub.local_ops == [("loop.cuh:5", "LDL R2, [R1+0x8]")]
    assert kern.loops == []
    # Only the backward branch is a loop: .L_x_7 (0x50) .. the branch (0x70), 3 instructions.
    assert [(lp.start, lp.end, lp.instructions, lp.source) for lp in sub.loops] == [(0x50, 0x70, 3, "loop.cuh:7")]


def test_report_lists_local_ops_and_long_loops():
    text = machine_code.report(machine_code.parse_disassembly(LISTING), min_loop=3)
    assert "1 local loads, 0 local stores" in text
    assert "0 local loads, 1 local stores" in text
    assert "3 instructions (branch at loop.cuh:7)" in text
    assert "(branch at" not in machine_code.report(machine_code.parse_disassembly(LISTING), min_loop=4)


needs_sass = pytest.mark.skipif(build.find_nvcc() is None or machine_code.find_nvdisasm() is None,
                                reason="needs nvcc and nvdisasm (pip install nvidia-cuda-nvdisasm)")


@needs_sass
def test_real_kernel_disassembles():
    source = next(s for s in build.all_kernel_sources() if s.startswith("primitives/"))
    ptxas, listing = machine_code.disassemble(source)
    functions = machine_code.parse_disassembly(listing)
    assert "registers" in ptxas
    assert functions and all(f.instructions > 0 for f in functions)
    assert any(f.name.startswith("_Z") for f in functions)  # the kernels' mangled names


@needs_sass
def test_attention_key_loop_code_stays_small():
    """At batch 1 most of the key loop's code runs once per launch, and fetching it is what the
    attention phase waits on (bench/results/instruction_fetch_h200.md). In the default build
    attend_items_mma was 3398 SASS instructions with the q-fragment init unrolled, 2640 rolled. A bound,
    so that growing it again is a measured decision."""
    _, listing = machine_code.disassemble("attention/attention_block.cu")
    sizes = [f.instructions for f in machine_code.parse_disassembly(listing) if "attend_items_mma" in f.name]
    assert sizes and max(sizes) <= 2900, sizes
