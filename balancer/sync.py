"""
The blocking facade: :class:`SyncBalancer` for threads, Celery and RQ workers.

Design:

* One :class:`~balancer.Balancer` runs on one event loop in one background
  thread, reached through an anyio blocking portal. Every public method is a
  call into that loop, so the balancer's own bookkeeping stays single-threaded
  and needs no lock; any number of threads may call in at once.
* ``acquire()`` blocks, then returns the :class:`~balancer.Lease` itself, made
  a plain context manager: ``with lb.acquire() as lease`` releases it on exit.
  The facade drives the balancer's scheduler through the documented internal
  interface :class:`balancer.lease.LeaseOwner`.
* A thread interrupted while it waits (``KeyboardInterrupt``, or any
  exception raised into it) abandons its request in the loop: a wait still in
  progress is cancelled, and a slot granted in the meantime is given back, so
  nothing leaks. This is done with a :class:`_Ticket` that only the loop thread
  touches, instead of cancelling the portal's future, because a future
  cancelled just as its task finished would drop the granted lease unseen.
* Closing fails every waiting ``acquire()`` with a :class:`~balancer.BalancerError`,
  stops the loop and joins its thread: no thread is left behind. A balancer
  still open when the interpreter exits is closed by an ``atexit`` hook, so a
  forgotten module-level balancer never hangs the exit.
* The loop thread does not survive ``fork()``: a balancer opened in a parent
  (a Celery prefork pool importing a module-level balancer) raises a
  :class:`~balancer.BalancerError` at once in the child, instead of waiting
  forever on a thread that the child does not have.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

import anyio
import structlog

from ._loop_thread import LoopThread
from .balancer import Balancer
from .errors import BalancerError, describe_error
from .lease import exit_outcome

if TYPE_CHECKING:
    from .lease import Lease, LeaseOwner
    from .sources import AccountSource
    from .statistics import BalancerStatistics

__all__ = ["SyncBalancer"]

T = TypeVar("T")

logger = structlog.get_logger("balancer")

#: How often a waiting thread checks for an exception raised into it from outside.
_INTERRUPT_CHECK_S = 0.2
#: How long an interrupted thread waits for its cancelled request to wind up.
_ABANDON_WAIT_S = 5.0


class _Ticket:
    """One thread's acquire request, as seen from the loop thread."""

    # Invariants: touched only in the loop thread. Once ``abandoned``, the
    # request never hands a lease to its thread: a wait in progress is
    # cancelled through ``scope``, and a lease already granted is released.
    # ``ended`` is set once the request's task has started and finished.

    __slots__ = ("abandoned", "ended", "lease", "scope")

    def __init__(self) -> None:
        self.abandoned = False
        self.scope: anyio.CancelScope | None = None
        self.lease: Lease | None = None
        self.ended: anyio.Event | None = None


