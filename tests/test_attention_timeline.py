"""CPU checks of bench/attention_timeline.py's arithmetic on a synthetic timeline buffer."""

from __future__ import annotations

import pytest
import torch

from bench.attention_timeline import PHASES, phase_durations, shared_sm_stats


def _row(start_ns: int, sm: int, phase_clocks: list[int]) -> list[int]:
    """One block's slots: globaltimer start/end, SM id, clock64 at each stamp (1 clock = 1 ns)."""
    clk = [1000]
    for c in phase_clocks:
        clk.append(clk[-1] + c)
    return [start_ns, start_ns + clk[-1] - clk[0], sm, *clk]


def test_phase_durations_and_shared_sm_stats():
    n = len(PHASES) - 1
    fast = [1000] * n  # 1 µs per phase
    slow = [2000] * n
    tl = torch.tensor([_row(10_000, 5, slow), _row(10_500, 5, slow), _row(10_000, 7, fast), [0] * (n + 4)])
    per_block, span, skew, _, sms = phase_durations(tl)
    assert len(per_block) == 3 and sms == [5, 5, 7]  # the unwritten row is left out
    assert per_block[2] == pytest.approx([1.0] * n)
    assert skew == pytest.approx(0.5)
    assert span == pytest.approx((10_500 + 2000 * n - 10_000) / 1e3)
    shared, busy_shared, busy_alone = shared_sm_stats(per_block, sms)
    work = PHASES.index("grid barrier") - PHASES.index("norm + checks")  # phases of the block's own work
    assert shared == 2
    assert busy_shared == pytest.approx(2.0 * work) and busy_alone == pytest.approx(1.0 * work)


def test_by_rank_groups_blocks_by_their_cluster_rank():
    from bench.attention_timeline import by_rank

    n = len(PHASES) - 1
    # 2 clusters of 3 blocks, 2 launches; rank r's phase i takes 10 * r + i (+ launch) µs.
    by_block = [[[10 * (b % 3) + i + launch for i in range(n)] for launch in range(2)] for b in range(6)]
    ranks = by_rank(by_block, 3)
    assert set(ranks) == set(PHASES[1:])
    assert ranks["QKV GEMV"] == [10 * r + PHASES.index("QKV GEMV") - 1 + 0.5 for r in range(3)]


def test_markdown_shows_the_medians_by_rank():
    from bench.attention_timeline import RANK_PHASES, markdown

    phases = {ph: {"median_us": 1.0, "max_us": 2.0} for ph in PHASES[1:]}
    base = {"model": "m", "batch": 1, "seq_len": 8, "cluster_size": 2, "phases": phases, "time_us": 9.0,
            "last_block_start_us": 0.1}
    md = markdown([{**base, "by_rank": {ph: [1.25, 3.5] for ph in PHASES[1:]}}, base])
    row = next(line for line in md.splitlines() if line.startswith(f"| {RANK_PHASES[0]} by rank |"))
    assert row == f"| {RANK_PHASES[0]} by rank | 1.2 / 3.5 | – |"


def test_markdown_titles_name_the_extra_defines():
    """Two timelines of one shape under different builds (CLUSTERFUSE_EXTRA_DEFINES) get different
    column titles; the timeline build's own define is left out."""
    from bench.attention_timeline import markdown

    phases = {ph: {"median_us": 1.0, "max_us": 2.0} for ph in PHASES[1:]}
    base = {"model": "m", "batch": 1, "seq_len": 8, "cluster_size": 2, "phases": phases, "time_us": 9.0,
            "last_block_start_us": 0.1, "git_commit": "abcdef0"}
    md = markdown([{**base, "defines": "CF_ATTN_TIMELINE=1"}, {**base, "defines": "CF_X=0,CF_ATTN_TIMELINE=1"}])
    header = next(line for line in md.splitlines() if line.startswith("| phase |"))
    assert header == "| phase | m b1 S8 c2 contiguous (abcdef0) | m b1 S8 c2 contiguous CF_X=0 (abcdef0) |"


