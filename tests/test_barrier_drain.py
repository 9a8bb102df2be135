"""tools/barrier_drain.py: the record arithmetic and table on CPU; the probe kernel on a GPU."""

from __future__ import annotations

import math

import pytest
import torch

from tools.barrier_drain import BARRIERS, SIZES_KB, _library, intervals_us, markdown, measure


def test_intervals_use_each_blocks_clock_rate():
    rounds = 2
    # Block 0 at 2 cycles per ns, block 1 at 1: the same cycle counts are half the time in block 0.
    rows = [[200, 400, 600, 4000, 0, 4000, 0, 4000, 0, 2000],
            [200, 400, 600, 4000, 0, 4000, 0, 4000, 0, 4000]]
    out = intervals_us(rows, rounds)
    assert out["issue_us"] == pytest.approx([0.1, 2.0, 0.2, 4.0])
    assert out["barrier_us"] == pytest.approx([0.2, 0.0, 0.4, 0.0])
    assert out["consume_us"] == pytest.approx([0.3, 2.0, 0.6, 4.0])


def test_markdown_has_a_row_per_read_and_size_and_a_column_per_barrier():
    recs = [dict(mode=m, barrier=b, kb=kb, clusters=32, cluster_size=4, device="H100", git_commit="abc",
                 barrier_us=1.25, consume_us=0.5) for m, sizes in SIZES_KB.items() for kb in sizes for b in BARRIERS]
    table = markdown(recs)
    assert "### 32 clusters of 4 (H100, abc)" in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and "KB" not in line and "---" not in line]
    assert len(rows) == sum(len(s) for s in SIZES_KB.values())
    assert all(line.count("1.25 / 0.50") == len(BARRIERS) for line in rows)


@pytest.mark.gpu
@pytest.mark.parametrize("mode,kb", [("none", 0), ("registers", 32), ("l2_prefetch", 32), ("bulk_to_smem", 32)])
def test_probe_runs_every_barrier(mode, kb):
    lib = _library()
    buf = torch.zeros(64 << 20, dtype=torch.uint8, device="cuda")
    for barrier in BARRIERS:
        m = measure(lib, buf, mode, barrier, kb, clusters=8, cluster_size=4, launches=2)
        assert all(math.isfinite(v) and 0 <= v < 1000 for v in m.values()), (barrier, m)
