"""Serving benchmark: drive `clusterfuse serve` with N concurrent clients and measure what users see.

    python -m bench.serve [--url http://127.0.0.1:8000] [--backends fused,torch] [--model llama-3-8b]
        [--clients 1,4,16,64] [--requests-per-client 4] [--seed 0] [--temperature 0] [--top-p 1]
        [--out FILE] [--md FILE] [--png FILE]
    python -m bench.serve --report-only --out FILE --md FILE --png FILE   # table + plot of saved records

Without ``--url`` it starts one server per backend in ``--backends`` (the same server, another
``--backend``), each in its own process, one after the other; with ``--url`` it measures that server
(``--backends`` then names what it runs, one name).  For each load level N, N clients each send
requests one after another (closed loop) until ``N * --requests-per-client`` requests are done.

The requests are a seeded synthetic mix shaped like ShareGPT conversations: prompt and output
lengths drawn from log-normal distributions (medians ``--prompt-median`` / ``--output-median``,
clipped to ``--prompt-max`` / ``--output-max``).  Prompts are random token ids (exact lengths on
any tokenizer); every request has ``ignore_eos`` so it produces exactly its output length,
streamed over ``/v1/completions``, greedy by default, or sampled with ``--temperature`` /
``--top-p`` (each request seeded from the mix, so a level replays the same draws).

Per load level it reports output tokens/s (all tokens generated / wall time of the level), time to
first token p50/p99, and inter-token latency p50/p99 (gaps between successive streamed tokens),
as ``serve`` records (DESIGN.md format: ``time_us`` is the ITL p50), a markdown table and a
latency-vs-load PNG.  Variants: ``clusterfuse`` (fused backend), ``torch_cuda_graph`` (the
PyTorch + CUDA graph backend, ``--backend torch``), ``reference``.

``--tiny`` sets CPU-sized lengths (a smoke run: ``--tiny --clients 2``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.common import REPO_ROOT, RecordWriter, int_list, load_records, results_dir

VARIANT_OF_BACKEND = {"fused": "clusterfuse", "torch": "torch_cuda_graph", "reference": "reference"}
OURS, BASELINE = VARIANT_OF_BACKEND["fused"], VARIANT_OF_BACKEND["torch"]
#: Prompt token ids are drawn from this range: inside every supported model's vocabulary, and clear
#: of the special tokens at the start of most vocabularies.
TOKEN_ID_RANGE = (300, 30000)
READY = re.compile(r"ready: serving '(?P<name>.*)' at http://(?P<host>[^:/]+):(?P<port>\d+)/v1")


# ----------------------------------------------------------------------------- the server
@dataclass
class ServerProcess:
    """A `clusterfuse serve` child process."""

    proc: subprocess.Popen[bytes]
    url: str
    model_name: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60.0) -> int:
        """Ask it to shut down gracefully; its exit status (killed if it does not exit in ``timeout``)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)


def start_server(serve_args: Sequence[str], *, log_path: Path | None = None, timeout: float = 600.0) -> ServerProcess:
    """Start ``clusterfuse serve --port 0 <serve_args>`` and wait for its ready line.

    The server picks a free port and prints it when it listens, so there is no race for a port.
    Its output goes to ``log_path`` (a file, so a chatty server never blocks on a full pipe)."""
    if log_path is None:
        log_path = Path(tempfile.mkstemp(prefix="clusterfuse-serve-", suffix=".log")[1])
    cmd = [sys.executable, "-m", "clusterfuse.cli.main", "serve", "--port", "0", *serve_args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = READY.search(log_path.read_text(errors="replace"))
        if match:
            url = f"http://{match['host']}:{match['port']}"
            return ServerProcess(proc, url, match["name"], log_path)
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was ready:\n"
                               f"{log_path.read_text(errors='replace')[-4000:]}")
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    tail = log_path.read_text(errors="replace")[-4000:]
    raise RuntimeError(f"the server was not ready after {timeout:.0f} s:\n{tail}")


@contextlib.contextmanager
def running_server(serve_args: Sequence[str], **kwargs: Any) -> Iterator[ServerProcess]:
    server = start_server(serve_args, **kwargs)
    try:
        yield server
    finally:
        server.stop()


# ----------------------------------------------------------------------------- the load
@dataclass(frozen=True)
class SyntheticRequest:
    prompt_ids: list[int]
    output_tokens: int
    seed: int = 0  # the request's sampling seed (used when the load samples)


