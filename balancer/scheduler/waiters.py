"""
The queue of tasks waiting in ``acquire()``.

Waiters are served first come, first served. An unpinned waiter can use any
channel; a pinned one only its own. Keeping one queue per pin (plus one for
unpinned waiters), each in arrival order, makes "the oldest waiter that can use
channel X" two O(1) peeks, so a released slot is handed over without scanning
or waking anyone else (no stampede). Sequence numbers order waiters across the
queues.

This is the anyio ``CapacityLimiter`` design (an ``OrderedDict`` of waiters,
the token handed straight to the oldest) extended to many channels.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING

import anyio

if TYPE_CHECKING:
    from ..lease import Lease

__all__ = ["WaitQueue", "Waiter"]


class Waiter:
    """One task blocked in ``acquire()``."""

    # Invariants: a waiter is queued iff ``done`` is False; once ``done`` it has
    # exactly one of ``lease`` / ``error`` set, or neither (it timed out or was
    # cancelled and removed itself).

    __slots__ = ("channel", "done", "error", "event", "lease", "seq")

    def __init__(self, seq: int, channel: str | None, event: anyio.Event | None = None) -> None:
        self.seq = seq
        self.channel = channel
        self.event = anyio.Event() if event is None else event
        self.lease: Lease | None = None
        self.error: BaseException | None = None
        self.done = False


class WaitQueue:
    """Waiters in arrival order, one queue per pinned channel plus the unpinned one."""

    __slots__ = ("_count", "_pinned", "_seq", "_unpinned")

    def __init__(self) -> None:
        self._seq = 0
        self._count = 0
        self._unpinned: OrderedDict[int, Waiter] = OrderedDict()
        self._pinned: dict[str, OrderedDict[int, Waiter]] = {}

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Waiter]:
        yield from list(self._unpinned.values())
        for queue in list(self._pinned.values()):
            yield from list(queue.values())

    def ahead_of(self, channel: str | None) -> bool:
        """Whether a newcomer for ``channel`` would jump a waiter that could use it."""
        if self._unpinned:
            return True
        return channel is not None and channel in self._pinned

    def reserve(self) -> int:
        """
        Take the next place in line without queueing yet.

        A caller that first tries for a free slot (one round trip, with a
        remote backend) reserves its place when it calls ``acquire()``, and
        queues with it if the attempt fails: its place is its call order, not
        the order in which round trips happen to return.
        """
        self._seq += 1
        return self._seq

    def push(
        self, channel: str | None, event: anyio.Event | None = None, seq: int | None = None
    ) -> Waiter:
        """
        Queue a waiter; ``event`` is what it will wait on (default: a new one).

        ``seq`` is a place taken earlier with :meth:`reserve`; the waiter goes
        in ahead of every waiter that came later.
        """
        if seq is None:
            seq = self.reserve()
        waiter = Waiter(seq, channel, event)
        if channel is None:
            queue = self._unpinned
        else:
            found = self._pinned.get(channel)
            queue = self._pinned[channel] = OrderedDict() if found is None else found
        queue[seq] = waiter
        if seq != self._seq:
            # NOTE: rare (round trips that returned out of order): move the
            # later waiters behind this one; each queue stays in seq order.
            for later in [k for k in queue if k > seq]:
                queue.move_to_end(later)
        self._count += 1
        return waiter

    def remove(self, waiter: Waiter) -> None:
        """Take ``waiter`` out of its queue and mark it done; idempotent."""
        if waiter.done:
            return
        waiter.done = True
        self._count -= 1
        if waiter.channel is None:
            del self._unpinned[waiter.seq]
            return
        queue = self._pinned[waiter.channel]
        del queue[waiter.seq]
        if not queue:
            del self._pinned[waiter.channel]

    def oldest_for(self, channel: str) -> Waiter | None:
        """The oldest waiter that can use ``channel``, or ``None``."""
        best: Waiter | None = None
        if self._unpinned:
            best = self._unpinned[next(iter(self._unpinned))]
        queue = self._pinned.get(channel)
        if queue:
            head = queue[next(iter(queue))]
            if best is None or head.seq < best.seq:
                best = head
        return best

    def oldest(self, skip_unpinned: bool, skip: set[str]) -> Waiter | None:
        """The oldest waiter not excluded by ``skip_unpinned`` / ``skip``, or ``None``."""
        best: Waiter | None = None
        if self._unpinned and not skip_unpinned:
            best = self._unpinned[next(iter(self._unpinned))]
        for channel, queue in self._pinned.items():
            if channel in skip:
                continue
            head = queue[next(iter(queue))]
            if best is None or head.seq < best.seq:
                best = head
        return best

    def pinned_to(self, channel: str) -> list[Waiter]:
        queue = self._pinned.get(channel)
        return list(queue.values()) if queue else []

    def pinned_channels(self) -> list[str]:
        return list(self._pinned)
