"""
The fleet-wide backend: in-flight counts live in Redis, shared by every process.

Every process (on any host) that uses the same Redis and namespace shares one
set of counts, so ``max_jobs`` holds across the whole fleet. Each acquire
attempt and each release is one round trip running one atomic Lua script
(:mod:`.scripts` describes the keys and the scripts); renewal of all of
this balancer's leases, a map change and a resynchronisation are one more
script, ``SYNC``.

Design notes:

* **Leases expire** on the server's clock: a process killed with SIGKILL stops
  renewing and its slots come back within ``lease_ttl``, reclaimed lazily by
  whichever script runs next once one is due (``P:meta.due``; at most 16 per
  call, so no call walks the namespace). The balancer calls
  :meth:`RedisBackend.renew` about every ``lease_ttl / 3``; one ``SYNC``
  extends every live lease, never re-creates a released one (a release leaves
  a tombstone whenever a renewal could still carry the lease), and reports the
  lost ones.
* **Data loss** (Redis restarted without persistence, a failover that missed
  writes): scripts check an epoch id written at start-up. On a mismatch the
  backend adopts (or creates) the new epoch, re-publishes its map and
  re-asserts its unexpired leases, publishes ``"e"`` so every other process
  does the same at once, and retries. Grants pause for ``recovery_grace``
  seconds after a loss is detected, so other processes can re-assert theirs
  first. A lease missing without a tombstone while its holder knows it is
  unexpired is re-asserted the same way at the next renewal.
* **Wake-ups**: scripts publish on ``{namespace}:wake`` when a slot frees, a
  cooldown ends or the map grows; a listener task calls ``notify`` on each
  message, and reconnects (then resynchronises and notifies) after a failure.
  The balancer's fallback poll and :meth:`RedisBackend.next_wakeup` (the next
  cooldown end, or the next lease expiry that may free a dead holder's slot)
  cover lost messages.
* **Faults**: every client failure leaves as
  :class:`~balancer.errors.BackendUnavailableError` within ``timeout``
  seconds; ``backend_unavailable`` / ``backend_recovered`` are logged once per
  transition. A lease whose grant or release is in doubt (timeout,
  cancellation) is released as ``"abandoned"`` by the next ``SYNC``.

Open questions:

* XX a lease released elsewhere just before a data loss that also lost its
  tombstone is re-asserted by its holder, which keeps renewing it until the
  holder releases it or exits.
* XX a process that *opens* first after a data loss creates the new epoch
  without the grace period (it cannot tell a lost namespace from a new one);
  it may grant slots that the others re-assert a moment later.
* XX Redis Cluster: all keys share one hash tag; scripts declare one of them
  (``P:meta``, which routes the call to that slot) and name the others, which
  live in the same slot. Only a single server is tested.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, cast
from urllib.parse import urlsplit

import anyio
import anyio.lowlevel
import structlog

from ...accounts import Secret
from ...errors import BackendUnavailableError
from ..base import (
    MAX_JOBS_CAP,
    BackendConfig,
    ChannelCounts,
    ReleaseOutcome,
    ReleaseResult,
    RenewResult,
)
from . import scripts
from .client import (
    Arg,
    ScriptClient,
    connect,
    current_library,
    describe,
    is_coredis_client,
    is_redis_py_client,
    mask_url,
)

if TYPE_CHECKING:
    from anyio.abc import TaskGroup, TaskStatus

    from ...statistics import ChannelState

__all__ = ["RedisBackend"]

logger = structlog.get_logger(__name__)

_STATES: tuple[ChannelState, ...] = ("active", "draining", "cooling")
_RELEASE_STATUS: tuple[Literal["unknown", "released", "lost"], ...] = (
    "unknown",
    "released",
    "lost",
)
#: Seconds added to a server-announced instant before waking for it (clock offset error).
_WAKE_MARGIN = 0.01
#: Seconds between reconnection attempts of the listener (doubling up to the max).
_BACKOFF_MIN, _BACKOFF_MAX = 0.05, 0.5
#: How many times an operation is retried after resynchronising a new epoch.
_EPOCH_RETRIES = 3


@dataclass(slots=True)
class _Held:
    """A live lease of this balancer: its channel and when it expires, by our clock."""

    channel: str
    deadline: float


@dataclass(slots=True)
class _Channel:
    """A channel's figures as of the last round trip that returned them."""

    max_jobs: int
    in_flight: int
    state: ChannelState
    cooling_until: float  # local monotonic time; 0.0 when not cooling


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

    # Invariants:
    #   a lease id is in ``_live`` from its grant until its release, or until a
    #   sync reports it released elsewhere or lost (then it is in ``_lost`` /
    #   ``_released`` until the next renew() returns it).
    #   ``_pending`` and ``_orphans`` hold leases whose release is in doubt;
    #   they are never in ``_live``.

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
        if isinstance(url_or_client, str):
            scheme = urlsplit(url_or_client).scheme
            if scheme not in ("redis", "rediss", "unix"):
                raise ValueError(
                    "unsupported Redis URL scheme (use redis://, rediss:// or unix://)"
                )
            self._target = Secret(url_or_client)
            self._shown = mask_url(url_or_client)
        elif is_redis_py_client(url_or_client) or is_coredis_client(url_or_client):
            self._target = url_or_client
            self._shown = f"<{type(url_or_client).__module__}.{type(url_or_client).__name__}>"
        else:
            raise TypeError(
                "RedisBackend takes a Redis URL, a redis.asyncio.Redis or a coredis.Redis, "
                f"not {type(url_or_client).__name__}"
            )
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
        self._notify: Callable[[], None] = _noop
        self._scopes: list[anyio.CancelScope] = []
        self._background = 0  # background tasks still running
        self._idle = anyio.Event()  # set when _background drops to 0
        self._reset()

    def _reset(self) -> None:
        self._epoch = ""
        self._healthy = True
        self._map: dict[str, int] | None = None
        self._digest = ""
        self._live: dict[str, _Held] = {}
        self._pending: dict[str, tuple[ReleaseOutcome, float]] = {}
        self._orphans: dict[str, float] = {}
        self._lost: set[str] = set()
        self._released: set[str] = set()
        self._channels: dict[str, _Channel] = {}
        self._view: Mapping[str, ChannelCounts] | None = None
        self._offset = 0.0  # server seconds minus local monotonic seconds
        self._next_expiry: float | None = None
        self._next_cool_end: float | None = None
        self._cooling_names: set[str] = set()
        self._settle_until = 0.0
        self._resync_lock = anyio.Lock()
        self._check = anyio.Event()
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
        self._client, self._config, self._notify = client, config, notify
        self._acquire_fixed = (config.selection.encode(), _encoded_ms(self._ttl))
        self._release_fixed = (_encoded_ms(config.cooldown), b"%d" % config.failures_to_cool)
        try:
            await self._sync(adopt=True)
            await task_group.start(self._listen)
            task_group.start_soon(self._checker)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        scopes, self._scopes = self._scopes, []
        for scope in scopes:
            scope.cancel()
        # NOTE: let the listener unsubscribe before its client goes away.
        if self._background:
            with anyio.move_on_after(1.0, shield=True):
                await self._idle.wait()
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
        self._config = None
        self._notify = _noop

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
            # cancellation; the next sync gives the slot back.
            self._orphans[lease_id] = sent + ttl
            raise
        self._clock(reply[1], sent)
        if reply[0] == 1:
            granted = _text(reply[2])
            self._live[lease_id] = _Held(granted, sent + ttl)
            self._put(granted, int(reply[3]), int(reply[4]), 0, 0)
            return granted
        lease_ms, cool_ms, settle_ms = int(reply[2]), int(reply[3]), int(reply[4])
        self._next_expiry = self._local(lease_ms) if lease_ms >= 0 else None
        self._settle_until = self._local(settle_ms) if settle_ms else 0.0
        self._next_cool_end = self._local(cool_ms) if cool_ms >= 0 else None
        if channel is not None:
            self._put_figures(channel, reply[5:9])
        return None

    async def release(self, lease_id: str, outcome: ReleaseOutcome) -> ReleaseResult:
        config = self._require()
        held = self._live.pop(lease_id, None)
        self._pending.pop(lease_id, None)
        self._orphans.pop(lease_id, None)
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
            if held is not None:  # NOTE: retried by the next sync, until it would expire
                self._pending[lease_id] = (outcome, held.deadline)
            raise
        self._clock(reply[1], sent)
        status = _RELEASE_STATUS[int(reply[0])]
        channel = _text(reply[2]) or None
        cooled, removed = bool(reply[3]), bool(reply[4])
        if channel is not None:
            if removed:
                self._drop(channel)
            else:
                self._put_figures(channel, reply[5:9])
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
        lost, self._lost = frozenset(self._lost), set()
        released, self._released = frozenset(self._released), set()
        return RenewResult(lost=lost, released=released)

    def counts(self) -> Mapping[str, ChannelCounts]:
        now = time.monotonic()
        ended = [n for n in self._cooling_names if self._channels[n].cooling_until <= now]
        for name in ended:  # a cooldown ended since the last round trip
            channel = self._channels[name]
            if channel.state == "cooling":
                channel.state = "active"
            channel.cooling_until = 0.0
            self._cooling_names.discard(name)
        if self._view is None or ended:
            self._view = MappingProxyType(
                {
                    name: ChannelCounts(ch.max_jobs, ch.in_flight, ch.state)
                    for name, ch in self._channels.items()
                }
            )
        return self._view

    def next_wakeup(self) -> float | None:
        now = time.monotonic()
        events = [ch.cooling_until for ch in self._cooling()]
        events += [t for t in (self._next_expiry, self._next_cool_end, self._settle_until) if t]
        future = [t - now for t in events if t > now]
        return min(future) + _WAKE_MARGIN if future else None

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
        ttl = self._ttl
        args, leases, releases = self._sync_args(adopt, send_map, sent)
        epoch = self._epoch
        self._syncing += 1
        try:
            reply = await self._eval(scripts.SYNC, [*self._common(epoch), *args])
        except BaseException:
            # NOTE: it may still run on the server (a timeout, a cancellation):
            # releases leave tombstones for it meanwhile.
            self._sync_doubt_until = max(
                self._sync_doubt_until, time.monotonic() + max(ttl, self._timeout)
            )
            raise
        finally:
            self._syncing -= 1
        if reply[0] == -1:
            if adopt:  # pragma: no cover - adopt mode never answers -1
                raise BackendUnavailableError("Redis refused to adopt an epoch")
            await self._resync(epoch)
            return
        for lease_id, _ in releases:
            self._pending.pop(lease_id, None)
            self._orphans.pop(lease_id, None)
        self._clock(reply[1], sent)
        new_epoch = _text(reply[2])
        if epoch and new_epoch != epoch:
            logger.warning(
                "backend_epoch_changed",
                backend="redis",
                namespace=self.namespace,
                leases=len(leases),
            )
        self._epoch = new_epoch
        settle = int(reply[3])
        self._settle_until = self._local(settle) if settle else 0.0
        self._apply_statuses(leases, _text(reply[4]), sent + ttl)
        self._apply_counts(reply[5], reply[6], reply[7], reply[8])

    def _sync_args(
        self, adopt: bool, send_map: bool, now: float
    ) -> tuple[list[Arg], list[tuple[str, _Held]], list[tuple[str, ReleaseOutcome]]]:
        """``SYNC``'s own arguments, the leases it renews and the releases it runs."""
        config = self._require()
        for table in (self._pending, self._orphans):
            for lease_id in [k for k, v in table.items() if _deadline(v) <= now]:
                del table[lease_id]  # expired by now: reclaimed without us
        leases = list(self._live.items())
        releases: list[tuple[str, ReleaseOutcome]] = [(k, v[0]) for k, v in self._pending.items()]
        releases += [(k, "abandoned") for k in self._orphans]
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
            hint = self._channels[held.channel].max_jobs if held.channel in self._channels else 1
            # NOTE: after a data loss (adopt), every lease we still hold is
            # re-asserted, even one past its deadline by our clock: the new
            # epoch cannot have handed its slot to anyone, and its job may
            # still be running on Discord. Counting it twice is safe; dropping
            # it would let the fleet over-dispatch the channel.
            alive = adopt or held.deadline > now
            args += [lease_id, held.channel, hint, "1" if alive else "0"]
        for lease_id, outcome in releases:
            args += [lease_id, outcome]
        return args, leases, releases

    def _apply_statuses(
        self, leases: list[tuple[str, _Held]], statuses: str, deadline: float
    ) -> None:
        if "a" in statuses:
            logger.warning(
                "leases_reasserted",
                backend="redis",
                namespace=self.namespace,
                leases=statuses.count("a"),
            )
        for (lease_id, held), status in zip(leases, statuses, strict=True):
            if self._live.get(lease_id) is not held:
                continue  # NOTE: released here while the sync was in flight
            if status in "ka":
                held.deadline = deadline
            else:
                del self._live[lease_id]
                (self._released if status == "r" else self._lost).add(lease_id)

    def _apply_counts(
        self, maxes: list[Any], infs: list[Any], drains: list[Any], cools: list[Any]
    ) -> None:
        in_flight = {_text(k): int(v) for k, v in zip(infs[::2], infs[1::2], strict=True)}
        draining = {_text(ch) for ch in drains}
        cooling = {_text(k): int(float(v)) for k, v in zip(cools[::2], cools[1::2], strict=True)}
        channels: dict[str, _Channel] = {}
        self._cooling_names = set()
        for raw, raw_max in zip(maxes[::2], maxes[1::2], strict=True):
            name = _text(raw)
            till = self._local(cooling[name]) if name in cooling else 0.0
            state: ChannelState = (
                "draining" if name in draining else "cooling" if till else "active"
            )
            channels[name] = _Channel(int(raw_max), in_flight.get(name, 0), state, till)
            if till:
                self._cooling_names.add(name)
        self._channels = channels
        self._view = None

    # -- local figures ------------------------------------------------------------

    def _clock(self, server_ms: Any, sent: float) -> None:
        """Re-estimate the server clock's offset from a reply stamped ``server_ms``."""
        self._offset = int(server_ms) / 1000 - (sent + time.monotonic()) / 2

    def _local(self, server_ms: int) -> float:
        """A server instant (ms) as local monotonic seconds."""
        return server_ms / 1000 - self._offset

    def _put(self, name: str, max_jobs: int, in_flight: int, state: int, cool_ms: int) -> None:
        till = self._local(cool_ms) if state == 2 and cool_ms else 0.0
        self._channels[name] = _Channel(max_jobs, in_flight, _STATES[state], till)
        if till:
            self._cooling_names.add(name)
        else:
            self._cooling_names.discard(name)
        self._view = None

    def _put_figures(self, name: str, figures: list[Any]) -> None:
        max_jobs, in_flight, state, cool_ms = (int(v) for v in figures)
        if max_jobs < 0:
            self._drop(name)
        else:
            self._put(name, max_jobs, in_flight, state, cool_ms)

    def _drop(self, name: str) -> None:
        self._channels.pop(name, None)
        self._cooling_names.discard(name)
        self._view = None

    def _cooling(self) -> list[_Channel]:
        return [self._channels[name] for name in self._cooling_names if name in self._channels]

    # -- background tasks ---------------------------------------------------------

    async def _listen(self, *, task_status: TaskStatus[None]) -> None:
        """
        Call ``notify`` on every wake-up message; reconnect after failures.

        Started by :meth:`open`, which fails if the first subscription does. After
        a reconnection messages may have been missed and Redis may have lost its
        data: the checker task resynchronises, then notifies.
        """
        client = self._client
        assert client is not None
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
                    await client.listen(self._wake_channel, on_ready, on_message)
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

    async def _checker(self) -> None:
        """Run a sync each time the listener asks (a reconnection, a new epoch)."""
        with anyio.CancelScope() as scope, self._running():
            self._scopes.append(scope)
            while True:
                await self._check.wait()
                self._check = anyio.Event()
                try:
                    await self._sync()
                except (BackendUnavailableError, RuntimeError):
                    continue  # the listener asks again after its next reconnection
                self._notify()


def _noop() -> None:
    pass


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _encoded_ms(seconds: float) -> bytes:
    return b"%d" % _ms(seconds)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _deadline(value: float | tuple[str, float]) -> float:
    return value[1] if isinstance(value, tuple) else value