def test_back_to_back_measures_the_next_launch_against_the_previous_end():
    """Launch b's first block starts 3 µs before launch a's last block ends (overlap), 1 µs after a's
    last release (its last O-projection end); b's wait ends 0.5 µs after a's end."""
    from bench.attention_timeline import back_to_back, launch_edges

    n = len(PHASES) - 1
    projected = PHASES.index("O-proj GEMV")
    phases = [1000] * n  # 1 µs per phase: a block's stamp s is at start + s µs, its end at start + n µs
    a = torch.tensor([_row(10_000, 1, phases), _row(12_000, 2, phases)])
    edges_a = launch_edges(a)
    assert edges_a["first_start"] == 10_000 and edges_a["last_end"] == 12_000 + n * 1000
    assert edges_a["last_release"] == pytest.approx(12_000 + projected * 1000)
    b_start = edges_a["last_end"] - 3000
    waits = [1000] * (n - 1)  # every phase after the wait
    b = torch.tensor([_row(b_start, 1, [3500, *waits]), _row(b_start + 100, 2, [3400, *waits])])
    edges_b = launch_edges(b)
    assert edges_b["median_waited"] == pytest.approx(b_start + 3500)
    period = edges_b["last_end"] - edges_a["last_end"]
    c = b.clone()
    c[:, :2] += period  # the same launch again, one period later
    res = back_to_back([edges_a, edges_b, launch_edges(c)])
    assert res["start_after_previous_end_us"] == pytest.approx(-3.0)
    assert res["start_after_previous_release_us"] == pytest.approx((b_start - edges_a["last_release"]) / 1e3)
    assert res["wait_done_after_previous_end_us"] == pytest.approx(0.5)
    assert res["period_us"] == pytest.approx(period / 1e3)
    with pytest.raises(ValueError, match="two launches"):
        back_to_back([edges_a])


def test_markdown_shows_back_to_back_rows_only_where_measured():
    from bench.attention_timeline import markdown

    phases = {ph: {"median_us": 1.0, "max_us": 2.0} for ph in PHASES[1:]}
    base = {"model": "m", "batch": 1, "seq_len": 8, "cluster_size": 2, "phases": phases, "time_us": 9.0,
            "last_block_start_us": 0.1}
    assert "back to back" not in markdown([base])
    b2b = {"start_after_previous_end_us": -2.5, "start_after_previous_release_us": 1.0,
           "wait_done_after_previous_end_us": 0.75, "period_us": 66.0}
    md = markdown([{**base, "back_to_back": b2b}, base])
    assert "| back to back: start after previous end | -2.5 | – |" in md
    assert "| back to back: period | 66.0 | – |" in md


@pytest.mark.parametrize("args", [["--back-to-back", "4", "--engine"], ["--back-to-back", "1"]])
def test_back_to_back_arguments_are_checked_before_any_gpu_work(args, capsys):
    from bench.attention_timeline import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert "--back-to-back" in capsys.readouterr().err


def test_run_measures_back_to_back_on_the_timeline_run_s_own_setup(monkeypatch):
    """run(..., back_to_back_launches=N) builds the weights and caches once (setup_blocks is the
    expensive part: rotating copies of a whole block) and measures the N graph launches on them,
    each launch into its own buffer, in launch order. CPU fakes stand in for the GPU: each launch
    writes one block row, starting 8 µs after the previous launch and lasting 10 µs."""
    import bench.attention_timeline as tl

    n = len(PHASES) - 1
    calls = {"setup": 0, "launches": 0}

    class Cfg:
        num_key_value_heads = 1

    def setup_blocks(*_):
        calls["setup"] += 1
        return Cfg(), None, None, None, None, None

    def fake_launch(timeline):
        timeline[0] = torch.tensor(_row(100_000 + 8_000 * calls["launches"], 3, [1000] * n))
        calls["launches"] += 1

    class Graph:
        def __init__(self, fns):
            self.fns = fns

        def replay(self):  # re-runs the captured launches, each into its own buffer
            for f in self.fns:
                f()

    zeros = torch.zeros
    monkeypatch.setattr(tl, "setup_blocks", setup_blocks)
    monkeypatch.setattr(tl, "_ours_fns", lambda *a, **k: [fake_launch, fake_launch])
    monkeypatch.setattr(tl, "_timeline_slots", lambda *a: 3 + len(PHASES))
    monkeypatch.setattr(tl, "capture_graph", lambda fns, inner: Graph(fns[:inner]))
    monkeypatch.setattr(tl.torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(tl.torch, "zeros", lambda *a, device=None, **k: zeros(*a, **k))
    res = tl.run("m", 1, 8, 1, torch.bfloat16, repeats=2, back_to_back_launches=3)
    assert calls["setup"] == 1
    assert res["back_to_back"]["period_us"] == pytest.approx(8.0)
    assert res["back_to_back"]["start_after_previous_end_us"] == pytest.approx(-2.0)
    assert "back_to_back" not in tl.run("m", 1, 8, 1, torch.bfloat16, repeats=1)
