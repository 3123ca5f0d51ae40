"""Token streams per request for asyncio code (an HTTP server): `AsyncEngine`.

The engine is not thread-safe, so one place alone touches it: a driver task
on the event loop. Requests, aborts and releases are queued and applied by the
driver between steps; each step runs in one dedicated worker thread, so the
event loop stays free for I/O while the model computes, and the step's tokens
go to one asyncio queue per request. One thread rather than a pool's: the
OpenMP team a step's kernels start belongs to the thread that starts it, so
steps from changing threads would keep several teams alive, the idle ones
spinning on the cores the running one needs.

Whatever else a caller wants to know is also taken between steps and kept
here, so it can be read at any time without touching the engine: `stats()`
is the engine's last stats snapshot, `info(seq_id)` a request's numbers.

    async with AsyncEngine(engine) as llm:
        seq_id = await llm.add_request(prompt_ids, SamplingParams(max_tokens=32))
        async for event in llm.stream(seq_id):
            print(event.token_id)
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from kvengine.engine.engine import Engine
from kvengine.engine.request import SamplingParams, Sequence, TokenEvent
from kvengine.errors import InvalidRequestError, KVEngineError

# What a request's queue holds: its tokens, then None once it ended without a
# last token (aborted), or the exception that stopped the engine.
_Item = TokenEvent | BaseException | None
_T = TypeVar("_T")


@dataclass
class RequestInfo:
    """What the engine reports about one request, as of the last step boundary.

    The driver updates it between steps, so read it on the event loop. It
    outlives the request: once its stream has ended, it keeps the last numbers
    (a stream closed before its last token ends the request as "abort").
    """

    seq_id: int
    num_cached_tokens: int = 0  # prompt tokens reused from the prefix cache at its last admission
    num_output_tokens: int = 0
    finish_reason: str | None = None  # once it ended: "stop", "length", "abort" or "error"


def _update_info(info: RequestInfo, seq: Sequence) -> None:
    info.num_cached_tokens = seq.num_cached_tokens
    info.num_output_tokens = len(seq.output_ids)
    info.finish_reason = seq.finish_reason


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
        self._infos: dict[int, RequestInfo] = {}
        self._stats = engine.stats()
        self._pending: list[tuple[Callable[[], list[int]], asyncio.Future[list[int]], bool]] = []
        self._aborts: list[int] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._error: BaseException | None = None
        self._worker: ThreadPoolExecutor | None = None

    async def _in_worker(self, fn: Callable[[], _T]) -> _T:
        """`fn()` in the engine's one worker thread (with the caller's context variables)."""
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvengine-step")
        call = functools.partial(contextvars.copy_context().run, fn)
        return await asyncio.get_running_loop().run_in_executor(self._worker, call)

    async def __aenter__(self) -> AsyncEngine:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._drive())

    async def close(self, *, close_engine: bool = False) -> None:
        """Abort what is unfinished and stop the driver (after the step in flight, if any).

        With `close_engine`, the engine is closed too once the driver has
        stopped (`Engine.close`: its storage tiers are flushed); for shutdown.
        """
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        if self._worker is not None:
            self._worker.shutdown(wait=True)  # idle: the driver has stopped
            self._worker = None
        if close_engine:
            self.engine.close()

    def add_public_prefix(self, token_ids: list[int]) -> None:
        """`Engine.add_public_prefix`; only before `start()`, while nothing steps the engine.

        Raises InvalidRequestError as the engine does, RuntimeError once started.
        """
        if self._task is not None:
            raise RuntimeError("public prefixes are added before the async engine starts")
        self.engine.add_public_prefix(token_ids)

    @property
    def state(self) -> str:
        """ "idle" before `start()`, "running", "closing" once `close()` began, "failed" if the driver died."""
        if self._error is not None:
            return "failed"
        if self._closing:
            return "closing"
        return "running" if self._task is not None else "idle"

    @property
    def error(self) -> BaseException | None:
        """What stopped the driver, if something did."""
        return self._error

    def stats(self) -> dict[str, float]:
        """`Engine.stats()` as of the last step boundary; never reads the engine itself.

        The driver takes a snapshot after each step and after applying queued
        requests and aborts, so the numbers are those of a whole step, never
        of one half applied.
        """
        return dict(self._stats)

    async def add_request(
        self, prompt_ids: list[int], params: SamplingParams | None = None, **kwargs: Any
    ) -> int:
        """Queue a request (arguments as `Engine.add_request`); returns its id once it is queued.

        Raises InvalidRequestError as `Engine.add_request` does, and
        RuntimeError if the engine is closed or stopped by an error.
        """
        prompt = list(prompt_ids)
        (seq_id,) = await self._queue(lambda: [self.engine.add_request(prompt, params, **kwargs)])
        return seq_id

    async def add_parallel(
        self, prompt_ids: list[int], params: list[SamplingParams], **kwargs: Any
    ) -> list[int]:
        """Queue one request per `params` on one prompt, prefilled once (`Engine.add_parallel`); their ids.

        Raises as `add_request` does; if one is refused, none is queued.
        """
        prompt = list(prompt_ids)
        return await self._queue(lambda: self.engine.add_parallel(prompt, list(params), **kwargs))

    async def add_with(self, add: Callable[[Engine], list[int]], *, in_thread: bool = False) -> list[int]:
        """Run `add(engine)` on the driver between steps; the ids of the requests it queued, streamed as any.

        For work on the engine that must never overlap a step (kvengine.rag
        assembles a cache with the model's own forward passes). With
        `in_thread`, it runs in a worker thread while the driver waits for it:
        the event loop stays free, and still no step runs meanwhile. Raises
        what `add` raises; if the caller goes away, the requests are aborted.
        """
        return await self._queue(lambda: add(self.engine), in_thread)

    async def _queue(self, add: Callable[[], list[int]], in_thread: bool = False) -> list[int]:
        """Run `add` on the driver, between steps; the ids it queued."""
        if self._closing or self._error is not None:
            raise RuntimeError("the async engine is closed") from self._error
        future: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self._pending.append((add, future, in_thread))
        self._wake.set()
        try:
            return await future
        except asyncio.CancelledError:
            # The caller went away. Queued still: the driver skips a cancelled future. Queued
            # already (the result came with the cancellation): nobody will stream them, abort them.
            if future.done() and not future.cancelled() and future.exception() is None:
                for seq_id in future.result():
                    self.abort(seq_id)
            raise

    def info(self, seq_id: int) -> RequestInfo:
        """The request's `RequestInfo`, kept up to date until its stream ends; take it before then.

        Raises InvalidRequestError if there is no such request, or its stream has ended.
        """
        info = self._infos.get(seq_id)
        if info is None:
            raise InvalidRequestError(f"no request {seq_id} (unknown, or streamed already)")
        return info

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
                if isinstance(
                    item, KVEngineError
                ):  # this request's own: bad input, or its own failure (StepError)
                    raise item
                if isinstance(item, BaseException):
                    raise RuntimeError("the engine stopped with an error") from item
                done = item.finished
                yield item
        finally:
            self._queues.pop(seq_id, None)
            info = self._infos.pop(seq_id, None)
            if not done:
                if info is not None and info.finish_reason is None:
                    info.finish_reason = "abort"  # what the caller saw; the engine aborts it next
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
                if await self._apply_queued():
                    self._stats = self.engine.stats()
                if self._closing:
                    break
                if not self.engine.has_unfinished():
                    await self._idle()
                    continue
                try:
                    events, self._stats = await self._in_worker(self._step)
                except Exception as exc:  # a bug below the engine's own error handling
                    self._fail_unfinished(exc)
                    continue
                self._after_step(events)
                if self.engine.last_step_size == 0:  # nothing can run: wait for news, do not spin
                    await self._idle()
        except Exception as exc:  # a broken engine: every stream must hear of it
            self._error = exc
            for queue in self._queues.values():
                queue.put_nowait(exc)
            raise
        finally:
            for seq_id in [s for s, seq in self.engine.sequences.items() if not seq.is_finished]:
                self._end(seq_id)
            if self._error is None:  # a broken engine may not report: keep the last snapshot
                self._stats = self.engine.stats()

    def _fail_unfinished(self, exc: Exception) -> None:
        """A step raised: every unfinished request fails with `exc`; the driver goes on.

        The engine ends the requests of a step that fails inside the forward
        pass itself (`Engine.step_errors`); this is the net below that. If the
        engine cannot even end its requests, or its blocks no longer add up,
        it is broken: the driver stops and `state` says "failed".
        """
        for seq_id, queue in self._queues.items():
            queue.put_nowait(exc)
            info = self._infos.get(seq_id)
            if info is not None:
                info.finish_reason = "error"
        for seq_id in [s for s, seq in self.engine.sequences.items() if not seq.is_finished]:
            self._end(seq_id)
        self.engine.check_invariants()  # AssertionError: broken, the driver stops
        self._stats = self.engine.stats()

    def _step(self) -> tuple[list[TokenEvent], dict[str, float]]:
        """One step and the stats right after it; runs in a worker thread."""
        events = self.engine.step()
        return events, self.engine.stats()

    async def _idle(self) -> None:
        self._wake.clear()
        if self._pending or self._aborts:  # queued while the driver awaited a step or a threaded add
            return
        await self._wake.wait()

    def _after_step(self, events: list[TokenEvent]) -> None:
        """Update request infos, hand out the step's tokens and errors, release what ended."""
        for seq_id, info in self._infos.items():
            seq = self.engine.sequences.get(seq_id)
            if seq is not None:
                _update_info(info, seq)
        for event in events:
            queue = self._queues.get(event.seq_id)
            if queue is not None:
                queue.put_nowait(event)
            if event.finished:
                self.engine.release(event.seq_id)
        for seq_id, error in self.engine.step_errors.items():  # only those requests fail
            queue = self._queues.get(seq_id)
            if queue is not None:
                queue.put_nowait(error)
            self.engine.release(seq_id)

    async def _apply_queued(self) -> bool:
        """Add queued requests and apply aborts, between steps; True if any."""
        pending, self._pending = self._pending, []
        for add, future, in_thread in pending:
            if future.cancelled():  # its caller went away while it was queued
                continue
            try:
                ids = await self._in_worker(add) if in_thread else add()
            except Exception as exc:
                if not future.cancelled():
                    future.set_exception(exc)
                continue
            if future.cancelled():  # its caller went away while it ran: nobody will stream them
                for seq_id in ids:
                    self._end(seq_id)
                continue
            for seq_id in ids:
                self._queues[seq_id] = asyncio.Queue()
                self._infos[seq_id] = RequestInfo(seq_id)
            future.set_result(ids)
        aborts, self._aborts = self._aborts, []
        for seq_id in aborts:
            self._end(seq_id)
        return bool(pending or aborts)

    def _end(self, seq_id: int) -> None:
        """Abort and release `seq_id` if the engine still has it; its stream ends."""
        if seq_id not in self.engine.sequences:
            return
        self.engine.abort(seq_id)
        seq = self.engine.release(seq_id)
        info = self._infos.get(seq_id)
        if info is not None:
            _update_info(info, seq)
        queue = self._queues.get(seq_id)
        if queue is not None:
            queue.put_nowait(None)
