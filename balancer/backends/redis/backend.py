"""
The fleet-wide backend: in-flight counts live in Redis, shared by every process.

Every process (on any host) that uses the same Redis and namespace shares one
set of counts, so ``max_jobs`` holds across the whole fleet. Each acquire
attempt and each release is one round trip running one atomic Lua script
(:mod:`.scripts` describes the keys and the scripts); renewal of all of
this balancer's leases, a map change and a resynchronisation are one more
script, ``SYNC``.

:class:`RedisBackend` runs the round trips; what it knows between them lives
in its parts: the lease book (:mod:`.leases`: lease expiry, releases in
doubt), the channel view (:mod:`.view`: figures and the server's clock) and
the background tasks (:mod:`.listener`: wake-ups).

Design notes:

* **Data loss** (Redis restarted without persistence, a failover that missed
  writes): scripts check an epoch id written at start-up. On a mismatch the
  backend adopts (or creates) the new epoch, re-publishes its map and
  re-asserts its unexpired leases, publishes ``"e"`` so every other process
  does the same at once, and retries. Grants pause for ``recovery_grace``
  seconds after a loss is detected, so other processes can re-assert theirs
  first. A lease missing without a tombstone while its holder knows it is
  unexpired is re-asserted the same way at the next renewal.
* **Faults**: every client failure leaves as
  :class:`~balancer.errors.BackendUnavailableError` within ``timeout``
  seconds; ``backend_unavailable`` / ``backend_recovered`` are logged once per
  transition. A lease whose grant or release is in doubt (timeout,
  cancellation) is released as ``"abandoned"`` by the next ``SYNC``; a
  release that failed is retried by it (:mod:`.leases`).

Open questions:

* XX a process that *opens* first after a data loss creates the new epoch
  without the grace period (it cannot tell a lost namespace from a new one);
  it may grant slots that the others re-assert a moment later.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

import anyio
import structlog

from ...errors import BackendUnavailableError
from ..base import MAX_JOBS_CAP, ReleaseResult
from . import scripts
from .client import Arg, ScriptClient, connect, current_library, describe
from .leases import LeaseBook, Releases, Renewals
from .listener import Listener
from .scripts import RELEASE_STATUS, text
from .target import target_of
from .view import ChannelView

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from ...accounts import Secret
    from ..base import BackendConfig, ChannelCounts, ReleaseOutcome, RenewResult

__all__ = ["RedisBackend"]

logger = structlog.get_logger(__name__)

#: How many times an operation is retried after resynchronising a new epoch.
_EPOCH_RETRIES = 3


class RedisBackend:
    """
    Counts and leases in Redis, shared by every balancer on the same namespace.

    With a URL it talks through redis-py's asyncio client under asyncio and
    through coredis under trio; a client passed in (``redis.asyncio.Redis``
    under asyncio, or an entered ``coredis.Redis`` under either) is used as
    given and never closed.

    Args:
        url_or_client: ``redis://``, ``rediss://`` or ``unix://`` URL (user and
            password allowed; never shown), or a client.
        namespace: every key lives under ``{namespace}:`` (one Redis Cluster slot).
        timeout: seconds one round trip may take before
            :class:`~balancer.errors.BackendUnavailableError`.
        connect_timeout: seconds to open a connection (URL only).
        recovery_grace: seconds without grants after data loss is detected,
            while the other processes re-assert their leases.

    Raises:
        TypeError: ``url_or_client`` is neither a URL nor a supported client.
        ValueError: a bad URL scheme, namespace or timeout.
    """

    immediate = False
    shared = True
    default_lease_ttl: float | None = 60.0

    def __init__(
        self,
        url_or_client: Any,
        *,
        namespace: str = "balancer",
        timeout: float = 5.0,
        connect_timeout: float = 2.0,
        recovery_grace: float = 1.0,
    ) -> None:
        if not namespace or any(c in namespace for c in "{}"):
            raise ValueError("namespace must be non-empty and hold no '{' or '}'")
        if timeout <= 0 or connect_timeout <= 0 or recovery_grace < 0:
            raise ValueError("timeouts must be positive and recovery_grace not negative")
        self._target: Secret | object
        self._target, self._shown = target_of(url_or_client)
        self.namespace = namespace
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._grace = recovery_grace
        # NOTE: scripts declare P:meta only and derive the other keys from it
        # (one hash tag: one Redis Cluster slot); see scripts.
        self._keys = scripts.keys_for(namespace)[:1]
        self._wake_channel = f"{{{namespace}}}:wake"
        self._client: ScriptClient | None = None
        self._config: BackendConfig | None = None
        self._listener: Listener | None = None
        self._reset()

    def _reset(self) -> None:
        self._epoch = ""
        self._healthy = True
        self._map: dict[str, int] | None = None
        self._digest = ""
        self._leases = LeaseBook()
        self._view = ChannelView()
        self._resync_lock = anyio.Lock()
        self._syncing = 0  # syncs in flight
        self._sync_doubt_until = 0.0  # a failed sync may still run on the server until then
        # Script arguments fixed for a given epoch and config, pre-encoded.
        self._common_for: tuple[str, float] | None = None
        self._common_args: list[Arg] = []
        self._acquire_fixed: tuple[bytes, bytes] = (b"", b"")
        self._release_fixed: tuple[bytes, bytes] = (b"", b"")

    def __repr__(self) -> str:
        shown = getattr(self, "_shown", "?")
        return f"RedisBackend({shown!r}, namespace={getattr(self, 'namespace', None)!r})"

    # -- the Backend protocol -------------------------------------------------

    async def open(
        self, config: BackendConfig, notify: Callable[[], None], task_group: TaskGroup
    ) -> None:
        if self._config is not None:
            raise RuntimeError("a RedisBackend serves one balancer at a time")
        library = current_library()
        self._reset()
        # NOTE: the URL stays a Secret down to the client's constructor, so no
        # frame of ours holds its password as a local.
        client = await connect(
            self._target,
            library=library,
            timeout=self._timeout,
            connect_timeout=self._connect_timeout,
            task_group=task_group,
        )
        self._client, self._config = client, config
        self._acquire_fixed = (config.selection.encode(), _encoded_ms(self._ttl))
        self._release_fixed = (_encoded_ms(config.cooldown), b"%d" % config.failures_to_cool)
        try:
            await self._sync(adopt=True)
            self._listener = Listener(
                client,
                self._wake_channel,
                notify=notify,
                sync=self._sync,
                down=self._down,
                owed=self._leases.owes,
            )
            await self._listener.start(task_group)
        except BaseException:
            await self.close()
            raise

    async def settle(self) -> None:
        # NOTE: releases owed to the server (a grant in doubt, a release that
        # failed) are settled before the client goes (under trio the client
        # lives in the balancer's task group): after a clean shutdown Redis
        # holds no lease that nobody holds.
        await self._settle_owed()

    async def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            await listener.stop()
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
        self._config = None

    async def _settle_owed(self) -> None:
        """Run the owed releases, retrying for a bounded time (a close's last sync)."""
        if self._client is None or self._config is None:
            return
        with anyio.move_on_after(max(1.0, 2 * self._timeout), shield=True):
            while self._leases.owes():
                try:
                    await self._sync()
                except BackendUnavailableError:
                    await anyio.sleep(0.05)

    def _owe(self) -> None:
        if self._listener is not None:
            self._listener.settle_soon()

    async def set_map(self, limits: Mapping[str, int]) -> None:
        self._map = {channel: min(max_jobs, MAX_JOBS_CAP) for channel, max_jobs in limits.items()}
        # JSON, not a hand-made flat form: channel ids may hold any character.
        flat = json.dumps(sorted(self._map.items()), ensure_ascii=False)
        self._digest = hashlib.sha1(flat.encode()).hexdigest()
        await self._sync(send_map=True)

    async def try_acquire(self, lease_id: str, channel: str | None) -> str | None:
        self._require()
        ttl = self._ttl
        selection, ttl_ms = self._acquire_fixed
        sent = time.monotonic()
        try:
            reply = await self._run(scripts.ACQUIRE, [lease_id, channel or "", selection, ttl_ms])
        except BaseException:
            # NOTE: the grant may have happened before the failure or the
            # cancellation; a sync gives the slot back as soon as Redis answers.
            self._leases.grant_in_doubt(lease_id, sent + ttl)
            self._owe()
            raise
        view = self._view
        view.clock(reply[1], sent)
        if reply[0] == 1:
            granted = text(reply[2])
            self._leases.granted(lease_id, granted, sent + ttl)
            view.put(granted, int(reply[3]), int(reply[4]), 0, 0)
            return granted
        view.nothing_free(int(reply[2]), int(reply[3]), int(reply[4]))
        if channel is not None:
            view.put_figures(channel, reply[5:9])
        return None

    async def release(self, lease_id: str, outcome: ReleaseOutcome) -> ReleaseResult:
        config = self._require()
        held = self._leases.releasing(lease_id)
        sent = time.monotonic()
        # NOTE: a "released" tombstone answers a renewal of ours that may carry
        # this lease (in flight, or failed and maybe still to run on the
        # server), and the owner's renewals when we release it by id. With
        # none of those, nobody can ask: skip it (two commands fewer).
        mark = held is None or self._syncing > 0 or sent < self._sync_doubt_until
        cooldown_ms, failures = self._release_fixed
        args: list[Arg] = [lease_id, outcome, cooldown_ms, failures, b"1" if mark else b"0"]
        try:
            reply = await self._run(scripts.RELEASE, args)
        except BaseException:
            # NOTE: retried by a sync as soon as Redis answers, until it would expire
            self._leases.release_failed(lease_id, outcome, held)
            self._owe()
            raise
        self._view.clock(reply[1], sent)
        status = RELEASE_STATUS[int(reply[0])]
        channel = text(reply[2]) or None
        cooled, removed = bool(reply[3]), bool(reply[4])
        if channel is not None:
            if removed:
                self._view.drop(channel)
            else:
                self._view.put_figures(channel, reply[5:9])
        if status != "released":
            return ReleaseResult(status, channel)
        if removed:
            return ReleaseResult("released", channel, removed=True)
        if cooled:
            return ReleaseResult("released", channel, cooled=True, cooling_for=config.cooldown)
        return ReleaseResult("released", channel)

    async def renew(self) -> RenewResult:
        self._require()
        await self._sync()
        return self._leases.take()

    def counts(self) -> Mapping[str, ChannelCounts]:
        return self._view.counts()

    def next_wakeup(self) -> float | None:
        return self._view.next_wakeup()

    # -- round trips ------------------------------------------------------------

    @property
    def _ttl(self) -> float:
        config = self._require()
        ttl = config.lease_ttl if config.lease_ttl is not None else self.default_lease_ttl
        return ttl if ttl is not None else 60.0

    def _require(self) -> BackendConfig:
        if self._config is None or self._client is None:
            raise RuntimeError("RedisBackend used before open() or after close()")
        return self._config

    def _common(self, epoch: str) -> list[Arg]:
        """Every script's first arguments (pre-encoded once per epoch and ``lease_ttl``)."""
        ttl = self._ttl
        if self._common_for != (epoch, ttl):
            # NOTE: the scripts derive how long tombstones are kept from the ttl.
            self._common_args = [epoch.encode(), _encoded_ms(ttl)]
            self._common_for = (epoch, ttl)
        return self._common_args

    async def _eval(self, script: scripts.Script, args: list[Arg]) -> list[Any]:
        """One round trip, bounded by ``timeout``; logs availability transitions."""
        client = self._client
        if client is None:
            raise RuntimeError("RedisBackend used before open() or after close()")
        try:
            if client.bounded:
                # NOTE: the client's own timeouts bound the call (a cancel
                # scope per round trip costs as much as a small script).
                reply = await client.run(script, self._keys, args)
            else:
                with anyio.fail_after(self._timeout):
                    reply = await client.run(script, self._keys, args)
        except TimeoutError as exc:
            error = BackendUnavailableError(f"Redis did not answer within {self._timeout:g}s")
            self._down(error)
            raise error from exc
        except BackendUnavailableError as exc:
            self._down(exc)
            raise
        if not self._healthy:
            self._healthy = True
            logger.info("backend_recovered", backend="redis", namespace=self.namespace)
        return cast(list[Any], reply)

    def _down(self, exc: BaseException) -> None:
        if self._healthy:
            self._healthy = False
            logger.warning(
                "backend_unavailable",
                backend="redis",
                namespace=self.namespace,
                error=describe(exc),
            )

    async def _run(self, script: scripts.Script, args: list[Arg]) -> list[Any]:
        """Run ``script``; after an epoch change, resynchronise and retry."""
        for _ in range(_EPOCH_RETRIES):
            epoch = self._epoch
            reply = await self._eval(script, [*self._common(epoch), *args])
            if reply[0] != -1:
                return reply
            await self._resync(epoch)
        raise BackendUnavailableError("the Redis namespace's epoch keeps changing")

    async def _resync(self, stale_epoch: str) -> None:
        async with self._resync_lock:
            if self._epoch == stale_epoch:  # NOTE: nobody resynchronised while we waited
                await self._sync(adopt=True, send_map=True)

    async def _sync(self, *, adopt: bool = False, send_map: bool = False) -> None:
        """Renew, run pending releases, maybe publish the map, read every channel."""
        sent = time.monotonic()
        leases, releases = self._leases.due(sent)
        args = self._sync_args(adopt, send_map, sent, leases, releases)
        epoch = self._epoch
        self._syncing += 1
        try:
            reply = await self._eval(scripts.SYNC, [*self._common(epoch), *args])
        except BaseException:
            # NOTE: it may still run on the server (a timeout, a cancellation):
            # releases leave tombstones for it meanwhile.
            self._sync_doubt_until = max(
                self._sync_doubt_until, time.monotonic() + max(self._ttl, self._timeout)
            )
            raise
        finally:
            self._syncing -= 1
        if reply[0] == -1:
            if adopt:  # pragma: no cover - adopt mode never answers -1
                raise BackendUnavailableError("Redis refused to adopt an epoch")
            await self._resync(epoch)
            return
        self._synced(reply, epoch, sent, leases, releases)

    def _synced(
        self, reply: list[Any], epoch: str, sent: float, leases: Renewals, releases: Releases
    ) -> None:
        """Take in ``SYNC``'s reply (see the script for its layout)."""
        self._leases.ran(releases, text(reply[9]))
        self._view.clock(reply[1], sent)
        new_epoch = text(reply[2])
        if epoch and new_epoch != epoch:
            logger.warning(
                "backend_epoch_changed",
                backend="redis",
                namespace=self.namespace,
                leases=len(leases),
            )
        self._epoch = new_epoch
        self._view.settle(int(reply[3]))
        statuses = text(reply[4])
        if "a" in statuses:
            logger.warning(
                "leases_reasserted",
                backend="redis",
                namespace=self.namespace,
                leases=statuses.count("a"),
            )
        self._leases.renewed(leases, statuses, sent + self._ttl)
        self._view.apply_counts(reply[5], reply[6], reply[7], reply[8])

    def _sync_args(
        self, adopt: bool, send_map: bool, now: float, leases: Renewals, releases: Releases
    ) -> list[Arg]:
        """``SYNC``'s own arguments: the map, ``leases`` to renew, ``releases`` to run."""
        config = self._require()
        # NOTE: an empty map is never published. The namespace's map is the
        # fleet's, last writer wins; a process with no channels (a webhook
        # handler that only releases by id, a worker that started during a
        # 404) must not drain every other worker's channels. Its own balancer
        # grants nothing without accounts anyway.
        limits = self._map if send_map and self._map else None
        args: list[Arg] = [
            "adopt" if adopt else "strict",
            uuid.uuid4().hex,
            _ms(self._grace),
            _ms(self._ttl),
            self._digest if limits is not None else "",
            0 if limits is None else len(limits),
            len(leases),
            len(releases),
            _ms(config.cooldown),
            config.failures_to_cool,
        ]
        for channel, max_jobs in (limits or {}).items():
            args += [channel, max_jobs]
        for lease_id, held in leases:
            # NOTE: after a data loss (adopt), every lease we still hold is
            # re-asserted, even one past its deadline by our clock: the new
            # epoch cannot have handed its slot to anyone, and its job may
            # still be running on Discord. Counting it twice is safe; dropping
            # it would let the fleet over-dispatch the channel.
            alive = adopt or held.deadline > now
            hint = self._view.max_jobs(held.channel)
            args += [lease_id, held.channel, hint, "1" if alive else "0"]
        for lease_id, outcome in releases:
            args += [lease_id, outcome]
        return args


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _encoded_ms(seconds: float) -> bytes:
    return b"%d" % _ms(seconds)
