"""
The scheduler for a backend reached by round trips (Redis).

One dispatcher (the wake loop) serves this process's waiters in arrival order,
one round trip each, when a release, a pub/sub message, a map change or a
cooldown says capacity may be there, and at least every ``poll_interval``
while anyone waits, so a lost message strands nobody.

Every round trip that can grant is shielded from cancellation: a grant that
lands while its caller is being cancelled is known, and given back at once,
instead of being left in Redis for an id nobody holds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel
import structlog

from ..errors import BackendUnavailableError, describe_error
from .base import Scheduler

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from .._types import ReleaseOutcome
    from ..backends.base import ReleaseResult
    from ..lease import Lease

__all__ = ["RemoteScheduler"]

logger = structlog.get_logger("balancer")


class RemoteScheduler(Scheduler):
    """A dispatcher task serves the waiters; a renewal task keeps leases alive."""

    #: seqs of callers whose first attempt is in flight, oldest first
    _attempts: dict[int, None]

    def prepare(self) -> None:
        super().prepare()
        self._attempts = {}

    def start(self, task_group: TaskGroup) -> None:
        super().start(task_group)
        if self._lease_ttl is not None:
            task_group.start_soon(self._renew_loop, self._lease_ttl / 3)

    # -- acquire -----------------------------------------------------------

    async def acquire_lease(self, timeout: float | None, channel: str | None) -> Lease:
        self._precheck(channel)
        # The place in line is taken now, at the call: an attempt that fails
        # queues ahead of every caller that came later, whenever its round
        # trip returns (see WaitQueue.reserve).
        seq = self.waiters.reserve()
        if self.waiters.ahead_of(channel):
            return await self._wait(timeout, channel, seq)
        started = anyio.current_time()
        self._attempts[seq] = None
        try:
            lease = await self._take(channel)
        finally:
            del self._attempts[seq]
            if self.waiters:
                self._wake.set()  # the dispatcher may have paused for this attempt
        if lease is not None:
            return lease
        if timeout is not None:
            # The attempt counts against the timeout, like the wait.
            timeout = max(0.0, started + timeout - anyio.current_time())
            if timeout == 0:
                raise self._no_capacity(0, channel)
        return await self._wait(timeout, channel, seq)

    async def _take(self, channel: str | None) -> Lease | None:
        """One attempt at a slot; ``None`` when nothing is free."""
        lease_id = self.book.new_id()
        got = await self._round_trip(lease_id, channel)
        if got is None:
            return None
        info = self.table.infos.get(got) if got in self.table.accounts else None
        if info is None:
            # A shared backend granted a channel of another process's map that
            # ours lacks (one of us is a refresh behind); without its account we
            # cannot dispatch to it, so give it back.
            await self._give_back(lease_id)
            return None
        return self._issue(lease_id, info)

    async def _round_trip(self, lease_id: str, channel: str | None) -> str | None:
        # NOTE: the round trip is shielded so a cancellation cannot cut it at a
        # point where the grant happened but nobody knows of it; if we were
        # cancelled meanwhile, the slot is given back before the cancellation
        # goes on. Neither can the acquire's timeout: an attempt, once sent, is
        # bounded by the backend's own operation timeout (a timeout of 0 makes
        # one attempt; it never turns a healthy backend into an error). When
        # that timeout cuts it, the backend holds the grant as in doubt and
        # gives it back itself.
        with anyio.CancelScope(shield=True):
            got = await self.backend.try_acquire(lease_id, channel)
        try:
            await anyio.lowlevel.checkpoint_if_cancelled()
        except BaseException:
            if got is not None:
                await self._give_back(lease_id)
            raise
        return got

    async def _give_back(self, lease_id: str) -> None:
        with anyio.CancelScope(shield=True):
            try:
                await self.backend.release(lease_id, "abandoned")
            except BackendUnavailableError as exc:
                logger.warning("lease_release_failed", lease_id=lease_id, error=describe_error(exc))

    def _enqueued(self) -> None:
        self._wake.set()

    async def map_applied(self, removed: list[str]) -> None:
        # NOTE: the dispatcher serves, not this task: one server of the queue
        # keeps round trips, and so grants, in arrival order.
        self._fail_unservable(removed)
        self._wake.set()

    async def serve(self) -> None:
        """
        Serve waiters oldest first, one round trip each, until nothing more fits.

        A failed attempt for an unpinned waiter means nothing is free anywhere;
        for a pinned one, only that its channel is full.
        """
        skip: set[str] = set()
        while (waiter := self.waiters.oldest(False, skip)) is not None:
            if self._attempts and next(iter(self._attempts)) < waiter.seq:
                # NOTE: an older caller's first attempt is still in flight; if
                # it fails, it queues ahead of this waiter. Its end wakes us.
                return
            lease = await self._take(waiter.channel)
            # NOTE: the waiter may have timed out or been cancelled during the
            # round trip; then the slot goes back.
            if waiter.done:
                if lease is not None:
                    await self.release_lease(lease, "abandoned")
                continue
            if lease is not None:
                self.grant(waiter, lease)
            elif waiter.channel is None:
                return
            else:
                skip.add(waiter.channel)

    # -- release -----------------------------------------------------------

    async def release_lease(self, lease: Lease, outcome: ReleaseOutcome) -> None:
        if self._already_released(lease):
            return
        try:
            with anyio.CancelScope(shield=True):
                result = await self.backend.release(lease.id, outcome)
        except BackendUnavailableError as exc:
            # The backend retries the release with its next renewal and stops
            # renewing the lease, so its slot comes back at the latest within
            # lease_ttl; raising here would mask the job's own error.
            logger.warning("lease_release_failed", lease_id=lease.id, error=describe_error(exc))
            return
        self._finish_release(lease, outcome, result)

    def _slot_freed(self, result: ReleaseResult) -> None:
        self._wake.set()

    # -- background --------------------------------------------------------

    def _wake_delay(self) -> float | None:
        delay = self.backend.next_wakeup()
        if self.waiters:
            delay = self._poll_interval if delay is None else min(delay, self._poll_interval)
        return delay

    async def _renew_loop(self, interval: float) -> None:
        while True:
            await anyio.sleep(interval)
            try:
                result = await self.backend.renew()
            except BackendUnavailableError:
                continue
            for lease_id in result.lost:
                lease = self.book.forget(lease_id, lost=True)
                if lease is not None:
                    logger.warning("lease_lost", lease_id=lease_id, channel=lease.channel)
            for lease_id in result.released:
                self.book.forget(lease_id, lost=False)
            # Releases that failed while the backend was down, completed now.
            self.book.released_total += len(result.completed)