def sharegpt_like(n: int, seed: int, *, prompt_median: int, prompt_max: int, output_median: int,
                  output_max: int) -> list[SyntheticRequest]:
    """``n`` requests with ShareGPT-shaped lengths (log-normal, long-tailed), the same for a seed."""
    rng = np.random.default_rng(seed)
    # sigma ~1 gives ShareGPT's spread: most requests short, a tail of long prompts and answers.
    prompt_lens = np.clip(rng.lognormal(math.log(prompt_median), 0.9, n), 4, prompt_max).astype(int)
    output_lens = np.clip(rng.lognormal(math.log(output_median), 0.8, n), 2, output_max).astype(int)
    return [SyntheticRequest(rng.integers(*TOKEN_ID_RANGE, size=int(p)).tolist(), int(o), seed + i)
            for i, (p, o) in enumerate(zip(prompt_lens, output_lens, strict=True))]


@dataclass
class RequestResult:
    ttft_s: float
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0


async def _one_request(client: httpx.AsyncClient, model: str, req: SyntheticRequest,
                       sampling: dict[str, float] | None = None) -> RequestResult:
    """One streamed completion; ``sampling``: temperature and top_p (None: greedy)."""
    body = {"model": model, "prompt": req.prompt_ids, "max_tokens": req.output_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    if sampling and sampling["temperature"] > 0:
        body.update(sampling, seed=req.seed)
    start = time.perf_counter()
    arrivals: list[float] = []
    usage: dict[str, int] = {}
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"request failed with {resp.status_code}: {(await resp.aread()).decode()[:500]}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            if chunk.get("usage"):
                usage = chunk["usage"]
            if any(c.get("text") for c in chunk.get("choices", [])):
                arrivals.append(time.perf_counter())
    if not arrivals or not usage:
        raise RuntimeError("a stream ended without tokens or usage")
    return RequestResult(ttft_s=arrivals[0] - start, itl_s=list(np.diff(arrivals)),
                         output_tokens=usage["completion_tokens"], prompt_tokens=usage["prompt_tokens"])


async def run_level(url: str, model: str, requests: list[SyntheticRequest], clients: int,
                    timeout_s: float, sampling: dict[str, float] | None = None) -> tuple[list[RequestResult], float]:
    """All ``requests`` through ``clients`` closed-loop clients; their results and the wall time."""
    queue: asyncio.Queue[SyntheticRequest] = asyncio.Queue()
    for r in requests:
        queue.put_nowait(r)
    results: list[RequestResult] = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)

    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:
        async def worker() -> None:
            while not queue.empty():
                results.append(await _one_request(client, model, queue.get_nowait(), sampling))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - start
    return results, wall


def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def summarize(results: list[RequestResult], wall_s: float) -> dict[str, float]:
    ttft = [r.ttft_s * 1e3 for r in results]
    itl = [g * 1e3 for r in results for g in r.itl_s]
    out_tokens = sum(r.output_tokens for r in results)
    return {"output_tok_s": out_tokens / wall_s, "ttft_ms_p50": _pct(ttft, 50), "ttft_ms_p99": _pct(ttft, 99),
            "itl_ms_p50": _pct(itl, 50), "itl_ms_p99": _pct(itl, 99), "itl_ms_min": min(itl, default=float("nan")),
            "itl_ms_max": max(itl, default=float("nan")), "requests": len(results), "output_tokens": out_tokens,
            "prompt_tokens": sum(r.prompt_tokens for r in results), "wall_s": wall_s}


# ----------------------------------------------------------------------------- reporting
def _load(record: dict[str, Any]) -> str:
    """The record's model and how its requests sample (greedy loads: the model alone)."""
    mix = record.get("mix") or {}
    if not mix.get("temperature"):
        return str(record["model"])
    return f"{record['model']}, T {mix['temperature']:g} top-p {mix.get('top_p', 1.0):g}"


