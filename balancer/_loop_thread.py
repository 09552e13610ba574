"""
The event-loop thread behind :class:`~balancer.SyncBalancer`.

A :class:`LoopThread` runs one async context manager (the balancer) on an
anyio blocking portal in a background thread, and lets any thread call into
that loop. It owns what makes such a thread safe to forget about:

* **Interpreter exit.** Every loop thread still open is closed by an
  ``atexit`` hook. Without it, a module-level balancer nobody closed would hang
  the exit: the portal's cleanup waits for the balancer's task, which only
  ends when the balancer is closed.
* **fork().** A child process has no copy of the loop thread. A loop thread
  opened in the parent raises :class:`~balancer.BalancerError` at once in the
  child (Celery's prefork pool forks after importing a module-level balancer)
  instead of waiting forever on a thread that is not there.
"""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import AbstractContextManager
from typing import Any

import structlog
from anyio.from_thread import BlockingPortal, start_blocking_portal

from .errors import BalancerError, describe_error

__all__ = ["LoopThread"]

logger = structlog.get_logger("balancer")

#: Every loop thread open in this process, closed by :func:`_close_at_exit`.
#: Strong references: an open loop thread is running, and collecting it
#: unclosed would run the portal's cleanup (which waits on that thread) in
#: whichever thread the garbage collector happens to run.
_OPEN: set[LoopThread] = set()
_OPEN_LOCK = threading.Lock()


class LoopThread:
    """One event loop in one background thread, running one async context manager."""

    # Invariants: ``_portal`` is set exactly while ``_state == "open"`` in the
    # process that opened it (``_pid``); a thread is in ``_OPEN`` while open.

    def __init__(self, name: str, async_backend: str, options: dict[str, Any] | None) -> None:
        self._name = name
        self._async_backend = async_backend
        self._options = options
        self._lock = threading.Lock()
        self._portal_cm: AbstractContextManager[BlockingPortal] | None = None
        self._portal: BlockingPortal | None = None
        self._inner_cm: AbstractContextManager[Any] | None = None
        self._pid = os.getpid()
        self.state = "new"  # -> "opening" -> "open" -> "closing" -> "closed"

    def open(self, inner: Any) -> None:
        """
        Start the thread and enter ``inner`` (an async context manager) in it.

        Raises:
            whatever entering ``inner`` raises, once the thread has stopped again.
            RuntimeError: already opened.
        """
        with self._lock:
            if self.state != "new":
                raise RuntimeError(f"a {self._name} can be opened once")
            self.state = "opening"
        portal_cm = start_blocking_portal(self._async_backend, self._options, name="balancer-sync")
        portal = portal_cm.__enter__()
        inner_cm = portal.wrap_async_context_manager(inner)
        try:
            inner_cm.__enter__()
        except BaseException as exc:
            with self._lock:
                self.state = "closed"
            portal_cm.__exit__(type(exc), exc, exc.__traceback__)
            raise
        with self._lock:
            self._portal_cm, self._portal, self._inner_cm = portal_cm, portal, inner_cm
            self._pid = os.getpid()
            self.state = "open"
        with _OPEN_LOCK:
            _OPEN.add(self)

    def close(self) -> None:
        """Leave ``inner`` and stop the thread; does nothing unless open."""
        if self.forked():
            # NOTE: in a forked child the loop thread is the parent's; there is
            # nothing here to stop (and a lock held at fork time stays held).
            self.state, self._portal = "closed", None
            return
        with self._lock:
            if self.state != "open":
                if self.state == "new":
                    self.state = "closed"
                return
            self.state = "closing"
            portal_cm, inner_cm = self._portal_cm, self._inner_cm
            self._portal_cm = self._inner_cm = None
        with _OPEN_LOCK:
            _OPEN.discard(self)
        assert portal_cm is not None and inner_cm is not None
        try:
            inner_cm.__exit__(None, None, None)
        finally:
            with self._lock:
                self._portal = None
                self.state = "closed"
            portal_cm.__exit__(None, None, None)

    def forked(self) -> bool:
        """Whether this is a child forked after the thread was opened."""
        return os.getpid() != self._pid

    def check_process(self) -> None:
        if self.forked():
            raise BalancerError(
                f"this {self._name} was opened in the parent process and cannot be used "
                "after fork(): open a new one in each child (e.g. in Celery's "
                "worker_process_init signal)"
            )

    def portal(self) -> BlockingPortal:
        """The running portal; raises when not open (or in a forked child)."""
        self.check_process()
        with self._lock:
            portal = self._portal
            if self.state == "open" and portal is not None:
                return portal
        if self.state in ("new", "opening"):
            raise RuntimeError(f"enter the balancer first: `with {self._name}(...) as lb:`")
        raise BalancerError(f"the {self._name} is closed")

    def portal_or_none(self) -> BlockingPortal | None:
        """The portal while open, else ``None`` (never raises but in a forked child)."""
        self.check_process()
        with self._lock:
            return self._portal

    def submit(self, portal: BlockingPortal, func: Callable[..., Any], *args: Any) -> Future[Any]:
        try:
            return portal.start_task_soon(func, *args)
        except RuntimeError:
            if self.state == "open":
                raise  # called from the loop thread itself: a programming error
            raise BalancerError(f"the {self._name} is closed") from None

    def call(self, func: Callable[..., Any], *args: Any) -> Any:
        """Run ``func(*args)`` (sync or async) in the loop and wait for its result."""
        return self.submit(self.portal(), func, *args).result()


def _forget_after_fork() -> None:
    """In a forked child: the parent's loop threads are not ours to close."""
    global _OPEN_LOCK
    _OPEN.clear()
    _OPEN_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)


@atexit.register
def _close_at_exit() -> None:
    """Close every loop thread still open when the interpreter exits."""
    with _OPEN_LOCK:
        still_open = list(_OPEN)
    for loop in still_open:
        try:
            loop.close()
        except Exception as exc:  # noqa: BLE001 - exiting: log and go on with the others
            logger.warning("balancer_close_failed", error=describe_error(exc))
