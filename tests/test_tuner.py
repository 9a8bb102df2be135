"""The launch tuner's bookkeeping without a GPU: candidates, the choice, the JSON cache.

Timing needs CUDA, so `_median_us` is replaced by a table of made-up times; what is under test is
which candidates are timed, that the fastest wins, and that (cluster size, exchange) pairs come
back from the file as the tuples they went in as.
"""

from __future__ import annotations

import json

import pytest
import torch

from clusterfuse.ops import tuner as tuner_mod
from clusterfuse.ops.tuner import Tuner, launch_candidates


def test_launch_candidates_fix_the_given_axes():
    assert launch_candidates(None, None, (1, 4), ("dsm", "global")) == [
        (1, "dsm"), (4, "dsm"), (1, "global"), (4, "global")]
    assert launch_candidates(4, None, (1, 4), ("dsm", "global")) == [(4, "dsm"), (4, "global")]
    assert launch_candidates(None, "global", (1, 4), ("dsm", "global")) == [(1, "global"), (4, "global")]
    assert launch_candidates(8, "dsm", (1, 4), ("dsm", "global")) == [(8, "dsm")]


@pytest.fixture
def fake_timing(monkeypatch):
    """Times by candidate (µs); the runner is the candidate itself."""
    times = {(4, "dsm"): 70.5, (4, "global"): 70.9, (16, "dsm"): 56.1, (16, "global"): 53.7, (8, "dsm"): 1e9}
    monkeypatch.setattr(tuner_mod, "_median_us", lambda fn, *_: times[fn()])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    return times


def test_choose_keeps_the_fastest_pair_and_caches_it(tmp_path, fake_timing):
    path = tmp_path / "tuner.json"
    timed = []

    def make_runner(c):
        timed.append(c)
        return lambda: c

    t = Tuner(path)
    cands = launch_candidates(None, None, (4, 16), ("dsm", "global"))
    assert t.choose("attention_block", "k1", cands, make_runner, default=(4, "dsm")) == (16, "global")
    assert timed == cands
    timed.clear()
    assert t.choose("attention_block", "k1", cands, make_runner, default=(4, "dsm")) == (16, "global")
    assert timed == []  # the same tuner remembers its choice
    entry = json.loads(path.read_text())["k1"]
    assert entry["times_us"] == {"4/dsm": 70.5, "16/dsm": 56.1, "4/global": 70.9, "16/global": 53.7}
    # A second process reads the choice back as a tuple and times nothing.
    timed.clear()
    again = Tuner(path).choose("attention_block", "k1", cands, make_runner, default=(4, "dsm"))
    assert again == (16, "global") and timed == []


def test_cached_choice_no_longer_offered_is_timed_again(tmp_path, fake_timing):
    """A choice cached when the op offered more candidates (e.g. an exchange path since taken out
    of tuning) is not returned: the current candidates are timed."""
    path = tmp_path / "tuner.json"
    t = Tuner(path)
    wide = launch_candidates(None, None, (4, 16), ("dsm", "global"))
    assert t.choose("attention_block", "k5", wide, lambda c: (lambda: c), default=(4, "dsm")) == (16, "global")
    narrow = launch_candidates(None, None, (4, 16), ("dsm",))
    assert Tuner(path).choose("attention_block", "k5", narrow, lambda c: (lambda: c), default=(4, "dsm")) == (16, "dsm")
    assert Tuner(path).cached("k5") == (16, "dsm")


def test_skipped_candidates_and_no_candidate_left(tmp_path, fake_timing):
    def make_runner(c):
        if c[0] == 16:
            raise ValueError("no cluster of 16 can be resident")
        return None if c[1] == "global" else (lambda: c)

    t = Tuner(tmp_path / "tuner.json")
    cands = launch_candidates(None, None, (4, 16), ("dsm", "global"))
    assert t.choose("ffn_block", "k2", cands, make_runner, default=(8, "dsm")) == (4, "dsm")
    assert t.choose("ffn_block", "k3", [(16, "dsm")], make_runner, default=(8, "dsm")) == (8, "dsm")
    assert t.cached("k3") is None  # nothing timed: nothing stored


def test_plain_int_choices_still_work(tmp_path, fake_timing):
    t = Tuner(tmp_path / "tuner.json")
    fake_timing.update({1: 3.0, 2: 2.0})
    assert t.choose("op", "k4", (1, 2), lambda c: (lambda: c), default=1) == 2
    assert Tuner(tmp_path / "tuner.json").cached("k4") == 2


def test_choose_launch_defaults_while_capturing(tmp_path, monkeypatch):
    """Untuned during graph capture: the given axes, else the default cluster and the first path."""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    t = Tuner(tmp_path / "tuner.json")

    def run(c, x):
        raise AssertionError("nothing may run while capturing")

    ex = ("dsm", "global")
    assert t.choose_launch("op", "k5", None, None, (4, 16), ex, run, default_cluster=8) == (8, "dsm")
    assert t.choose_launch("op", "k6", 16, "global", (4, 16), ex, run, default_cluster=8) == (16, "global")


def test_key_is_op_gpu_and_fields(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU")
    assert Tuner.make_key("op", torch.device("cpu"), {"batch": 1, "timeline": 1}) == "op|GPU|batch=1|timeline=1"


def test_attention_candidates_never_time_flat_unless_named():
    """Correctness before speed: the flat exchange (attention_block.FLAT_RACE) is not a tuned
    candidate; a caller naming it still gets it, at every cluster size."""
    from clusterfuse.ops import attention_block as attn_op

    tuned = attn_op.tuned_candidates(None, None, None)
    assert len(tuned) == len(set(tuned))
    assert {x for _, x, _ in tuned} == {"dsm", "global"}
    assert {(c, t) for c, x, t in tuned if x == "dsm"} == {
        (c, t) for c in attn_op.CLUSTER_SIZES for t in attn_op.BLOCK_THREADS}
    # Axes the caller fixed stay fixed.
    assert attn_op.tuned_candidates(1, None, 256) == [(1, "dsm", 256), (1, "global", 256)]
    assert attn_op.tuned_candidates(1, "flat", None) == [(1, "flat", t) for t in attn_op.BLOCK_THREADS]
    assert attn_op.tuned_candidates(None, "flat", 128) == [(c, "flat", 128) for c in attn_op.CLUSTER_SIZES]
