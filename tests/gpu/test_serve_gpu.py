"""`clusterfuse serve` on a GPU backend: ready means ready (no first-request stall), concurrent streams
all complete, a disconnect frees its pages, Ctrl-C drains.

Random SmolLM2-shaped weights (the ``smollm2-135m`` preset: nothing to download, a byte-level
tokenizer); greedy with ``ignore_eos`` so every request makes exactly ``max_tokens`` tokens.  The
tokens themselves are the engine GPU tests' business (batched = alone within their near-tie rule: on
random weights bf16 rounding flips ~1% of greedy choices, too often for exact equality here); the
CPU serve tests check that batched requests never mix.
"""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from bench.serve import start_server  # noqa: E402

pytestmark = pytest.mark.gpu


def _completion(url: str, model: str, prompt: list[int], max_tokens: int, **kw: Any) -> dict[str, Any]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **kw}
    resp = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()


def _metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.mark.parametrize("backend", ["fused", "torch"])
def test_gpu_server_ready_concurrent_disconnect_and_drain(backend: str, tmp_path: Any) -> None:
    server = start_server(["--model", "smollm2-135m", "--backend", backend, "--device", "cuda", "--capacity", "1024",
                           "--max-num-seqs", "8", "--seed", "0", "--no-access-log"],
                          log_path=tmp_path / "server.log", timeout=600)
    try:
        url, model = server.url, server.model_name
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        prompt = list(range(300, 364))

        # Ready means every graph is captured: the first request is as quick as the next ones.
        t0 = time.perf_counter()
        first = _completion(url, model, prompt, 32)
        first_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        _completion(url, model, prompt, 32)
        second_s = time.perf_counter() - t0
        assert first["usage"]["completion_tokens"] == 32
        assert first_s < 2 * second_s + 0.25, f"first request {first_s:.3f} s, then {second_s:.3f} s: a start-up stall"

        # Eight different requests at once: each gets its own tokens, all of them.
        jobs = [(list(range(300 + 7 * i, 340 + 11 * i)), 8 + 5 * i) for i in range(8)]
        with ThreadPoolExecutor(8) as pool:
            outs = list(pool.map(lambda job: _completion(url, model, *job), jobs))
        for (ids, n), out in zip(jobs, outs, strict=True):
            assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}

        # A client that hangs up mid-stream frees its pages.
        body = {"model": model, "prompt": prompt, "max_tokens": 900, "temperature": 0, "ignore_eos": True,
                "stream": True}
        with httpx.Client(base_url=url, timeout=60) as http, http.stream("POST", "/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break
        deadline = time.monotonic() + 10
        while _metric(url, "clusterfuse_kv_pages_used") > 0 or _metric(url, "clusterfuse_requests_running") > 0:
            assert time.monotonic() < deadline, "pages still held 10 s after the client left"
            time.sleep(0.05)
    finally:
        code = server.stop(signal.SIGINT, timeout=60)
    assert code == 0, server.log()[-4000:]
    assert "shut down cleanly" in server.log()
