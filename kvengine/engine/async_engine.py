"""Token streams per request for asyncio code (an HTTP server): `AsyncEngine`.

The engine is not thread-safe, so one place alone touches it: a driver task
on the event loop. Requests, aborts and releases are queued and applied by the
driver between steps; each step runs in a worker thread (`asyncio.to_thread`),
so the event loop stays free for I/O while the model computes, and the
step's tokens go to one asyncio queue per request.

    async with AsyncEngine(engine) as llm:
        seq_id = await llm.add_request(prompt_ids, SamplingParams(max_tokens=32))
        async for event in llm.stream(seq_id):
            print(event.token_id)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from typing import Any

from kvengine.engine.engine import Engine, TokenEvent
from kvengine.engine.request import SamplingParams
from kvengine.errors import InvalidRequestError, KVEngineError

# What a request's queue holds: its tokens, then None once it ended without a
# last token (aborted), or the exception that stopped the engine.
_Item = TokenEvent | BaseException | None


class AsyncEngine:
    """Drives an `Engine` from a background task; streams each request's tokens.

    Use it inside a running event loop, as an async context manager (or
    `start()` and `close()`). A finished request is released from the engine
    as soon as its last token is queued. Closing a stream before its last token
    aborts the request, which frees its blocks at the next step boundary.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._queues: dict[int, asyncio.Queue[_Item]] = {}
        self._pending: list[tuple[list[int], SamplingParams | None, dict[str, Any], asyncio.Future[int]]] = []
        self._aborts: list[int] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._error: BaseException | None = None

    async def __aenter__(self) -> AsyncEngine:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._drive())

    async def close(self) -> None:
        """Abort what is unfinished and stop the driver (after the step in flight, if any)."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def add_request(
        self, prompt_ids: list[int], params: SamplingParams | None = None, **kwargs: Any
    ) -> int:
        """Queue a request (arguments as `Engine.add_request`); returns its id once it is queued.

        Raises InvalidRequestError as `Engine.add_request` does, and
        RuntimeError if the engine is closed or stopped by an error.
        """
        if self._closing or self._error is not None:
            raise RuntimeError("the async engine is closed") from self._error
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append((list(prompt_ids), params, kwargs, future))
        self._wake.set()
        return await future

    def abort(self, seq_id: int) -> None:
        """Stop a request at the next step boundary; its stream then ends."""
        self._aborts.append(seq_id)
        self._wake.set()

    async def stream(self, seq_id: int) -> AsyncGenerator[TokenEvent, None]:
        """The request's tokens as they are produced; the last one has `finished` set.

        Ends early (without a finished event) if the request is aborted.
        Closing the iterator before the end aborts the request.
        """
        queue = self._queues.get(seq_id)
        if queue is None:
            raise InvalidRequestError(f"no request {seq_id} to stream (unknown, or streamed already)")
        done = False
        try:
            while not done:
                item = await queue.get()
                if item is None:
                    return
                if isinstance(item, KVEngineError):  # this request's own bad input
                    raise item
                if isinstance(item, BaseException):
                    raise RuntimeError("the engine stopped with an error") from item
                done = item.finished
                yield item
        finally:
            self._queues.pop(seq_id, None)
            if not done:
                self.abort(seq_id)

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams | None = None, **kwargs: Any
    ) -> AsyncGenerator[TokenEvent, None]:
        """`add_request`, then `stream` its tokens."""
        seq_id = await self.add_request(prompt_ids, params, **kwargs)
        # aclosing: closing this iterator closes the stream at once, which aborts the request.
        async with contextlib.aclosing(self.stream(seq_id)) as events:
            async for event in events:
                yield event

    # ---- the driver: the only code that touches the engine ------------------

    async def _drive(self) -> None:
        try:
            while True:
                self._apply_queued()
                if self._closing:
                    break
                if not self.engine.has_unfinished():
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                events = await asyncio.to_thread(self.engine.step)
                for event in events:
                    self._deliver(event)
                for seq_id, error in self.engine.step_errors.items():  # only those requests fail
                    queue = self._queues.get(seq_id)
                    if queue is not None:
                        queue.put_nowait(error)
                    self.engine.release(seq_id)
                if self.engine.last_step_size == 0:  # nothing can run: wait for news, do not spin
                    self._wake.clear()
                    await self._wake.wait()
        except Exception as exc:  # a bug or an exhausted resource: every stream must hear of it
            self._error = exc
            for queue in self._queues.values():
                queue.put_nowait(exc)
            raise
        finally:
            for seq_id in [s for s, seq in self.engine.sequences.items() if not seq.is_finished]:
                self._end(seq_id)

    def _apply_queued(self) -> None:
        """Add queued requests and apply aborts; runs between steps, on the event loop."""
        pending, self._pending = self._pending, []
        for prompt_ids, params, kwargs, future in pending:
            try:
                seq_id = self.engine.add_request(prompt_ids, params, **kwargs)
            except Exception as exc:
                future.set_exception(exc)
                continue
            self._queues[seq_id] = asyncio.Queue()
            future.set_result(seq_id)
        aborts, self._aborts = self._aborts, []
        for seq_id in aborts:
            self._end(seq_id)

    def _deliver(self, event: TokenEvent) -> None:
        queue = self._queues.get(event.seq_id)
        if queue is not None:
            queue.put_nowait(event)
        if event.finished:
            self.engine.release(event.seq_id)

    def _end(self, seq_id: int) -> None:
        """Abort and release `seq_id` if the engine still has it; its stream ends."""
        seq = self.engine.sequences.get(seq_id)
        if seq is None:
            return
        self.engine.abort(seq_id)
        self.engine.release(seq_id)
        queue = self._queues.get(seq_id)
        if queue is not None:
            queue.put_nowait(None)