class SyncBalancer:
    """
    A thread-safe, blocking :class:`~balancer.Balancer`.

    Takes the same arguments and behaves the same; it runs the balancer on an
    event loop in a background thread that starts on ``with`` (or
    :meth:`open`) and stops on exit (or :meth:`close`)::

        with SyncBalancer(UseapiAccountSource(token)) as lb:
            with lb.acquire(timeout=30) as lease:
                send_job(lease.channel, lease.account.discord.reveal())

    Any number of threads may call it at once. A thread waiting in
    :meth:`acquire` waits in arrival order with every other waiter; if it is
    interrupted (``KeyboardInterrupt``), its wait is cancelled and a slot
    granted meanwhile goes to the next waiter. Closing wakes every waiting
    thread with a :class:`~balancer.BalancerError` and joins the loop thread.

    Args:
        source: where the account map comes from (see :class:`~balancer.Balancer`).
        async_backend: the event loop to run on, ``"asyncio"`` or ``"trio"``.
        async_backend_options: options for that loop (see :func:`anyio.run`).
        **options: every keyword argument of :class:`~balancer.Balancer`
            (``backend``, ``ttl``, ``max_stale``, ``lease_ttl``, ``selection``,
            ``cooldown``, ``failures_to_cool``, ``seed``...).

    Raises:
        ValueError, TypeError: an argument is out of range or of the wrong type.
    """

    def __init__(
        self,
        source: AccountSource,
        *,
        async_backend: str = "asyncio",
        async_backend_options: dict[str, Any] | None = None,
        **options: Any,
    ) -> None:
        if async_backend not in ("asyncio", "trio"):
            raise ValueError("async_backend must be 'asyncio' or 'trio'")
        # Built here so that bad arguments raise in the caller's thread; anyio
        # primitives created outside a loop bind to it on first use.
        self._balancer = Balancer(source, **options)
        self._loop = LoopThread("SyncBalancer", async_backend, async_backend_options)
        self._owner: LeaseOwner = self._balancer.lease_owner
        # Makes this balancer's leases plain context managers (Lease.__enter__).
        self._owner.sync_releaser = self

    def __repr__(self) -> str:
        loop = getattr(self, "_loop", None)
        state = loop.state if loop is not None else "new"
        return f"<SyncBalancer {state} {getattr(self, '_balancer', None)!r}>"

    # -- lifecycle -----------------------------------------------------------

    def open(self) -> Self:
        """
        Start the loop thread and enter the balancer (the first fetch happens here).

        Raises:
            AuthError, SourceError, ...: the first fetch's error, unwrapped; the
                loop thread is stopped again before it propagates.
            RuntimeError: already opened.
        """
        self._loop.open(self._balancer)
        return self

    def close(self) -> None:
        """
        Close the balancer and stop its thread; waiting ``acquire()`` calls
        raise ``BalancerError``. Does nothing if already closed.
        """
        self._loop.close()

    def __enter__(self) -> Self:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- calls into the loop -------------------------------------------------

    def _call(self, func: Callable[..., Any], *args: Any) -> Any:
        return self._loop.call(func, *args)

    # -- acquire -------------------------------------------------------------

    def acquire(self, *, timeout: float | None = None, channel: str | None = None) -> Lease:
        """
        Take a slot, blocking until one is free; release it with :meth:`release`
        or use the :class:`~balancer.Lease` as a context manager (an exception
        leaving the block releases it as ``"failed"``).

        Same choice and waiting rules as :meth:`Balancer.acquire`: waiters are
        served in arrival order, across all threads. If the calling thread is
        interrupted while it waits, the wait is cancelled and any slot granted
        meanwhile is given back.

        Args:
            timeout: seconds to wait at most; ``None`` waits as long as it takes,
                ``0`` takes a free slot or fails at once.
            channel: pin the lease to this channel.

        Raises:
            NoCapacityError: nothing freed up within ``timeout``.
            NoAccountsError: no channel is configured, or ``channel`` is unknown
                or draining.
            BalancerError: the ``SyncBalancer`` was closed (or is closed while waiting).
            StaleAccountMapError, BackendUnavailableError: as for ``Balancer.acquire``.
        """
        # Validates the arguments in the caller's thread; never awaited.
        self._balancer.acquire(timeout=timeout, channel=channel)
        portal = self._loop.portal()
        ticket = _Ticket()
        future: Future[Lease | None] | None = None
        try:
            future = self._loop.submit(portal, self._acquire_for, ticket, timeout, channel)
            lease: Lease | None = _wait(future)
        except BaseException as exc:
            if future is None and isinstance(exc, BalancerError | RuntimeError):
                raise  # refused before anything was submitted
            if future is not None and future.done() and not future.cancelled():
                if future.exception() is exc:
                    raise  # the acquire itself failed: nothing to give back
            elif future is not None and future.cancelled() and isinstance(exc, CancelledError):
                raise BalancerError("the balancer was closed while waiting") from None
            # NOTE: interrupted while submitting or waiting. The loop may have
            # granted the lease by now; abandoning settles it there, in order.
            self._abandon(ticket)
            raise
        assert lease is not None  # only an abandoned request yields None
        return lease

    async def _acquire_for(
        self, ticket: _Ticket, timeout: float | None, channel: str | None
    ) -> Lease | None:
        """Run in the loop: acquire for a thread, unless it gave up meanwhile."""
        if ticket.abandoned:
            return None
        ticket.ended = anyio.Event()
        try:
            if self._loop.state != "open":
                raise BalancerError("the SyncBalancer is closed")
            with anyio.CancelScope() as scope:
                ticket.scope = scope
                lease = await self._owner.acquire_lease(timeout, channel)
                # NOTE: the thread may have given up while we waited; it no
                # longer reads the result, so the lease goes back.
            ticket.scope = None
            if scope.cancelled_caught:
                return None  # abandoned while waiting; the balancer gave back any grant
            if ticket.abandoned:
                await self._owner.release_lease(lease, "abandoned")
                return None
            ticket.lease = lease
            return lease
        finally:
            ticket.ended.set()

    async def _abandon_in_loop(self, ticket: _Ticket) -> None:
        """Run in the loop: cancel a thread's request and wait until it is wound up."""
        ticket.abandoned = True
        if ticket.scope is not None:
            ticket.scope.cancel()
        if ticket.ended is not None:
            # Not started yet: it will see ``abandoned`` and do nothing.
            await ticket.ended.wait()
        lease, ticket.lease = ticket.lease, None
        if lease is not None:
            await self._owner.release_lease(lease, "abandoned")

    def _abandon(self, ticket: _Ticket) -> None:
        if self._loop.forked():
            return
        portal = self._loop.portal_or_none()
        if portal is None:
            return  # closing: the balancer fails or reclaims every wait itself
        try:
            portal.start_task_soon(self._abandon_in_loop, ticket).result(_ABANDON_WAIT_S)
        except RuntimeError:
            return  # the portal stopped meanwhile: closing reclaimed everything
        except Exception as exc:  # noqa: BLE001 - the thread's interruption matters more
            logger.warning("acquire_abandon_failed", error=describe_error(exc))

    # -- release -------------------------------------------------------------

    def release(self, lease: Lease | str, outcome: str = "ok") -> None:
        """
        Give a lease's slot back and report how the job went.

        Same rules as :meth:`Balancer.release`: idempotent, ``"throttled"``
        cools the channel, ``lease`` may be the lease or its id.

        Raises:
            LeaseError: the lease belongs to another balancer, or (memory
                backend) the id was never issued here.
            BalancerError: the ``SyncBalancer`` is closed.
        """
        self._call(self._balancer.release, lease, outcome)

    def release_on_exit(self, lease: Lease, exc: BaseException | None) -> None:
        """What ``with lb.acquire() as lease`` calls on exit (:class:`balancer.lease.SyncReleaser`)."""
        outcome = exit_outcome(lease, exc)
        try:
            self._call(self._owner.release_lease, lease, outcome)
        except BalancerError:
            if exc is None:
                raise
            # Closing reclaimed the slot; the block's own error matters more.

    # -- the rest ------------------------------------------------------------

    def refresh(self) -> None:
        """
        Fetch the account map now, sharing a fetch already in progress.

        Raises:
            AuthError, ConfigNotFoundError, SourceError, AccountMapError: that
            fetch's error; the last good map stays in use.
        """
        self._call(self._balancer.refresh)

    def statistics(self) -> BalancerStatistics:
        """
        Return a snapshot of capacity and history (see :meth:`Balancer.statistics`).

        Taken in the loop thread while the balancer runs, so it is consistent;
        before opening and after closing it is read directly.
        """
        portal = self._loop.portal_or_none()
        if portal is None:
            return self._balancer.statistics()
        try:
            stats: BalancerStatistics = portal.call(self._balancer.statistics)
        except RuntimeError:  # stopped meanwhile: nothing else touches it now
            return self._balancer.statistics()
        return stats


def _wait(future: Future[T]) -> T:
    """
    Block until ``future`` is done and return its result (or raise its error).

    Waits in slices so that an exception raised into this thread from outside
    (``PyThreadState_SetAsyncExc``, as some job runners do for time limits) is
    seen promptly; in the main thread, a signal (Ctrl-C) interrupts at once.
    """
    while True:
        try:
            return future.result(timeout=_INTERRUPT_CHECK_S)
        except TimeoutError:
            # NOTE: NoCapacityError is a TimeoutError too: only a future still
            # pending means the slice ran out.
            if future.done():
                return future.result()