def markdown(records: Sequence[dict[str, Any]]) -> str:
    lines = ["| model | variant | clients | requests | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms "
             "| ITL p99 ms |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(records, key=lambda r: (_load(r), r["clients"], r["variant"])):
        lines.append(f"| {_load(r)} | {r['variant']} | {r['clients']} | {r['requests']} | {r['output_tok_s']:.1f} "
                     f"| {r['ttft_ms_p50']:.1f} | {r['ttft_ms_p99']:.1f} | {r['itl_ms_p50']:.2f} "
                     f"| {r['itl_ms_p99']:.2f} |")
    device = records[0]["device"] if records else "?"
    text = f"Serving load on {device} (bench/serve.py)\n\n" + "\n".join(lines) + "\n"
    by_key = {(_load(r), r["clients"], r["variant"]): r for r in records}
    pairs = [(by_key[k], by_key[(k[0], k[1], BASELINE)]) for k in sorted(by_key)
             if k[2] == OURS and (k[0], k[1], BASELINE) in by_key]
    if pairs:
        text += (f"\n{OURS} against {BASELINE} (> 1: ours better)\n\n| model | clients | output tok/s ratio "
                 "| TTFT p50 ratio | ITL p50 ratio | ITL p99 ratio |\n| --- | --- | --- | --- | --- | --- |\n")
        for ours, base in pairs:
            ratios = [ours["output_tok_s"] / base["output_tok_s"]]
            ratios += [base[k] / ours[k] for k in ("ttft_ms_p50", "itl_ms_p50", "itl_ms_p99")]
            text += f"| {_load(ours)} | {ours['clients']} | " + " | ".join(f"{x:.3f}" for x in ratios) + " |\n"
    return text


def plot(records: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (("ttft_ms_p50", "ttft_ms_p99", "time to first token (ms)"),
              ("itl_ms_p50", "itl_ms_p99", "inter-token latency (ms)"), ("output_tok_s", None, "output tokens/s"))
    for variant, load in sorted({(r["variant"], _load(r)) for r in records}):
        rows = sorted((r for r in records if (r["variant"], _load(r)) == (variant, load)), key=lambda r: r["clients"])
        if load != str(rows[0]["model"]):
            variant = f"{variant} ({load.partition(', ')[2]})"
        x = [r["clients"] for r in rows]
        for ax, (p50, p99, title) in zip(axes, panels, strict=True):
            line = ax.plot(x, [r[p50] for r in rows], marker="o", label=f"{variant}" + (" p50" if p99 else ""))[0]
            if p99:
                ax.plot(x, [r[p99] for r in rows], marker="x", linestyle="--", color=line.get_color(),
                        label=f"{variant} p99")
            ax.set_title(title)
    levels = sorted({r["clients"] for r in records})
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(n) for n in levels])
        ax.set_xlabel("concurrent clients")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    model = records[0]["model"] if records else ""
    fig.suptitle(f"clusterfuse serve: latency and throughput against load ({model}, {records[0]['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="a running server (default: start one per backend)")
    p.add_argument("--backends", default="fused,torch",
                   help="backends to start servers with, in order (default fused,torch; with --url: what it runs)")
    p.add_argument("--model", default=None, help="model of the started servers (default: the embedded SmolLM2)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--capacity", type=int, default=None, help="KV capacity per sequence of the started servers")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="batch limit of the started servers (default: the largest client count)")
    p.add_argument("--serve-arg", action="append", default=[], help="extra argument for the started servers")
    p.add_argument("--clients", type=int_list, default=[1, 4, 16, 64], help="load levels (default 1,4,16,64)")
    p.add_argument("--requests-per-client", type=int, default=4, help="requests per client per level (default 4)")
    p.add_argument("--min-requests", type=int, default=8, help="at least this many requests per level (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic request mix")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature of every request (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass of every sampled request (1: off)")
    p.add_argument("--prompt-median", type=int, default=256)
    p.add_argument("--prompt-max", type=int, default=2048)
    p.add_argument("--output-median", type=int, default=128)
    p.add_argument("--output-max", type=int, default=512)
    p.add_argument("--tiny", action="store_true", help="CPU-sized lengths: prompts ~16, outputs ~6 tokens")
    p.add_argument("--warmup", type=int, default=2, help="requests sent (and not measured) before each server's "
                   "first level")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take")
    p.add_argument("--out", type=Path, default=None, help="JSON records (appended; default bench/results/serve.json)")
    p.add_argument("--md", type=Path, default=None, help="markdown table of this run's records")
    p.add_argument("--png", type=Path, default=None, help="latency-vs-load plot of this run's records")
    p.add_argument("--report-only", action="store_true",
                   help="measure nothing: the table and plot of the serve records already in --out (e.g. after "
                        "one run per backend)")
    return p


def _check(args: argparse.Namespace) -> list[str]:
    backends = [b for b in args.backends.split(",") if b]
    unknown = [b for b in backends if b not in VARIANT_OF_BACKEND]
    if unknown:
        raise SystemExit(f"--backends: unknown {unknown}; expected some of {', '.join(VARIANT_OF_BACKEND)}")
    if args.url and len(backends) != 1:
        raise SystemExit("--backends: with --url, name the one backend that server runs")
    if not args.clients or min(args.clients) < 1:
        raise SystemExit("--clients: expected positive counts, e.g. 1,4,16,64")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise SystemExit(f"--temperature: expected a finite number >= 0, got {args.temperature}")
    if not 0.0 < args.top_p <= 1.0:
        raise SystemExit(f"--top-p: expected a value in (0, 1], got {args.top_p}")
    if args.tiny:
        args.prompt_median, args.prompt_max, args.output_median, args.output_max = 16, 48, 6, 12
    return backends


def _sampling(args: argparse.Namespace) -> dict[str, float]:
    return {"temperature": args.temperature, "top_p": args.top_p}


def _model_label(args: argparse.Namespace, served_name: str) -> str:
    return args.model or served_name


async def _measure_server(url: str, model: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    if args.warmup:
        warm = sharegpt_like(args.warmup, args.seed + 10_000, prompt_median=args.prompt_median,
                             prompt_max=args.prompt_max, output_median=args.output_median, output_max=args.output_max)
        await run_level(url, model, warm, min(args.warmup, 2), args.timeout)
    for n in args.clients:
        count = max(n * args.requests_per_client, args.min_requests)
        # Same seed for every level and backend: each level replays the same mix.
        reqs = sharegpt_like(count, args.seed, prompt_median=args.prompt_median, prompt_max=args.prompt_max,
                             output_median=args.output_median, output_max=args.output_max)
        results, wall = await run_level(url, model, reqs, n, args.timeout, _sampling(args))
        s = summarize(results, wall)
        print(f"  N={n:>3}: {s['requests']} requests, {s['output_tok_s']:.1f} output tok/s, TTFT p50 "
              f"{s['ttft_ms_p50']:.1f} / p99 {s['ttft_ms_p99']:.1f} ms, ITL p50 {s['itl_ms_p50']:.2f} / p99 "
              f"{s['itl_ms_p99']:.2f} ms", flush=True)
        rows.append({"clients": n, **s})
    return rows


def _report(records: list[dict[str, Any]], md: Path | None, png: Path | None) -> None:
    table = markdown(records)
    print("\n" + table)
    if md:
        md.write_text(table)
    if png:
        plot(records, png)
        print(f"plot: {png}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    backends = _check(args)
    out = args.out or results_dir() / "serve.json"
    if args.report_only:
        records = [r for r in load_records([out]) if r.get("bench") == "serve"] if out.exists() else []
        if not records:
            raise SystemExit(f"--report-only: no serve records in {out}")
        _report(records, args.md, args.png)
        return 0
    writer = RecordWriter(out, bench="serve")
    records = []
    for backend in backends:
        print(f"serve benchmark: {backend} backend", flush=True)
        if args.url:
            server_cm: contextlib.AbstractContextManager[Any] = contextlib.nullcontext(None)
        else:
            serve_args = ["--backend", backend, "--device", args.device, "--dtype", args.dtype, "--no-access-log",
                          "--max-num-seqs", str(args.max_num_seqs or max(args.clients)), *args.serve_arg]
            if args.model:
                serve_args += ["--model", args.model]
            if args.capacity:
                serve_args += ["--capacity", str(args.capacity)]
            if args.seed is not None:
                serve_args += ["--seed", str(args.seed)]
            server_cm = running_server(serve_args)
        with server_cm as server:
            url = args.url or server.url
            served = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
            rows = asyncio.run(_measure_server(url, served, args))
        for row in rows:
            rec = writer.append(model=_model_label(args, served), variant=VARIANT_OF_BACKEND[backend],
                                batch=None, seq_len=None, dtype=None if args.dtype == "auto" else args.dtype,
                                cluster_size=None, time_us=row["itl_ms_p50"] * 1e3,
                                time_us_min=row["itl_ms_min"] * 1e3, time_us_max=row["itl_ms_max"] * 1e3,
                                floor_us=None, bandwidth_GBs=None, backend=backend,
                                **{k: v for k, v in row.items() if k not in ("itl_ms_min", "itl_ms_max")},
                                mix={"seed": args.seed, "prompt_median": args.prompt_median,
                                     "prompt_max": args.prompt_max, "output_median": args.output_median,
                                     "output_max": args.output_max, **_sampling(args)})
            records.append(rec)
    print(f"records appended to {out}")
    _report(records, args.md, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
