"""CPU checks of bench/step_timeline.py: its phases mirror the kernel's stamps
(kernels/include/clusterfuse/step/timeline.cuh), and its arithmetic on a synthetic timeline."""

from __future__ import annotations

import re

import pytest
import torch

from bench.step_timeline import HEAD, PHASES, block_layers, markdown, summarise
from clusterfuse.ops import build

TIMELINE_H = build.INCLUDE_DIR / "clusterfuse" / "step" / "timeline.cuh"


def test_phases_mirror_the_kernel_stamps():
    text = TIMELINE_H.read_text()
    body = re.search(r"enum LayerStamp : int \{(.*?)\};", text, re.S).group(1)
    body = re.sub(r"//[^\n]*", "", body)
    names = [n.strip() for n in body.split(",") if n.strip()]
    assert names[-1] == "kLayerStamps"
    assert len(names) - 1 == len(PHASES)
    assert int(re.search(r"kTimelineHead = (\d+)", text).group(1)) == HEAD


def _row(start_ns: int, end_ns: int, clock0: int, layer_clocks: list[list[int]]) -> list[int]:
    return [start_ns, end_ns, 7, clock0, *(c for layer in layer_clocks for c in layer)]


def _layer(first: int, step: int, skip: tuple[int, ...] = ()) -> list[int]:
    """Stamps every `step` clocks from `first`; the ones in `skip` left 0 (phases not run)."""
    return [0 if i in skip else first + step * i for i in range(len(PHASES))]


def test_block_layers_converts_clocks_and_skips_phases_not_run():
    n = len(PHASES)
    # Clock 1000 at start, two layers of stamps 10 clocks apart; 2 ns per clock.
    layers = [_layer(1010, 10), _layer(1010 + 10 * n, 10, skip=(0, 1))]
    last = layers[1][-1]
    row = _row(0, 2 * (last - 1000), 1000, layers)
    got, ns_per_clock = block_layers(row, 2)
    assert ns_per_clock == pytest.approx(2.0)
    assert got[0] == pytest.approx([0.02] * n)  # 10 clocks × 2 ns
    # Layer 1's first two phases did not run: the third lasts from layer 0's end.
    assert got[1][:2] == [None, None]
    assert got[1][2] == pytest.approx(0.06)
    assert got[1][3:] == pytest.approx([0.02] * (n - 3))


def test_block_layers_checks_the_row_length():
    with pytest.raises(ValueError, match="expected"):
        block_layers([1, 2, 3, 4, 5], 1)


def test_summarise_and_markdown():
    n = len(PHASES)
    fast = _row(1_000, 1_000 + 2 * 10 * 2 * n, 0, [_layer(10, 10), _layer(10 + 10 * n, 10)])
    slow = _row(3_000, 3_000 + 2 * 30 * 2 * n, 0, [_layer(30, 30), _layer(30 + 30 * n, 30)])
    spare = [0] * len(fast)  # a grid smaller than the buffer: never written
    summary = summarise([torch.tensor([fast, slow, spare])], 2)
    first = summary["phases"][PHASES[0]]
    assert first["median_us"] == pytest.approx((0.02 + 0.06) / 2)
    assert first["max_us"] == pytest.approx(0.06)
    assert first["min_us"] == pytest.approx(0.02)
    assert summary["layer_us"] == pytest.approx((0.02 * n + 0.06 * n) / 2)  # layers after the first
    assert summary["span_us"] == pytest.approx((3_000 + 120 * n - 1_000) / 1e3)
    assert summary["sm_clock_GHz"] == pytest.approx(0.5)
    record = {"model": "llama-3-8b", "batch": 1, "seq_len": 1024, "cluster_size": 8, "device": "H100",
              "git_commit": "abcdef0123", "time_us": summary["span_us"], "plain_step_us": 1.0, **summary}
    md = markdown([record])
    assert "llama-3-8b b1 S1024 c8 H100 (abcdef0)" in md
    assert f"| {PHASES[0]} | 0.0 / 0.0 / 0.1 |" in md
    assert md.count("\n| ") == 2 + len(PHASES) + 4  # header, rule, phases, 4 summary rows
