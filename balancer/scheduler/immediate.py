"""
The scheduler for a backend that never suspends (the memory backend).

Every backend call completes without an await, so a release hands its slot to
the oldest waiter that can use it before it returns: nobody can take the slot
in between and nobody else is woken (no stampede). Waiters are still served
first come, first served; a newcomer never passes one that could use the
channel it would take.

NOTE: an uncontended ``acquire()`` here is **not a checkpoint**: a free slot is
taken with no trip through the event loop and no cancellation check (like
anyio's ``CapacityLimiter(fast_acquire=True)``). A task that loops over
``acquire``/``release`` with free capacity and nothing else that awaits never
yields to other tasks; add ``await anyio.lowlevel.checkpoint()`` in such a loop.
Waiting for a slot is a checkpoint like any other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from ..channels import ChannelInfo
from .base import Scheduler

if TYPE_CHECKING:
    from collections.abc import Mapping

    from .._types import ReleaseOutcome
    from ..backends.base import ChannelCounts, ImmediateBackend, ReleaseResult
    from ..channels import MapChange
    from ..lease import Lease

__all__ = ["ImmediateScheduler"]


class ImmediateScheduler(Scheduler):
    """In-place hand-off: a release serves the oldest waiter before it returns."""

    _now: ImmediateBackend
    _serving: bool

    # Invariants (beyond Scheduler's): ``_serving`` is True only inside
    # ``_serve_now``; a backend notification during it (a cooldown that ended
    # while an acquire picked) is served by that same loop.

    def prepare(self) -> None:
        super().prepare()
        self._now = cast("ImmediateBackend", self.backend)
        self._serving = False

    def notify(self) -> None:
        self._wake.set()
        # NOTE: the backend notifies from inside its own operations (a cooldown
        # found over during an acquire). Serving the waiters right here, before
        # that acquire picks, keeps a newcomer from taking a slot an older
        # waiter was queued for.
        if self.waiters and not self._serving:
            self._serve_now()

    async def acquire_lease(self, timeout: float | None, channel: str | None) -> Lease:
        self._precheck(channel)
        # NOTE: a free slot is taken without a checkpoint (see the module
        # docstring): the cheapest acquire is the one that does not yield.
        if not self.waiters.ahead_of(channel):
            lease_id = self.book.new_id()
            got = self._now.acquire_tag_nowait(lease_id, channel)
            if type(got) is ChannelInfo:
                return self._issue(lease_id, got)
            if got is not None:  # an untagged channel: its id
                return self._issue(lease_id, self.table.infos[cast(str, got)])
            if timeout == 0:
                raise self._no_capacity(0, channel)
        return await self._wait(timeout, channel)

    async def serve(self) -> None:
        self._serve_now()

    def _enqueued(self) -> None:
        pass  # releases and notifications serve the queue in place

    def _serve_now(self) -> None:
        """Serve waiters oldest first without suspending, until nothing more fits."""
        skip: set[str] = set()
        self._serving = True
        try:
            while (waiter := self.waiters.oldest(False, skip)) is not None:
                lease_id = self.book.new_id()
                got = self._now.acquire_nowait(lease_id, waiter.channel)
                if got is not None:
                    self.grant(waiter, self._issue(lease_id, self.table.infos[got]))
                elif waiter.channel is None:
                    return  # nothing is free anywhere
                else:
                    skip.add(waiter.channel)  # only that channel is full
        finally:
            self._serving = False

    async def release_lease(self, lease: Lease, outcome: ReleaseOutcome) -> None:
        self.release_now(lease, outcome)

    def release_now(self, lease: Lease, outcome: ReleaseOutcome) -> None:
        """Release without suspending, handing the slot over."""
        if self._already_released(lease):
            return
        if self.waiters and outcome == "ok" and self._transfer(lease):
            return
        self._finish_release(lease, outcome, self._now.release_nowait(lease.id, outcome))

    def _transfer(self, lease: Lease) -> bool:
        # NOTE: direct transfer: the slot stays counted and moves to the oldest
        # waiter that can use it, with no trip through the free index. The
        # backend refuses when the channel may not grant (draining, cooling,
        # over a lowered max_jobs).
        waiter = self.waiters.oldest_for(lease.channel)
        if waiter is None:
            return False
        new_id = self.book.new_id()
        if not self._now.transfer_nowait(lease.id, new_id):
            return False
        self.book.released_total += 1
        if self._debug:
            self._log.debug(
                "lease_released", channel=lease.channel, lease_id=lease.id, outcome="ok"
            )
        self.grant(waiter, self._issue(new_id, self.table.infos[lease.channel]))
        return True

    def _slot_freed(self, result: ReleaseResult) -> None:
        # The freed slot goes to the oldest waiter that can use it; the same
        # loop also serves anyone a cooldown that just ended unblocked.
        if result.status == "released" and not self._serving:
            self._serve_now()

    async def set_map(self, change: MapChange) -> Mapping[str, ChannelCounts]:
        counts = await super().set_map(change)
        if change.added:
            infos = self.table.infos
            self._now.set_tags({channel: infos[channel] for channel in change.added})
        return counts
