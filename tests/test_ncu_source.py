"""tools.ncu_source: ncu's per-instruction export joined with nvdisasm's source lines (CPU only)."""

from __future__ import annotations

import csv

import pytest
import torch

from tools import ncu_source, ncu_targets

# nvdisasm -g -c shape: a kernel and the subroutine it calls.
LISTING = """\
.text.k:
k:
\t//## File "/src/k.cu", line 3
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/               @P0 LDG.E.128 R4, [R2.64] ;
\t//## File "/src/k.cu", line 4
        /*0020*/                   CALL.REL.NOINC `($k$f) ;
        /*0030*/                   EXIT ;
$k$f:
\t//## File "/src/f.cuh", line 9
        /*0040*/                   HMMA.16816.F32.BF16 R8, R4, R6, R8 ;
        /*0050*/                   HMMA.16816.F32.BF16 R12, R4, R6, R12 ;
        /*0060*/                   RET.REL.NODEC R20 `(k) ;
$k$unused:
        /*0070*/                   IMAD R0, R1, R2, R3 ;
        /*0080*/                   RET.REL.NODEC R20 `(k) ;
"""

# ncu --page source --csv --print-source sass: absolute addresses, the functions one after the other.
HEADER = ["Address", "Source", ncu_source.SAMPLES, ncu_source.EXECUTED, ncu_source.NO_INST, "stall_long_sb",
          "stall_long_sb (Not Issued)"]
ROWS = [
    ["0x7f00", "LDC R1, c[0x0][0x28]", "3", "128", "2", "1", "1"],
    ["0x7f10", "@P0 LDG.E.128 R4, [R2.64]", "10", "128", "0", "10", "9"],
    ["0x7f20", "CALL.REL.NOINC 0x7f40", "1", "128", "1", "0", "0"],
    ["0x7f30", "EXIT", "0", "128", "0", "0", "0"],
    ["0x7f40", "HMMA.16816.F32.BF16 R8, R4, R6, R8", "7", "128", "5", "2", "2"],
    ["0x7f50", "HMMA.16816.F32.BF16 R12, R4, R6, R12", "0", "0", "0", "0", "0"],
    ["0x7f60", "RET.REL.NODEC R20 0x7f00", "2", "128", "0", "2", "0"],
]


def write_export(path):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Kernel Name", "void k()"])
        w.writerow(HEADER)
        w.writerows(ROWS)


def test_attribute_per_function_and_line(tmp_path):
    write_export(tmp_path / "rep.csv")
    rows = ncu_source.read_export(tmp_path / "rep.csv")
    functions = ncu_source.listing_functions(LISTING)
    assert list(functions) == ["k", "$k$f", "$k$unused"]
    assert functions["k"][1] == ("LDG", "k.cu:3")
    per_function, per_line = ncu_source.attribute(rows, functions)
    assert set(per_function) == {"k", "$k$f"}  # $k$unused's code is not in the export
    k, f = per_function["k"], per_function["$k$f"]
    assert (k.executed, k.samples, k.no_inst) == (4, 14, 3)
    assert (f.executed, f.samples, f.no_inst) == (2, 9, 5)  # the second HMMA never ran
    assert k.reasons == {"no_inst": 3, "long_sb": 11}  # the "(Not Issued)" columns are not counted twice
    assert k.main_reasons() == "long_sb 79%, no_inst 21%"
    line = per_line[("k", "k.cu:3")]
    assert (line.executed, line.samples, line.no_inst) == (2, 13, 2)
    text = ncu_source.report(per_function, per_line, top=5)
    assert "| k.cu:3 | 2 | 13 | 2 |" in text


def test_identical_code_is_counted_once():
    twin = LISTING.replace("$k$unused:", """$k$f2:
        /*0070*/                   HMMA.16816.F32.BF16 R8, R4, R6, R8 ;
        /*0080*/                   HMMA.16816.F32.BF16 R12, R4, R6, R12 ;
        /*0090*/                   RET.REL.NODEC R20 `(k) ;
$k$unused:""")
    functions = ncu_source.listing_functions(twin)
    assert "$k$f2" in functions
    starts = ncu_source.align([dict(zip(HEADER, r, strict=True)) for r in ROWS], functions)
    assert starts == {"k": 0, "$k$f": 4}  # $k$f2 has $k$f's code: not attributed a second time


def test_opcode_drops_predicate_and_modifiers():
    assert ncu_source.opcode("@!P0 LDG.E.128 R4, [R2.64]") == "LDG"
    assert ncu_source.opcode("EXIT") == "EXIT"
    assert ncu_source.opcode("") == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_ncu_targets_says_it_needs_a_gpu():
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        ncu_targets.main(["ffn", "--cluster", "8"])
