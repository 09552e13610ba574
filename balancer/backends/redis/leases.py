"""
This balancer's lease book inside :class:`~balancer.backends.redis.RedisBackend`.

The book holds the leases this balancer holds (live: renewed by every
``SYNC``) and the releases it still owes the server, and collects what the
syncs learnt until the next ``renew()`` hands it to the balancer. It does no
I/O: the backend runs the round trips and tells the book what came of them.

Design notes:

* **Leases expire** on the server's clock: a process killed with SIGKILL stops
  renewing and its slots come back within ``lease_ttl``, reclaimed lazily by
  whichever script runs next once one is due (``P:meta.due``; at most 16 per
  call, so no call walks the namespace). The balancer calls ``renew()`` about
  every ``lease_ttl / 3``; one ``SYNC`` extends every live lease, never
  re-creates a released one (a release leaves a tombstone whenever a renewal
  could still carry the lease), and reports the lost ones.
* **Releases in doubt**: a lease whose grant is in doubt (timeout,
  cancellation) is an orphan, released as ``"abandoned"`` by the next
  ``SYNC``. A release that failed (Redis unreachable, a timeout) stays
  pending, with its outcome, and every ``SYNC`` runs it again until the lease
  would have expired anyway. The sync that runs it says what it found: unless
  the lease had been reclaimed after expiry ("lost"), the release is done,
  and the next ``renew()`` reports it as ``completed`` so that the balancer
  counts it (it forgot the lease when the release failed).
* A lease missing without a tombstone while its holder knows it is unexpired
  is re-asserted at the next renewal (data was lost: see the backend).

Open questions:

* XX a lease released elsewhere just before a data loss that also lost its
  tombstone is re-asserted by its holder, which keeps renewing it until the
  holder releases it or exits.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..base import ReleaseOutcome, RenewResult
from .scripts import RELEASE_STATUS

__all__ = ["Held", "LeaseBook", "Releases", "Renewals"]


@dataclass(slots=True)
class Held:
    """A live lease of this balancer: its channel and when it expires, by our clock."""

    channel: str
    deadline: float


#: Live leases a sync renews, by id; releases a sync runs, with their outcomes.
Renewals = list[tuple[str, Held]]
Releases = list[tuple[str, ReleaseOutcome]]


class LeaseBook:
    """This balancer's leases and its releases still owed, and what syncs said of them."""

    # Invariants:
    #   a lease id is in ``live`` from its grant until its release, or until a
    #   sync reports it released elsewhere or lost (then it is in ``_lost`` /
    #   ``_released`` until the next renew() returns it).
    #   ``_pending`` and ``_orphans`` hold leases whose release is in doubt;
    #   they are never in ``live``.
    #   a pending release that a sync ran, and that did not find its lease
    #   reclaimed, is in ``_completed`` until the next renew() returns it.

    def __init__(self) -> None:
        self.live: dict[str, Held] = {}
        self._pending: dict[str, tuple[ReleaseOutcome, float]] = {}
        self._orphans: dict[str, float] = {}
        self._lost: set[str] = set()
        self._released: set[str] = set()
        self._completed: set[str] = set()

    # -- transitions --------------------------------------------------------------------

    def granted(self, lease_id: str, channel: str, deadline: float) -> None:
        self.live[lease_id] = Held(channel, deadline)

    def grant_in_doubt(self, lease_id: str, deadline: float) -> None:
        """An acquire failed after it was sent: it may have granted, until ``deadline``."""
        self._orphans[lease_id] = deadline

    def releasing(self, lease_id: str) -> Held | None:
        """A release starts: the lease leaves the book; returns it if it was live."""
        self._pending.pop(lease_id, None)
        self._orphans.pop(lease_id, None)
        return self.live.pop(lease_id, None)

    def owes(self) -> bool:
        """Whether a release is owed to the server (a grant in doubt, a failed release)."""
        return bool(self._pending or self._orphans)

    def release_failed(self, lease_id: str, outcome: ReleaseOutcome, held: Held | None) -> None:
        """A release of ours failed: the syncs run it until the lease would expire."""
        if held is not None:
            self._pending[lease_id] = (outcome, held.deadline)

    def due(self, now: float) -> tuple[Renewals, Releases]:
        """What a sync sent at ``now`` carries: the leases it renews and the releases it runs."""
        for lease_id in [k for k, (_, deadline) in self._pending.items() if deadline <= now]:
            del self._pending[lease_id]  # expired by now: reclaimed without us
        for lease_id in [k for k, deadline in self._orphans.items() if deadline <= now]:
            del self._orphans[lease_id]
        releases: Releases = [(k, v[0]) for k, v in self._pending.items()]
        releases += [(k, "abandoned") for k in self._orphans]
        return list(self.live.items()), releases

    def renewed(self, leases: Renewals, statuses: str, deadline: float) -> None:
        """A sync's statuses of ``leases`` (``SYNC``'s reply): kept ones live till ``deadline``."""
        for (lease_id, held), status in zip(leases, statuses, strict=True):
            if self.live.get(lease_id) is not held:
                continue  # NOTE: released here while the sync was in flight
            if status in "ka":
                held.deadline = deadline
            else:
                del self.live[lease_id]
                (self._released if status == "r" else self._lost).add(lease_id)

    def ran(self, releases: Releases, statuses: str) -> None:
        """
        A sync ran ``releases``; ``statuses`` says what each found (``SYNC``'s reply).

        A pending release is completed unless it found its lease reclaimed
        ("lost"). One that found no lease ("unknown": an earlier attempt ran on
        the server after all, another process released it by id, or it went
        with lost data) leaves the slot free all the same, and the balancer
        counts an "unknown" release of its own as released too. Orphans were
        never counted as acquired: they count for nothing.
        """
        for (lease_id, _), code in zip(releases, statuses, strict=True):
            self._orphans.pop(lease_id, None)
            done = RELEASE_STATUS[int(code)] != "lost"
            if self._pending.pop(lease_id, None) is not None and done:
                self._completed.add(lease_id)

    def take(self) -> RenewResult:
        """What the syncs learnt since the last call (``renew()``'s answer)."""
        lost, self._lost = frozenset(self._lost), set()
        released, self._released = frozenset(self._released), set()
        completed, self._completed = frozenset(self._completed), set()
        return RenewResult(lost=lost, released=released, completed=completed)
