"""The call objects routed stubs return, shaped like grpcio's.

``hsu.connect``'s stubs return :class:`UnaryCall` (unary_unary,
stream_unary) and :class:`StreamCall` (unary_stream, stream_stream), which
are grpc.aio's call types (``isinstance(call, grpc.aio.UnaryUnaryCall)``
holds); ``hsu.connect_sync``'s ``with_call`` and ``future`` return a
:class:`SyncCall`, a ``grpc.Call`` and a ``grpc.Future``.

A routed call may take several tries (on other instances, see
:class:`hsu.client.route.Tries`, which runs them). A call object speaks for
the try that got through: its metadata, status code and details are that
try's, known once the call has ended (a stream's, once its first reply came:
no try is retried after a reply). A call that no instance took, or that was
cancelled before a try began, has empty metadata and the status code of the
error it raised (CANCELLED when cancelled).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from typing import Any

import grpc
import grpc.aio
from loguru import logger

#: what grpc says of a call the caller cancelled
CANCELLED_DETAILS = "Locally cancelled by application!"


def _empty() -> grpc.aio.Metadata:
    return grpc.aio.Metadata()


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


# -- asyncio ------------------------------------------------------------------------


class Requests:
    """A request stream fed by ``write()`` and ``done_writing()`` (a
    streaming call made without a request iterator, as in grpc.aio)."""

    _END = object()

    def __init__(self) -> None:
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=1)
        self._closed = False

    async def write(self, request: Any) -> None:
        if self._closed:
            raise grpc.aio.UsageError("write() after done_writing()")
        await self._queue.put(request)

    async def done_writing(self) -> None:
        if not self._closed:
            self._closed = True
            await self._queue.put(self._END)

    async def __aiter__(self) -> AsyncIterator[Any]:
        while (request := await self._queue.get()) is not self._END:
            yield request


class _AioCall:
    """What unary and streaming call objects share: the latest try's
    grpc.aio call (``attempt``), the deadline, the request writer."""

    def __init__(self, timeout: float | None, writer: Requests | None) -> None:
        #: the latest try's grpc.aio call (set by the stub's ``attempt``)
        self.attempt: Any = None
        #: set once a try began (made for ``wait_for_connection`` only)
        self._began: asyncio.Event | None = None
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._writer = writer

    def set_attempt(self, call: Any) -> None:
        """A try began: ``call`` is its grpc.aio call."""
        self.attempt = call
        if self._began is not None:
            self._began.set()

    async def _try_began(self) -> None:
        if self.attempt is None:
            if self._began is None:
                self._began = asyncio.Event()
            await self._began.wait()

    def time_remaining(self) -> float | None:
        return _remaining(self._deadline)

    async def write(self, request: Any) -> None:
        if self._writer is None:
            raise grpc.aio.UsageError("write() needs a call made without a request iterator")
        await self._writer.write(request)

    async def done_writing(self) -> None:
        if self._writer is None:
            raise grpc.aio.UsageError("done_writing() needs a call made without a request iterator")
        await self._writer.done_writing()

    # what the ended call says, from its error or its last try

    async def _initial(self, error: BaseException | None) -> grpc.aio.Metadata:
        if isinstance(error, grpc.RpcError) and hasattr(error, "initial_metadata"):
            return error.initial_metadata()
        return _empty() if self.attempt is None else await self.attempt.initial_metadata()

    async def _trailing(self, error: BaseException | None) -> grpc.aio.Metadata:
        if isinstance(error, grpc.RpcError) and hasattr(error, "trailing_metadata"):
            return error.trailing_metadata()
        return _empty() if self.attempt is None else await self.attempt.trailing_metadata()

    async def _code(self, error: BaseException | None) -> grpc.StatusCode:
        if isinstance(error, asyncio.CancelledError):
            return grpc.StatusCode.CANCELLED
        if isinstance(error, grpc.RpcError) and hasattr(error, "code"):
            code: grpc.StatusCode = error.code()
            return code
        if error is not None:
            return grpc.StatusCode.UNKNOWN
        if self.attempt is None:
            return grpc.StatusCode.OK
        code = await self.attempt.code()
        return code

    async def _details(self, error: BaseException | None) -> str:
        if isinstance(error, asyncio.CancelledError):
            return CANCELLED_DETAILS
        if isinstance(error, grpc.RpcError) and hasattr(error, "details"):
            return str(error.details() or "")
        if error is not None:
            return f"{type(error).__name__}: {error}"
        return "" if self.attempt is None else str(await self.attempt.details() or "")


class UnaryCall(_AioCall, grpc.aio.UnaryUnaryCall, grpc.aio.StreamUnaryCall):  # type: ignore[misc]
    """A routed call with one reply, like grpc.aio's: await it for the
    reply. It runs from the moment it is made, as grpc.aio's: in the task
    that awaits it when that happens at once (the common ``await
    stub.Method(...)``, which then costs no task of its own), else in a task
    started at the event loop's next turn."""

    def __init__(self, timeout: float | None, writer: Requests | None = None) -> None:
        super().__init__(timeout, writer)
        self._work: Any = None
        self._started = False
        self._cancelled = False
        self._task: asyncio.Task[Any] | None = None
        self._outcome: asyncio.Future[Any] | None = None

    def start(self, work: Any) -> UnaryCall:
        """Run ``work`` (the coroutine that steps through the tries)."""
        loop = asyncio.get_running_loop()
        self._work = work
        self._outcome = loop.create_future()
        loop.call_soon(self._kick)
        return self

    def _kick(self) -> None:
        """Not awaited by now: run in a task of its own."""
        if not self._started:
            self._started = True
            self._task = asyncio.ensure_future(self._run())
            self._task.add_done_callback(_retrieve)

    async def _run(self) -> Any:
        outcome = self._ended_future()
        try:
            result = await self._work
        except asyncio.CancelledError:
            outcome.cancel()
            raise
        except BaseException as exc:
            if not outcome.done():
                outcome.set_exception(exc)
                outcome.exception()  # seen: it is raised to whoever awaits the call
            raise
        if not outcome.done():
            outcome.set_result(result)
        return result

    def _ended_future(self) -> asyncio.Future[Any]:
        assert self._outcome is not None, "start() first"
        return self._outcome

    def __await__(self) -> Generator[Any, None, Any]:
        if not self._started:
            self._started = True
            return self._run().__await__()
        if self._task is not None:
            return self._task.__await__()
        return asyncio.shield(self._ended_future()).__await__()

    @property
    def is_cancelled(self) -> bool:
        return self._cancelled

    def done(self) -> bool:
        return self._ended_future().done()

    def cancelled(self) -> bool:
        return self._ended_future().cancelled()

    def cancel(self) -> bool:
        outcome = self._ended_future()
        if outcome.done():
            return False
        self._cancelled = True
        outcome.cancel()
        if self.attempt is not None:
            self.attempt.cancel()
        if self._task is not None:
            self._task.cancel()
        elif not self._started:  # never ran: it never will
            self._started = True
            self._work.close()
        return True

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        self._ended_future().add_done_callback(lambda _: callback(self))

    async def _ended(self) -> BaseException | None:
        outcome = self._ended_future()
        await asyncio.wait({outcome})
        return asyncio.CancelledError() if outcome.cancelled() else outcome.exception()

    async def initial_metadata(self) -> grpc.aio.Metadata:
        return await self._initial(await self._ended())

    async def trailing_metadata(self) -> grpc.aio.Metadata:
        return await self._trailing(await self._ended())

    async def code(self) -> grpc.StatusCode:
        return await self._code(await self._ended())

    async def details(self) -> str:
        return await self._details(await self._ended())

    async def wait_for_connection(self) -> None:
        outcome = self._ended_future()
        began = asyncio.ensure_future(self._try_began())
        try:
            await asyncio.wait({outcome, began}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            began.cancel()
        if self.attempt is not None and not outcome.done():
            await self.attempt.wait_for_connection()
        elif outcome.done() and not outcome.cancelled() and outcome.exception() is not None:
            raise outcome.exception()  # type: ignore[misc]


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark the task's error as seen (it is the call's: raised to whoever awaits it)."""
    if not task.cancelled():
        task.exception()


class StreamCall(_AioCall, grpc.aio.UnaryStreamCall, grpc.aio.StreamStreamCall):  # type: ignore[misc]
    """A routed call with a stream of replies, like grpc.aio's: iterate it
    (``async for``) or ``read()`` until :data:`grpc.aio.EOF`.

    Its tries run as it is read: ``initial_metadata()``, ``code()`` and the
    other status methods read the first reply ahead (and keep it for the
    next read) when none was read yet, since until then a try may still be
    retried on another instance."""

    def __init__(self, timeout: float | None, writer: Requests | None = None) -> None:
        super().__init__(timeout, writer)
        self._replies: Any = None
        self._ahead: list[Any] = []
        self._error: BaseException | None = None
        self._ended = False
        self._replied = False
        self._reading = False
        self._first = asyncio.Event()
        self._callbacks: list[Callable[[Any], None]] = []
        self._closing: asyncio.Task[None] | None = None

    def start(self, replies: Any) -> StreamCall:
        """Read from ``replies`` (the async generator that steps through the tries)."""
        self._replies = replies
        return self

    @property
    def is_cancelled(self) -> bool:
        return self._ended and isinstance(self._error, asyncio.CancelledError)

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        while (reply := await self.read()) is not grpc.aio.EOF:
            yield reply

    async def read(self) -> Any:
        if self._ahead:
            return self._ahead.pop()
        if self._ended:
            if self._error is not None:
                raise self._error
            return grpc.aio.EOF
        self._reading = True
        try:
            reply = await self._replies.__anext__()
        except StopAsyncIteration:
            self._end(None)
            return grpc.aio.EOF
        except BaseException as exc:
            self._end(exc)
            raise
        finally:
            self._reading = False
        self._replied = True
        self._first.set()
        return reply

    async def _settle(self) -> None:
        """Until a reply came or the call ended: the try is then the final one."""
        if self._replied or self._ended or self._ahead:
            return
        if self._reading:  # someone else reads: wait for what they get
            await self._first.wait()
            return
        try:
            reply = await self.read()
        except BaseException:  # kept as the call's error
            if not self._ended:
                raise
            return
        self._ahead.append(reply)

    def _end(self, error: BaseException | None) -> None:
        if self._ended:
            return
        self._ended = True
        self._error = error
        self._first.set()
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback(self)
            except Exception:
                logger.exception("hsu: a routed call's done callback failed")

    def done(self) -> bool:
        return self._ended

    def cancelled(self) -> bool:
        return self.is_cancelled

    def cancel(self) -> bool:
        if self._ended:
            return False
        if self.attempt is not None:
            self.attempt.cancel()
        self._end(asyncio.CancelledError())
        if not self._reading and self._replies is not None:
            # nobody is reading: close the tries (the route counts the end)
            self._closing = asyncio.ensure_future(self._replies.aclose())
        return True

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        if self._ended:
            callback(self)
        else:
            self._callbacks.append(callback)

    async def initial_metadata(self) -> grpc.aio.Metadata:
        await self._settle()
        return await self._initial(self._error)

    async def trailing_metadata(self) -> grpc.aio.Metadata:
        await self._settle()
        return await self._trailing(self._error)

    async def code(self) -> grpc.StatusCode:
        await self._settle()
        return await self._code(self._error)

    async def details(self) -> str:
        await self._settle()
        return await self._details(self._error)

    async def wait_for_connection(self) -> None:
        await self._settle()
        if self._error is not None:
            raise self._error


# -- blocking ------------------------------------------------------------------------


class SyncCall(grpc.Call, grpc.Future):  # type: ignore[misc]
    """A blocking routed call with one reply, from ``with_call`` and
    ``future``: a ``grpc.Call`` (its status methods wait for the end) and a
    ``grpc.Future``."""

    def __init__(self, deadline: float | None) -> None:
        self._lock = threading.Lock()
        self._finished = threading.Event()
        #: the latest try's grpc future (also a grpc.Call)
        self.attempt: Any = None
        self._deadline = deadline
        self._result: Any = None
        self._error: BaseException | None = None
        self._cancelled = False
        self._callbacks: list[Callable[[Any], None]] = []
        self._rpc_callbacks: list[Callable[[], None]] = []
        #: the tries, stepped through by :meth:`run` (one reply)
        self.replies: Iterator[Any] = iter(())

    # -- the tries' side --------------------------------------------------------

    def set_attempt(self, future: Any) -> None:
        """A try began (``future``: its grpc future); cancelled at once if the
        call was cancelled meanwhile. Raises FutureCancelledError if it was
        cancelled before."""
        with self._lock:
            cancelled = self._cancelled
            if not cancelled:
                self.attempt = future
        if cancelled:  # between the try's start and now: it goes too
            future.cancel()
            raise grpc.FutureCancelledError()

    def check(self) -> None:
        """Before a try: raise FutureCancelledError if the call was cancelled."""
        if self._cancelled:
            raise grpc.FutureCancelledError()

    def run(self, replies: Iterator[Any]) -> None:
        """Step through the tries (``replies``: one reply) and keep the outcome."""
        try:
            [reply] = replies
        except BaseException as exc:
            self._end(None, exc)
        else:
            self._end(reply, None)

    def _end(self, result: Any, error: BaseException | None) -> bool:
        with self._lock:
            if self._finished.is_set():
                return False
            self._result, self._error = result, error
            self._finished.set()
            callbacks, self._callbacks = self._callbacks, []
            rpc_callbacks, self._rpc_callbacks = self._rpc_callbacks, []
        for rpc_callback in rpc_callbacks:
            _safely(rpc_callback)
        for callback in callbacks:
            _safely(lambda cb=callback: cb(self))  # type: ignore[misc]
        return True

    # -- grpc.Future ------------------------------------------------------------

    def cancel(self) -> bool:
        with self._lock:
            if self._finished.is_set():
                return False
            self._cancelled = True
            attempt = self.attempt
        if attempt is not None:
            attempt.cancel()
        return self._end(None, grpc.FutureCancelledError())

    def cancelled(self) -> bool:
        return self._cancelled and self._finished.is_set()

    def running(self) -> bool:
        return not self._finished.is_set()

    def done(self) -> bool:
        return self._finished.is_set()

    def _wait(self, timeout: float | None) -> None:
        if not self._finished.wait(timeout):
            raise grpc.FutureTimeoutError()

    def result(self, timeout: float | None = None) -> Any:
        self._wait(timeout)
        if self._error is not None:
            raise self._error
        return self._result

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._wait(timeout)
        if self._cancelled:
            raise grpc.FutureCancelledError()
        return self._error

    def traceback(self, timeout: float | None = None) -> Any:
        error = self.exception(timeout)
        return None if error is None else error.__traceback__

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        with self._lock:
            if not self._finished.is_set():
                self._callbacks.append(fn)
                return
        fn(self)

    # -- grpc.Call (RpcContext) ----------------------------------------------------

    def is_active(self) -> bool:
        return not self._finished.is_set()

    def time_remaining(self) -> float | None:
        return _remaining(self._deadline)

    def add_callback(self, callback: Callable[[], None]) -> bool:
        with self._lock:
            if self._finished.is_set():
                return False
            self._rpc_callbacks.append(callback)
            return True

    def _from(self, name: str) -> Any:
        """The ended call's ``name`` (a grpc.Call method): from its error when
        that is an RPC error, else from its last try; None without either."""
        self._finished.wait()
        error = self._error
        if isinstance(error, grpc.RpcError) and hasattr(error, name):
            return getattr(error, name)()
        if self.attempt is not None:
            return getattr(self.attempt, name)()
        return None

    def initial_metadata(self) -> Any:
        return self._from("initial_metadata") or ()

    def trailing_metadata(self) -> Any:
        return self._from("trailing_metadata") or ()

    def code(self) -> grpc.StatusCode:
        self._finished.wait()
        if self._cancelled:
            return grpc.StatusCode.CANCELLED
        code = self._from("code")
        if code is None:
            return grpc.StatusCode.OK if self._error is None else grpc.StatusCode.UNKNOWN
        return code

    def details(self) -> str:
        self._finished.wait()
        if self._cancelled:
            return CANCELLED_DETAILS
        details = self._from("details")
        if details is None and self._error is not None:
            return f"{type(self._error).__name__}: {self._error}"
        return str(details or "")


def _safely(fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception:
        logger.exception("hsu: a routed call's callback failed")


class SyncStreamCall(grpc.Call):  # type: ignore[misc]
    """A blocking routed call with a stream of replies: an iterator of them
    and a ``grpc.Call``, as grpc's own. The status methods read the first
    reply ahead (kept for the next ``next()``) when none was read yet, since
    until then a try may still be retried on another instance; ``cancel()``
    cancels the try in flight, and the reader then gets grpc's CANCELLED
    error."""

    def __init__(self, deadline: float | None) -> None:
        self.attempt: Any = None
        self._deadline = deadline
        self._replies: Iterator[Any] = iter(())
        self._ahead: list[Any] = []
        self._reading = threading.Lock()  # one reader of the tries at a time
        self._lock = threading.Lock()
        self._ended = False
        self._replied = False
        self._error: BaseException | None = None
        self._cancelled = False
        self._callbacks: list[Callable[[], None]] = []

    def start(self, replies: Iterator[Any]) -> SyncStreamCall:
        self._replies = replies
        return self

    def set_attempt(self, call: Any) -> None:
        """A try began (``call``: its grpc call); cancelled at once if this
        call was cancelled meanwhile."""
        with self._lock:
            self.attempt = call
            cancelled = self._cancelled
        if cancelled:
            call.cancel()

    def __iter__(self) -> SyncStreamCall:
        return self

    def __next__(self) -> Any:
        with self._reading:
            if self._ahead:
                return self._ahead.pop()
            if self._ended:
                if self._error is not None:
                    raise self._error
                raise StopIteration
            try:
                reply = next(self._replies)
            except StopIteration:
                self._end(None)
                raise
            except BaseException as exc:
                self._end(exc)
                raise
            self._replied = True
            return reply

    def _settle(self) -> None:
        """Until a reply came or the call ended: the try is then the final one."""
        with self._reading:
            if self._replied or self._ended or self._ahead:
                return
        try:
            reply = next(self)
        except StopIteration:
            return
        except BaseException:
            if not self._ended:
                raise
            return
        with self._reading:
            self._ahead.append(reply)

    def _end(self, error: BaseException | None) -> None:
        with self._lock:
            if self._ended:
                return
            self._ended, self._error = True, error
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            _safely(callback)

    def cancel(self) -> bool:
        with self._lock:
            if self._ended:
                return False
            self._cancelled = True
            attempt = self.attempt
        if attempt is not None:
            attempt.cancel()
        return True

    def is_active(self) -> bool:
        return not self._ended

    def time_remaining(self) -> float | None:
        return _remaining(self._deadline)

    def add_callback(self, callback: Callable[[], None]) -> bool:
        with self._lock:
            if self._ended:
                return False
            self._callbacks.append(callback)
            return True

    def _from(self, name: str) -> Any:
        self._settle()
        error = self._error
        if isinstance(error, grpc.RpcError) and hasattr(error, name):
            return getattr(error, name)()
        if self.attempt is not None:
            return getattr(self.attempt, name)()
        return None

    def initial_metadata(self) -> Any:
        return self._from("initial_metadata") or ()

    def trailing_metadata(self) -> Any:
        return self._from("trailing_metadata") or ()

    def code(self) -> grpc.StatusCode:
        code = self._from("code")
        if code is None:
            return grpc.StatusCode.OK if self._error is None else grpc.StatusCode.UNKNOWN
        return code

    def details(self) -> str:
        details = self._from("details")
        if details is None and self._error is not None:
            return f"{type(self._error).__name__}: {self._error}"
        return str(details or "")
