"""`clusterfuse serve` end to end on the CPU: the real server in a child process (the embedded SmolLM2
on the reference backend), spoken to with the official `openai` client and raw HTTP.

One server serves the whole module (loading it takes seconds); the last test shuts it down with
SIGINT while a stream is in flight and checks that the stream completes and the process exits 0.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from bench.serve import ServerProcess, start_server  # noqa: E402
from clusterfuse.models.embedded import embedded_gguf_path  # noqa: E402

CAPACITY = 256
BODY_TIMEOUT_S = 2
MAX_CONNECTIONS = 48  # above the 16 concurrent clients and the pools of the tests' clients
SERVE_ARGS = ["--backend", "reference", "--device", "cpu", "--capacity", str(CAPACITY), "--max-num-seqs", "16",
              "--no-access-log", "--seed", "0", "--body-timeout", str(BODY_TIMEOUT_S),
              "--max-connections", str(MAX_CONNECTIONS)]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    try:
        embedded_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    srv = start_server(SERVE_ARGS, log_path=tmp_path_factory.mktemp("serve") / "server.log", timeout=120)
    yield srv
    srv.stop(signal.SIGKILL if srv.proc.poll() is None else signal.SIGINT, timeout=30)


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def metrics(server: ServerProcess) -> dict[str, float]:
    """``name{label="v",...}`` -> value, for every sample of /metrics."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def wait_idle(server: ServerProcess, timeout: float = 20.0) -> dict[str, float]:
    """Metrics once nothing runs, waits or holds pages (fails after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(server)
        if m["clusterfuse_requests_running"] == 0 and m["clusterfuse_requests_waiting"] == 0 \
                and m["clusterfuse_kv_pages_used"] == 0:
            return m
        assert time.monotonic() < deadline, f"server not idle after {timeout} s: {m}"
        time.sleep(0.1)


def greedy_chat(client: openai.OpenAI, model: str, text: str, max_tokens: int, **kw: Any) -> Any:
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                          max_tokens=max_tokens, temperature=0, **kw)


# ----------------------------------------------------------------------------- the API
def test_health_and_models(server: ServerProcess, client: openai.OpenAI) -> None:
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    models = client.models.list().data
    assert [m.id for m in models] == [server.model_name]
    assert client.models.retrieve(server.model_name).id == server.model_name
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    m = metrics(server)
    assert m["clusterfuse_kv_pages_total"] > 0 and m["clusterfuse_kv_pages_used"] == 0


def test_chat_stream_and_not_agree_with_usage(server: ServerProcess, client: openai.OpenAI) -> None:
    model = server.model_name
    whole = greedy_chat(client, model, "Name three colours.", 12)
    choice = whole.choices[0]
    assert whole.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length") and choice.message.content
    u = whole.usage
    assert u.completion_tokens >= 1 and u.prompt_tokens > 5 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert (choice.finish_reason == "length") == (u.completion_tokens == 12)

    chunks = list(greedy_chat(client, model, "Name three colours.", 12, stream=True,
                              stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content  # greedy: the same tokens either way
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == u.model_dump()
    assert all(c.usage is None for c in chunks[:-1])

    # Without include_usage no chunk carries usage.
    plain = list(greedy_chat(client, model, "Name three colours.", 12, stream=True))
    assert all(c.usage is None for c in plain) and all(c.choices for c in plain)


def test_completions_stream_and_not(server: ServerProcess, client: openai.OpenAI) -> None:
    model = server.model_name
    prompt = "The capital of France is"
    whole = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].text
    assert whole.usage.completion_tokens == 8 and whole.choices[0].finish_reason == "length"
    streamed = list(client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == whole.choices[0].text
    assert streamed[-1].usage.completion_tokens == 8 and streamed[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    echoed = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + whole.choices[0].text
    # Token ids work as a prompt too.
    ids = client.completions.create(model=model, prompt=[504, 3575, 282], max_tokens=3, temperature=0)
    assert ids.usage.prompt_tokens == 3 and ids.usage.completion_tokens == 3


def test_sixteen_concurrent_clients_match_requests_run_alone(server: ServerProcess, client: openai.OpenAI) -> None:
    model = server.model_name
    topics = ["the sea", "a cat", "winter", "bread", "trains", "the moon", "music", "a garden", "rain", "chess",
              "coffee", "mountains", "a library", "bicycles", "the desert", "fireworks"]
    jobs = []
    for i, topic in enumerate(topics):
        greedy = i % 2 == 0
        content = f"Write one sentence about {topic}." + " Please." * (i % 5)
        jobs.append({"messages": [{"role": "user", "content": content}], "max_tokens": 4 + (i * 5) % 9,
                     "temperature": 0.0 if greedy else 0.7 + 0.05 * (i % 3),
                     "top_p": 1.0 if greedy else 0.9, "seed": i, "stream": i % 4 < 2})

    def run(job: dict[str, Any]) -> tuple[str, int, str]:
        kw = {k: v for k, v in job.items() if k != "stream"}
        if job["stream"]:
            chunks = list(client.chat.completions.create(model=model, stream=True,
                                                         stream_options={"include_usage": True}, **kw))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            assert len(finish) == 1
            return text, chunks[-1].usage.completion_tokens, finish[0]
        r = client.chat.completions.create(model=model, **kw)
        return r.choices[0].message.content, r.usage.completion_tokens, r.choices[0].finish_reason

    alone = {i: run(job) for i, job in enumerate(jobs) if job["temperature"] == 0.0}
    results: dict[int, tuple[str, int, str]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(jobs))

    def worker(i: int) -> None:
        try:
            start.wait()
            results[i] = run(jobs[i])
        except BaseException as e:  # noqa: BLE001 - reported below with the job that failed
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert sorted(results) == list(range(len(jobs)))
    for i, (text, n, finish) in results.items():
        assert 1 <= n <= jobs[i]["max_tokens"] and (finish == "length") == (n == jobs[i]["max_tokens"])
        if i in alone:
            assert (text, n, finish) == alone[i], f"request {i} differs when run with 15 others"
    wait_idle(server)


def test_client_disconnect_mid_stream_frees_pages(server: ServerProcess) -> None:
    before = wait_idle(server)
    gone_key = 'clusterfuse_requests_total{route="/v1/completions",status="499"}'
    max_tokens = CAPACITY - 16
    body = {"model": server.model_name, "prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    break  # tokens are flowing: hang up with 200+ still to go
    after = wait_idle(server, timeout=15)
    assert after.get(gone_key, 0) == before.get(gone_key, 0) + 1
    # Fewer tokens were generated than the request asked for: it was aborted, not run to the end.
    made = after["clusterfuse_generation_tokens_total"] - before["clusterfuse_generation_tokens_total"]
    assert 1 <= made < max_tokens


def test_client_gone_before_a_non_streaming_answer_frees_pages(server: ServerProcess) -> None:
    before = wait_idle(server)
    gone_key = 'clusterfuse_requests_total{route="/v1/chat/completions",status="499"}'
    body = _chat(server.model_name, max_tokens=200, temperature=0, ignore_eos=True)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=httpx.Timeout(10, read=1.0))
    after = wait_idle(server, timeout=15)
    assert after.get(gone_key, 0) == before.get(gone_key, 0) + 1
    assert after["clusterfuse_generation_tokens_total"] - before["clusterfuse_generation_tokens_total"] < 200


# ----------------------------------------------------------------------------- bad input
def _chat(model: str, **kw: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **kw}


BAD_REQUESTS = {
    # name: (route, body (dict -> JSON, bytes -> as is), status, param)
    "unknown model": ("chat", lambda m: _chat("no-such-model"), 404, "model"),
    "malformed JSON": ("chat", lambda m: b'{"model": "x", "messages": [', 400, None),
    "body not an object": ("chat", lambda m: b"[1, 2]", 400, None),
    "missing messages": ("chat", lambda m: {"model": m}, 400, "messages"),
    "empty messages": ("chat", lambda m: {"model": m, "messages": []}, 400, "messages"),
    "bad role": ("chat", lambda m: {"model": m, "messages": [{"role": "wizard", "content": "hi"}]}, 400,
                 "messages.0.role"),
    "over capacity": ("chat", lambda m: _chat(m, max_tokens=CAPACITY), 400, "max_tokens"),
    "prompt over capacity": ("completions", lambda m: {"model": m, "prompt": "word " * (2 * CAPACITY)}, 400, "prompt"),
    "negative temperature": ("chat", lambda m: _chat(m, temperature=-0.5), 400, "temperature"),
    "infinite temperature": ("chat", lambda m: json.dumps(_chat(m, temperature=float("inf"))).encode(), 400,
                             "temperature"),
    "top_p zero": ("chat", lambda m: _chat(m, top_p=0), 400, "top_p"),
    "top_p above one": ("completions", lambda m: {"model": m, "prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    "n > 1": ("chat", lambda m: _chat(m, n=2), 400, "n"),
    "logprobs": ("chat", lambda m: _chat(m, logprobs=True), 400, "logprobs"),
    "completion logprobs": ("completions", lambda m: {"model": m, "prompt": "hi", "logprobs": 2}, 400, "logprobs"),
    "max_tokens zero": ("chat", lambda m: _chat(m, max_tokens=0), 400, "max_tokens"),
    "empty prompt": ("completions", lambda m: {"model": m, "prompt": ""}, 400, "prompt"),
    "token id outside vocab": ("completions", lambda m: {"model": m, "prompt": [1, 10**9]}, 400, "prompt"),
    "non-UTF-8 body": ("completions", lambda m: b'{"model": "' + m.encode() + b'", "prompt": "caf\xe9"}', 400, None),
    "lone surrogate": ("chat", lambda m: _chat(m, messages=[{"role": "user", "content": "\udcff"}]), 400, "messages"),
    # Hostile bodies: each once made a 500 or cost the engine thread, which serves every request.
    "JSON nested 100000 deep": ("completions", lambda m: b'{"model": "' + m.encode() + b'", "x": '
                                + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None),
    "seed beyond 64 bits": ("chat", lambda m: _chat(m, seed=1 << 64, temperature=0.5), 400, "seed"),
    "thousands of stop strings": ("completions", lambda m: {"model": m, "prompt": "hi", "stop": ["ab"] * 5000},
                                  400, "stop"),
    "conversation over capacity": ("chat", lambda m: {"model": m, "messages": [  # templated off the event loop
        {"role": ("user", "assistant")[i % 2], "content": f"message {i} " * 20} for i in range(200)]}, 400,
        "messages"),
    "enormous stop string": ("chat", lambda m: _chat(m, stop="ab" * 50_000), 400, "stop"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_input_gets_openai_error(server: ServerProcess, name: str) -> None:
    route, make, status, param = BAD_REQUESTS[name]
    body = make(server.model_name)
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    url = f"{server.url}/v1/{'chat/completions' if route == 'chat' else 'completions'}"
    resp = httpx.post(url, content=raw, headers={"content-type": "application/json"}, timeout=30)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["type"]
    assert err["param"] == param, err


def test_bad_input_through_the_client_and_still_serving(server: ServerProcess, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        greedy_chat(client, "gpt-4", "hi", 2)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        greedy_chat(client, server.model_name, "hi", 10 * CAPACITY)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        greedy_chat(client, server.model_name, "hi", 2, stream=True, n=3)
    assert httpx.get(f"{server.url}/v1/nothing-here", timeout=10).json()["error"]["message"]
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    assert greedy_chat(client, server.model_name, "Say yes.", 3).usage.completion_tokens >= 1
    assert metrics(server)['clusterfuse_requests_total{route="/v1/chat/completions",status="400"}'] >= 1


def test_oversized_bodies_are_refused_unread_and_the_server_keeps_serving(server: ServerProcess,
                                                                          client: openai.OpenAI) -> None:
    """A body over the limit (1 MiB at this capacity) gets 413 from its Content-Length, or while it
    arrives in chunks, before it is read whole or tokenized (200 MB of text once took 14 GB)."""
    head = b'{"model": "' + server.model_name.encode() + b'", "max_tokens": 2, "prompt": "'
    big = head + b"a" * (64 << 20) + b'"}'
    url = f"{server.url}/v1/completions"
    t0 = time.monotonic()
    resp = httpx.post(url, content=big, headers={"content-type": "application/json"}, timeout=30)
    assert resp.status_code == 413, resp.text
    assert resp.json()["error"]["message"].startswith("request body: ") and time.monotonic() - t0 < 10

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit is found while reading
        yield head
        for _ in range(64):
            yield b"a" * (1 << 20)
        yield b'"}'

    try:
        resp = httpx.post(url, content=chunked(), headers={"content-type": "application/json"}, timeout=30)
        assert resp.status_code == 413, resp.text
    except httpx.WriteError:  # the server answered and closed while the client still sent: also refused
        pass
    assert greedy_chat(client, server.model_name, "Say yes.", 3).usage.completion_tokens >= 1
    wait_idle(server)


def test_a_stalled_body_gets_408_and_the_server_keeps_serving(server: ServerProcess, client: openai.OpenAI) -> None:
    """A client that announces a body and then stalls (or trickles it) holds its connection only for
    --body-timeout seconds: then a 408 naming the request body, and everyone else is served."""
    import socket
    from urllib.parse import urlsplit

    where = urlsplit(server.url)
    body = b'{"model": "' + server.model_name.encode() + b'", "max_tokens": 2, "prompt": "hi"}'
    with socket.create_connection((where.hostname, where.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:10])
        t0 = time.monotonic()
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            reply += data
        waited = time.monotonic() - t0
    head, _, payload = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), reply[:200]
    assert json.loads(payload)["error"]["message"].startswith("request body: not received within")
    assert BODY_TIMEOUT_S - 0.5 < waited < BODY_TIMEOUT_S + 10
    assert greedy_chat(client, server.model_name, "Say yes.", 3).usage.completion_tokens >= 1
    wait_idle(server)


def test_a_flood_of_connections_gets_503_and_the_server_keeps_serving(server: ServerProcess,
                                                                       client: openai.OpenAI) -> None:
    """Connections held open past --max-connections: a request on one more gets 503 (uvicorn's
    limit), and once they close everyone is served again."""
    import socket
    from urllib.parse import urlsplit

    where = urlsplit(server.url)
    held: list[socket.socket] = []
    statuses = []
    try:
        for _ in range(MAX_CONNECTIONS + 1):  # the tests' own pooled connections count too
            sock = socket.create_connection((where.hostname, where.port), timeout=30)
            held.append(sock)
            sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
            reply = sock.recv(65536)
            statuses.append(reply.split(b" ", 2)[1])
            if statuses[-1] == b"503":
                break
    finally:
        for sock in held:
            sock.close()
    assert statuses[-1] == b"503" and set(statuses[:-1]) == {b"200"}, statuses
    assert len(statuses) <= MAX_CONNECTIONS
    time.sleep(0.5)  # the server sees the closes
    assert greedy_chat(client, server.model_name, "Say yes.", 3).usage.completion_tokens >= 1
    wait_idle(server)


# ----------------------------------------------------------------------------- benchmark smoke
def test_bench_serve_smoke(server: ServerProcess, tmp_path: Any) -> None:
    from bench import serve as bench_serve

    out = tmp_path / "serve.json"
    assert bench_serve.main(["--url", server.url, "--backends", "reference", "--tiny", "--clients", "1,2",
                             "--requests-per-client", "2", "--min-requests", "2", "--warmup", "1",
                             "--out", str(out), "--md", str(tmp_path / "serve.md"),
                             "--png", str(tmp_path / "serve.png")]) == 0
    records = json.loads(out.read_text())
    assert [r["clients"] for r in records] == [1, 2]
    for r in records:
        assert r["bench"] == "serve" and r["variant"] == "reference" and r["requests"] == 2 * r["clients"]
        assert r["output_tok_s"] > 0 and 0 < r["ttft_ms_p50"] <= r["ttft_ms_p99"]
        assert 0 < r["itl_ms_p50"] <= r["itl_ms_p99"] and r["time_us"] == pytest.approx(r["itl_ms_p50"] * 1e3)
    assert "| reference | 2 |" in (tmp_path / "serve.md").read_text()
    assert (tmp_path / "serve.png").stat().st_size > 0
    # The table can be remade from the records alone (runs split per backend are reported together).
    assert bench_serve.main(["--report-only", "--backends", "reference", "--out", str(out),
                             "--md", str(tmp_path / "again.md")]) == 0
    assert (tmp_path / "again.md").read_text() == (tmp_path / "serve.md").read_text()


# ----------------------------------------------------------------------------- shutdown (last: it stops the server)
def test_sigint_drains_in_flight_stream_and_exits_cleanly(server: ServerProcess) -> None:
    body = {"model": server.model_name, "prompt": "Count: one, two,", "max_tokens": 12, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    lines: list[str] = []
    with httpx.Client(base_url=server.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body) as resp:
            for line in resp.iter_lines():
                if not line:
                    continue
                lines.append(line)
                if len(lines) == 2:  # the stream is under way: now ask the server to stop (once: twice forces)
                    server.proc.send_signal(signal.SIGINT)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["usage"]["completion_tokens"] == 12
    assert server.proc.wait(60) == 0
    log = server.log()
    assert "shut down cleanly" in log and "Traceback" not in log, log[-6000:]
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health", timeout=5)
