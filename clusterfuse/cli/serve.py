"""`clusterfuse serve`: build the engine, then serve it over HTTP with uvicorn until Ctrl-C / SIGTERM.

Order matters for "ready means ready": the port is bound first (a port in use fails in a second,
not after minutes of loading), the engine is built completely (weights, kernel builds, tuning,
graph capture: `AsyncLLM` returns only then), and only then does the socket listen — so a
client either gets connection refused or a server that answers at full speed.

On Ctrl-C / SIGTERM uvicorn stops accepting, lets in-flight responses finish (streams included),
then the app's lifespan drains and stops the engine; the process exits 0.  A second Ctrl-C
forces the exit.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("clusterfuse")


#: Open connections (and running requests) the server takes before answering 503: far above any
#: batch the engine decodes, low enough that a flood of idle sockets cannot exhaust the process.
DEFAULT_MAX_CONNECTIONS = 1024


def add_parser(sub: Any, add_model_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register the ``serve`` sub-command on ``sub`` (the sub-parsers of the main parser)."""
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (needs clusterfuse[serve])",
                       description="Serve a model over the OpenAI API: /v1/chat/completions, /v1/completions, "
                                   "/v1/models, /health, /metrics (Prometheus).")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients send (default: the model's own name)")
    p.add_argument("--max-num-seqs", type=int, default=64,
                   help="most requests decoded together; more wait in the queue (default 64)")
    p.add_argument("--num-pages", type=int, default=None,
                   help="KV-cache pages in the pool (default: sized to the free memory); fewer pages means more "
                        "preemption under load")
    p.add_argument("--max-request-bytes", type=int, default=None,
                   help="largest request body read; larger ones get 413 (default: 64 bytes per token of "
                        "--capacity, at least 1 MiB)")
    p.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                   help="most open connections (and running requests); beyond it a request gets 503 "
                        f"(default {DEFAULT_MAX_CONNECTIONS})")
    p.add_argument("--body-timeout", type=float, default=None,
                   help="seconds a client may take to send a request body; slower ones get 408 (default 30)")
    p.add_argument("--no-access-log", action="store_true", help="no log line per HTTP request")
    p.add_argument("--shutdown-timeout", type=float, default=None,
                   help="on Ctrl-C, seconds to let in-flight requests finish before cancelling them "
                        "(default: wait for all)")


def _check_args(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port: expected 0..65535, got {args.port}")
    if args.max_num_seqs < 1:
        raise ValueError(f"--max-num-seqs: expected >= 1, got {args.max_num_seqs}")
    if args.num_pages is not None and args.num_pages < 1:
        raise ValueError(f"--num-pages: expected >= 1, got {args.num_pages}")
    if args.max_request_bytes is not None and args.max_request_bytes < 1:
        raise ValueError(f"--max-request-bytes: expected >= 1, got {args.max_request_bytes}")
    if args.max_connections < 2:
        raise ValueError(f"--max-connections: expected >= 2, got {args.max_connections}")
    if args.body_timeout is not None and not (math.isfinite(args.body_timeout) and args.body_timeout > 0):
        raise ValueError(f"--body-timeout: expected a positive number of seconds, got {args.body_timeout}")
    if args.shutdown_timeout is not None and args.shutdown_timeout < 0:
        raise ValueError(f"--shutdown-timeout: expected >= 0, got {args.shutdown_timeout}")
    if args.served_model_name is not None and not args.served_model_name.strip():
        raise ValueError("--served-model-name: must not be empty")


def _bind(host: str, port: int) -> socket.socket:
    """A bound, not yet listening, socket: connections are refused until the server is ready."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ValueError(f"--host: cannot resolve {host!r} ({e})") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise ValueError(f"--port: cannot listen on {host}:{port} ({e.strerror})") from None
    return sock


def run(args: argparse.Namespace) -> int:
    """The ``serve`` command."""
    _check_args(args)
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ValueError(f"serve: needs the serve extra, pip install 'clusterfuse[serve]' ({e})") from None
    sock = _bind(args.host, args.port)
    try:
        return asyncio.run(_serve(args, sock))
    finally:
        sock.close()


def _quiet_signals() -> None:
    """uvicorn re-raises the signal that stopped it once it has shut down; by then everything is
    drained, so that re-raise should end the process with 0, not a KeyboardInterrupt trace."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)


async def _serve(args: argparse.Namespace, sock: socket.socket) -> int:
    import uvicorn

    from clusterfuse.engine.async_engine import AsyncLLM
    from clusterfuse.serve.app import build_app

    t0 = time.monotonic()
    log.info("loading %s (device %s, dtype %s, backend %s); the engine then builds its kernels, tunes and "
             "captures its graphs before the server opens", args.model or "the embedded SmolLM2-135M-Instruct",
             args.device, args.dtype, args.backend)
    engine = AsyncLLM(args.model, device=args.device, dtype=args.dtype, backend=args.backend,
                      capacity=args.capacity, max_num_seqs=args.max_num_seqs, num_pages=args.num_pages,
                      seed=args.seed, progress=not args.quiet)
    name = args.served_model_name or engine.model_name
    stats = engine.stats()
    log.info("engine ready in %.1f s: %s backend, %d tokens per sequence, up to %d sequences at once, "
             "%d KV pages", time.monotonic() - t0, engine.backend, engine.capacity, args.max_num_seqs,
             stats.kv_pages_total)

    timeouts = {} if args.body_timeout is None else {"body_timeout_s": args.body_timeout}
    app = build_app(engine, name, max_request_bytes=args.max_request_bytes, **timeouts)
    config = uvicorn.Config(app, log_level="warning" if args.quiet else "info", access_log=not args.no_access_log,
                            timeout_graceful_shutdown=args.shutdown_timeout, lifespan="on",
                            limit_concurrency=args.max_connections)
    server = uvicorn.Server(config)
    host, port = sock.getsockname()[:2]

    async def announce() -> None:
        while not server.started and not server.should_exit:
            await asyncio.sleep(0.02)
        if server.started:
            # One line a script can wait for (the tests and bench/serve.py do): the port is listening.
            print(f"clusterfuse: ready: serving {name!r} at http://{host}:{port}/v1 (Ctrl-C to stop)",
                  file=sys.stderr, flush=True)

    _quiet_signals()
    announcer = asyncio.ensure_future(announce())
    await server.serve(sockets=[sock])
    announcer.cancel()
    if not server.started:  # uvicorn failed to start (it logged why)
        await engine.shutdown(drain=False)
        return 1
    log.info("shut down cleanly")
    return 0
