"""Pick the fastest launch variant (cluster size, exchange path) of a fused op per configuration, once.

A choice is keyed by op, GPU name, shape, dtype, batch and (optionally) a sequence-length
bucket. The first call with an unseen key times every candidate with CUDA events (warm-up,
then several calls captured in a CUDA graph, the median of a few replays) and stores the winner in a JSON file under
the cache directory; later calls, and later processes, read it back. Shared by every op::

    from clusterfuse.ops.tuner import TUNER, seq_bucket
    c = TUNER.choose("ffn_block", key, (1, 2, 4, 8, 16), lambda c: (lambda: run(c)), default=8)

A candidate is an int or a tuple of ints and strings (e.g. ``(4, "dsm")``: cluster size and
exchange path); the JSON file stores tuples as lists and `Tuner.cached` gives tuples back.

Timing is impossible while a CUDA graph is being captured: then a cached choice is used, or
``default`` with a warning naming the key (tune before capturing: call the op once eagerly).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)

Runner = Callable[[], object]
#: A launch variant: a cluster size, or a tuple such as (cluster size, exchange path).
Choice = int | tuple[int | str, ...]


def _label(c: Choice) -> str:
    """How a candidate is named in the JSON file's timings and in the log: ``4`` or ``4/dsm``."""
    return "/".join(map(str, c)) if isinstance(c, tuple) else str(c)


def cache_dir() -> Path:
    """``$CLUSTERFUSE_CACHE_DIR``, else ``$XDG_CACHE_HOME/clusterfuse``, else ``~/.cache/clusterfuse``."""
    if env := os.environ.get("CLUSTERFUSE_CACHE_DIR"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "clusterfuse"


def seq_bucket(seq_len: int) -> int:
    """Next power of two ≥ ``seq_len`` (≥ 128): attention ops tune per bucket, not per length."""
    return max(128, 1 << (max(int(seq_len), 1) - 1).bit_length())


def _median_us(fn: Runner, warmup: int, samples: int, inner: int) -> float:
    """Median GPU time of one ``fn()`` call: ``inner`` calls captured in one CUDA graph, replayed.

    Timing eager calls would measure the host: a fused op's Python launch path costs ~100 µs, more
    than most kernels run, so every candidate would look alike and the choice would be noise.
    """
    for _ in range(warmup):
        fn()  # builds, allocates workspaces and counters outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    graph.replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(samples)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    del graph
    return statistics.median(s.elapsed_time(e) * 1e3 / inner for s, e in events)


def launch_candidates(cluster_size: int | None, exchange: str | None, cluster_sizes: Iterable[int],
                      exchanges: Iterable[str]) -> list[tuple[int, str]]:
    """The (cluster size, exchange path) pairs a fused op times: an argument given fixes its axis."""
    return [(c, x) for x in ((exchange,) if exchange is not None else tuple(exchanges))
            for c in ((cluster_size,) if cluster_size is not None else tuple(cluster_sizes))]


class Tuner:
    """Choices cached in memory and in ``path`` (JSON object: key → {"choice", "times_us"})."""

    def __init__(self, path: Path | None = None, *, warmup: int = 3, samples: int = 5, inner: int = 10) -> None:
        # v2: choices timed under CUDA graphs (v1 timed eager launches, i.e. the host).
        # v3: attention and FFN choices are (cluster size, exchange path) pairs.
        self.path = path if path is not None else cache_dir() / "tuner-v3.json"
        self.warmup, self.samples, self.inner = warmup, samples, inner
        self._lock = threading.Lock()
        self._entries: dict[str, dict] | None = None
        self._warned: set[str] = set()

    @staticmethod
    def make_key(op: str, device: torch.device, fields: Mapping[str, object]) -> str:
        """``op|GPU name|k=v|...`` with the fields in the given order. A field that selects another
        build of a kernel (e.g. a profiling build) belongs in ``fields``: its fastest launch may differ."""
        name = torch.cuda.get_device_name(device)
        return "|".join([op, name, *(f"{k}={v}" for k, v in fields.items())])

    def _load(self) -> dict[str, dict]:
        if self._entries is None:
            try:
                self._entries = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self._entries = {}
        return self._entries

    def _save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self._entries, indent=1, sort_keys=True))
            tmp.replace(self.path)  # atomic: concurrent processes never read half a file
        except OSError as err:  # a read-only cache only costs re-tuning
            log.warning("tuner: could not write %s (%s); choices stay in memory", self.path, err)

    def cached(self, key: str) -> Choice | None:
        with self._lock:
            entry = self._load().get(key)
        if entry is None:
            return None
        choice = entry["choice"]
        return tuple(choice) if isinstance(choice, (list, tuple)) else int(choice)  # a list when read from JSON

    def choose(self, op: str, key: str, candidates: Iterable[Choice],
               make_runner: Callable[[Choice], Runner | None], *, default: Choice) -> Choice:
        """The cached choice for ``key`` if it is still one of ``candidates``, else the fastest of
        them (a choice cached by a version that offered more candidates is timed again).

        ``make_runner(c)`` returns a callable running the op with candidate ``c`` (on the
        current stream), or None when ``c`` cannot run for this shape (it may also raise
        ``ValueError``/``RuntimeError``: the candidate is skipped).
        """
        candidates = list(candidates)
        if (choice := self.cached(key)) is not None and choice in candidates:
            return choice
        if torch.cuda.is_current_stream_capturing():
            if key not in self._warned:
                self._warned.add(key)
                log.warning("%s: no tuned choice for %s while capturing a CUDA graph; using %s "
                            "(call the op once before capture to tune)", op, key, default)
            return default
        times: dict[Choice, float] = {}
        for c in candidates:
            try:
                runner = make_runner(c)
                if runner is not None:
                    times[c] = _median_us(runner, self.warmup, self.samples, self.inner)
            except (ValueError, RuntimeError) as err:
                log.info("%s: candidate %s skipped for %s: %s", op, c, key, err)
        if not times:
            return default
        choice = min(times, key=lambda c: times[c])
        entry: dict[str, object] = {"choice": choice, "times_us": {_label(c): round(t, 3) for c, t in times.items()}}
        with self._lock:
            self._load()[key] = entry
            self._save()
        log.info("%s: tuned %s -> %s (%s)", op, key, _label(choice),
                 ", ".join(f"{_label(c)}: {t:.1f} µs" for c, t in times.items()))
        return choice

    def choose_launch(self, op: str, key: str, cluster_size: int | None, exchange: str | None,
                      cluster_sizes: Iterable[int], exchanges: Sequence[str], run: Callable[[int, str], object], *,
                      default_cluster: int) -> tuple[int, str]:
        """A fused op's (cluster size, exchange path) for ``key``: the axes given stay fixed, the
        others are tuned, ``run(c, x)`` launching the op. Untuned while a graph is captured: the
        given values, else ``default_cluster`` and the first of ``exchanges``."""
        return self.choose(op, key, launch_candidates(cluster_size, exchange, cluster_sizes, exchanges),
                           lambda cx: (lambda: run(*cx)),
                           default=(cluster_size or default_cluster, exchange or exchanges[0]))


#: The process-wide tuner every op uses.
TUNER = Tuner()
