"""Fuzz suite (issue 39): seeded mutations of tiny GGUF files, safetensors headers, config.json,
tokenizer_config.json (chat templates included) and CLI argument vectors.

Every case must end in a correct run or a clear error (a one-line ValueError-family message in the
library, exit 2 with one line in the CLI): never a traceback, a hang or a memory blow-up.  The cases
run in a worker process (tests/fuzz_worker.py) under an address-space and CPU rlimit with a per-case
alarm, and the worker itself under a wall timeout; a case that kills its worker is reported as such
and a new worker continues after it, so one bad case hides no other.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).resolve().parent / "fuzz_worker.py"
SEED = 39
#: Cases per class; a few hundred in all, about a minute on 2 cores.
COUNTS = {"gguf": 100, "safetensors": 70, "config": 120, "tokenizer": 80, "cli": 60, "families": 80}
WORKER_WALL_SECONDS = 240
GOOD = {"ok", "clear"}


def run_class(cls: str, count: int, work: Path, case_seconds: int | None = None) -> dict[int, dict]:
    """Run cases 0..count-1 of ``cls``; returns case → {"what", "outcome", "detail"}. A worker that dies
    (signal, rlimit, wall timeout) mid-case gets that case marked ``killed`` and is restarted after it."""
    results: dict[int, dict] = {}
    first = 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                       os.environ.get("PYTHONPATH", "")])}
    while first < count:
        try:
            proc = subprocess.run([sys.executable, str(WORKER), cls, str(SEED), str(count), str(first),
                                   str(work / f"w{first}"), *([str(case_seconds)] if case_seconds else [])],
                                  capture_output=True, text=True,
                                  timeout=WORKER_WALL_SECONDS, env=env, stdin=subprocess.DEVNULL)
            out, rc, err = proc.stdout, proc.returncode, proc.stderr
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            rc, err = "wall timeout", ""
        started = None
        for line in out.splitlines():
            record = json.loads(line)
            if record["event"] == "start":
                started = record
                results[record["case"]] = {"what": record["what"], "outcome": "killed", "detail": ""}
            else:
                results[record["case"]].update(outcome=record["outcome"], detail=record["detail"])
                started = None
        if started is not None:  # the case that was running when the worker died: reported, then skipped
            results[started["case"]]["detail"] = f"worker died ({rc}): {err[-1000:]}"
            first = started["case"] + 1
        elif max(results, default=first - 1) + 1 < count:
            pytest.fail(f"fuzz worker {cls} stopped between cases ({rc}):\n{err[-3000:]}")
        else:
            first = count
    return results


@pytest.mark.parametrize("cls", list(COUNTS))
def test_fuzz_class(cls, tmp_path):
    results = run_class(cls, COUNTS[cls], tmp_path)
    assert sorted(results) == list(range(COUNTS[cls]))
    tally = collections.Counter(r["outcome"] for r in results.values())
    print(f"fuzz {cls}: {len(results)} cases: {dict(tally)}")
    bad = {i: r for i, r in results.items() if r["outcome"] not in GOOD}
    assert not bad, "\n\n".join(f"case {i} [{r['outcome']}] {r['what']}\n{r['detail']}" for i, r in bad.items())


def test_harness_reports_every_outcome(tmp_path):
    """The harness itself: each kind of failure is reported as such, and a case that kills its worker
    is reported without hiding the cases after it."""
    results = run_class("harness", 8, tmp_path, case_seconds=2)
    assert [results[i]["outcome"] for i in range(8)] == ["ok", "clear", "unclear", "killed", "memory", "timeout",
                                                         "crash", "ok"]
    assert "RuntimeError: a bug" in results[6]["detail"]
