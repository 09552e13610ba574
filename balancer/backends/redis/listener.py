"""
The background tasks of :class:`~balancer.backends.redis.RedisBackend`.

Design notes:

* **Wake-ups**: scripts publish on ``{namespace}:wake`` when a slot frees, a
  cooldown ends or the map grows; the listener task calls ``notify`` on each
  message, and reconnects (then resynchronises and notifies) after a failure.
  The balancer's fallback poll and ``RedisBackend.next_wakeup`` (the next
  cooldown end, or the next lease expiry that may free a dead holder's slot)
  cover lost messages.
* The checker task runs a sync each time the listener asks: after a
  reconnection (messages may have been missed, and Redis may have lost its
  data) and when another process announces a new epoch (``"e"``), so this
  process re-asserts its leases at once.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel

from ...errors import BackendUnavailableError

if TYPE_CHECKING:
    from anyio.abc import TaskGroup, TaskStatus

    from .client import ScriptClient

__all__ = ["Listener"]

#: Seconds between reconnection attempts of the listener (doubling up to the max).
_BACKOFF_MIN, _BACKOFF_MAX = 0.05, 0.5


class Listener:
    """
    The listener and checker tasks of one opened backend.

    Args:
        client: the client to subscribe with (kept for the listener's life).
        channel: the pub/sub channel of wake-ups.
        notify: the balancer's callback, called on every wake-up.
        sync: one sync round trip, run by the checker.
        down: records a client failure (the backend logs the transition once).
    """

    def __init__(
        self,
        client: ScriptClient,
        channel: str,
        *,
        notify: Callable[[], None],
        sync: Callable[[], Awaitable[None]],
        down: Callable[[BaseException], None],
        owed: Callable[[], bool] = lambda: False,
    ) -> None:
        self._client = client
        self._channel = channel
        self._notify = notify
        self._sync = sync
        self._down = down
        self._owed = owed
        self._check = anyio.Event()
        self._scopes: list[anyio.CancelScope] = []
        self._background = 0  # background tasks still running
        self._idle = anyio.Event()  # set when _background drops to 0

    async def start(self, task_group: TaskGroup) -> None:
        """Start both tasks; fails if the first subscription does."""
        await task_group.start(self._listen)
        task_group.start_soon(self._checker)

    async def stop(self) -> None:
        """Cancel both tasks and give the listener a moment to unsubscribe."""
        scopes, self._scopes = self._scopes, []
        for scope in scopes:
            scope.cancel()
        # NOTE: let the listener unsubscribe before its client goes away.
        if self._background:
            with anyio.move_on_after(1.0, shield=True):
                await self._idle.wait()
        self._notify = _noop  # a task that outlived the wait must not call the balancer

    async def _listen(self, *, task_status: TaskStatus[None]) -> None:
        """
        Call ``notify`` on every wake-up message; reconnect after failures.

        After a reconnection messages may have been missed and Redis may have
        lost its data: the checker task resynchronises, then notifies.
        """
        started = False
        backoff = _BACKOFF_MIN

        def on_ready() -> None:
            nonlocal started, backoff
            backoff = _BACKOFF_MIN
            if started:
                self._check.set()
            else:
                started = True
                task_status.started()

        def on_message(data: bytes) -> None:
            if data == b"e":  # another process created a new epoch: re-assert ours
                self._check.set()
            self._notify()

        with anyio.CancelScope() as scope, self._running():
            self._scopes.append(scope)
            while True:
                try:
                    await self._client.listen(self._channel, on_ready, on_message)
                except BackendUnavailableError as exc:
                    if not started:
                        raise
                    if anyio.current_effective_deadline() == -math.inf:
                        # NOTE: we are being cancelled and the client was torn
                        # down under us: no fault, let the cancellation through.
                        await anyio.lowlevel.checkpoint()
                        return
                    self._down(exc)
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)

    @contextlib.contextmanager
    def _running(self) -> Iterator[None]:
        if not self._background:
            self._idle = anyio.Event()
        self._background += 1
        try:
            yield
        finally:
            self._background -= 1
            if not self._background:
                self._idle.set()

    def settle_soon(self) -> None:
        """Run a sync now: a grant in doubt or a failed release is owed to the server."""
        self._check.set()

    async def _checker(self) -> None:
        """
        Run a sync each time it is asked: a reconnection, a new epoch, or a
        release owed to the server (a grant in doubt, a release that failed),
        which is retried with backoff until Redis takes it, so a slot nobody
        holds comes back at once instead of at the next renewal round.
        """
        backoff = _BACKOFF_MIN
        with anyio.CancelScope() as scope, self._running():
            self._scopes.append(scope)
            while True:
                await self._check.wait()
                self._check = anyio.Event()
                try:
                    await self._sync()
                except (BackendUnavailableError, RuntimeError):
                    if self._owed():
                        await anyio.sleep(backoff)
                        backoff = min(backoff * 2, _BACKOFF_MAX)
                        self._check.set()
                    continue  # else the listener asks again after its next reconnection
                backoff = _BACKOFF_MIN
                self._notify()


def _noop() -> None:
    pass
