"""`AsyncLLM`: the engine behind an asyncio server.

ONE background thread owns the `LLMEngine` and is the only thread that touches the model: it takes
commands (add, abort, shut down) from a queue, runs engine steps while any request is unfinished,
and hands each `RequestOutput` to its request's asyncio queue on the request's event loop
(``call_soon_threadsafe``). So the event loop never waits for a step, and steps never wait for the
event loop.

    llm = AsyncLLM()                                     # built like `LLM`
    async for out in llm.generate("Hello", SamplingParams(max_tokens=32)):
        print(out.delta_text, end="")
    await llm.shutdown(drain=True)

Closing a `generate` iterator early (a client that disconnects: ``aclose()``, or the consuming task
being cancelled) aborts the request, which frees its slot and pages at the engine's next command.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Sequence

from clusterfuse.engine.llm_engine import EngineFront, LLMEngine
from clusterfuse.engine.outputs import RequestOutput
from clusterfuse.engine.runtime import open_runtime
from clusterfuse.engine.sampling import SamplingParams

log = logging.getLogger("clusterfuse")


class EngineDeadError(RuntimeError):
    """The engine thread stopped on an error; every request still running gets this."""


class AsyncLLM(EngineFront):
    """See the module docstring. Built from a model like `LLM` (the constructor returns once the engine
    is fully built: kernels, graphs), or around an existing ``engine``. ``tokenizer``, ``model_name``,
    ``backend``, ``capacity``, ``stats``, ``apply_chat_template``, ``encode_chat``: see `EngineFront`."""

    def __init__(self, model: str | None = None, *, device: str = "auto", dtype: str = "auto",
                 backend: str = "auto", capacity: int | None = None, max_num_seqs: int = 16,
                 num_pages: int | None = None, seed: int | None = None, progress: bool = True,
                 engine: LLMEngine | None = None) -> None:
        if engine is None:
            engine = open_runtime(model, device=device, dtype=dtype, backend=backend, capacity=capacity,
                                  max_num_seqs=max_num_seqs, num_pages=num_pages, seed=seed,
                                  progress=progress).engine
        self.engine = engine
        self._commands: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()  # guards _streams
        self._ids = itertools.count()
        self._accepting = True
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="clusterfuse-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ requests
    async def generate(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """The outputs of one request as they come. A prompt or parameters that can never run raise
        ``ValueError`` at the first ``__anext__``, before anything is queued."""
        if self._error is not None:
            raise EngineDeadError(f"the engine stopped: {self._error!r}")
        if not self._accepting:
            raise RuntimeError("AsyncLLM is shutting down: no new requests")
        params = params or SamplingParams()
        ids = self.engine.encode_prompt(prompt)  # tokenising and checking touch no engine state
        self.engine.check_request(ids, params)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        outputs: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if rid in self._streams:
                raise ValueError(f"request_id: {rid!r} is already running")
            self._streams[rid] = (asyncio.get_running_loop(), outputs)
        self._commands.put(("add", rid, ids, params))
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
        finally:
            with self._lock:
                self._streams.pop(rid, None)
            if not finished:
                self._commands.put(("abort", rid))

    async def abort(self, request_id: str) -> None:
        """Abort a request (its iterator then ends with a ``"abort"`` output)."""
        self._commands.put(("abort", request_id))

    async def shutdown(self, drain: bool = True) -> None:
        """Stop taking requests; ``drain``: let the running and waiting ones finish, else abort them.
        Returns when the engine thread has ended."""
        self._accepting = False
        self._commands.put(("shutdown", drain))
        await asyncio.to_thread(self._thread.join)

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        stopping = False
        try:
            while True:
                idle = not self.engine.has_unfinished()
                if stopping and idle:
                    return
                for command in self._next_commands(block=idle):
                    stopping |= self._apply(command)
                if self.engine.has_unfinished():
                    self._dispatch(self.engine.step())
        except BaseException as e:  # a failed step: nobody may wait forever
            log.exception("the engine thread stopped")
            self._error = e
            self._accepting = False
            with self._lock:
                streams = list(self._streams.values())
            for loop, outputs in streams:
                self._post(loop, outputs, EngineDeadError(f"the engine stopped: {e!r}"))

    def _next_commands(self, block: bool) -> list[tuple]:
        commands = [self._commands.get()] if block else []
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _apply(self, command: tuple) -> bool:
        """Carry out one command; True for a shutdown."""
        kind = command[0]
        if kind == "add":
            _, rid, ids, params = command
            try:
                self.engine.add_request(rid, ids, params)
            except ValueError as e:  # e.g. an id still running: only this request fails
                self._dispatch_error(rid, e)
        elif kind == "abort":
            self.engine.abort_request(command[1])
        elif kind == "shutdown":
            if not command[1]:
                with self._lock:
                    rids = list(self._streams)
                for rid in rids:
                    self.engine.abort_request(rid)
            return True
        return False

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        with self._lock:
            targets = [(self._streams.get(out.request_id), out) for out in outputs]
        for target, out in targets:
            if target is not None:
                self._post(*target, out)

    def _dispatch_error(self, rid: str, error: BaseException) -> None:
        with self._lock:
            target = self._streams.get(rid)
        if target is not None:
            self._post(*target, error)

    @staticmethod
    def _post(loop: asyncio.AbstractEventLoop, outputs: asyncio.Queue, item: object) -> None:
        try:
            loop.call_soon_threadsafe(outputs.put_nowait, item)
        except RuntimeError:  # that event loop is closed: nobody is listening any more
            pass
