"""
One small interface in front of the two Redis clients the backend runs on.

:class:`~balancer.backends.redis.RedisBackend` needs three things of a client:
run a registered Lua script (``EVALSHA``, loading it after ``NOSCRIPT``),
publish, and listen on one pub/sub channel. :class:`ScriptClient` is that
interface; :class:`RedisPyClient` implements it over redis-py's asyncio client
(asyncio only) and :class:`CoredisClient` over coredis (built on anyio: asyncio
and trio).

Every failure of the client library (connection refused or lost, a server
error such as ``LOADING`` or ``READONLY``) leaves this module as
:class:`~balancer.errors.BackendUnavailableError`, with a message that holds no
password; a request that timed out leaves as the built-in :class:`TimeoutError`
(the backend words it as "did not answer"). ``redis`` and ``coredis`` are
imported only when needed: here to build a client, in :mod:`.target` to
recognise one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, cast

import anyio

from ...accounts import Secret
from ...errors import BackendUnavailableError, describe_error
from .target import is_coredis_client, is_redis_py_client, passwords

if TYPE_CHECKING:
    from anyio.abc import TaskGroup, TaskStatus

    from .scripts import Script

__all__ = [
    "Arg",
    "CoredisClient",
    "RedisPyClient",
    "ScriptClient",
    "connect",
    "current_library",
    "describe",
]

#: A script argument (bytes are sent as they are: pre-encode fixed ones).
Arg = str | int | bytes

_INSTALL_HINT = "RedisBackend needs the redis extra: pip install 'balancer[redis]'"
#: Seconds between keepalive PINGs on an idle pub/sub connection.
_KEEPALIVE = 10.0


class ScriptClient(Protocol):
    """What the backend needs of a Redis client."""

    #: True when the client's own timeouts bound every round trip (a client
    #: built from a URL: ``timeout`` to wait for the reply, and for a pooled
    #: connection under coredis, plus ``connect_timeout`` to open one), so the
    #: backend needs no deadline of its own around each call.
    bounded: bool

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        """Run ``script`` (EVALSHA, loading it once after NOSCRIPT) and return its reply."""
        ...

    async def listen(
        self, channel: str, on_ready: Callable[[], None], on_message: Callable[[bytes], None]
    ) -> None:
        """
        Subscribe to ``channel``, call ``on_ready`` once subscribed, then
        ``on_message`` for each message. Returns or raises only when the
        connection fails (:class:`BackendUnavailableError`).
        """
        ...

    async def aclose(self) -> None:
        """Release what this adapter opened (never a client passed in by the user)."""
        ...


def describe(exc: BaseException, *, hide: Sequence[str] = ()) -> str:
    """``"Type: message"`` for a log line or an error, with each of ``hide`` masked out."""
    text = describe_error(exc)
    for secret in hide:
        if secret:
            text = text.replace(secret, "***")
    return text


def _unavailable(exc: BaseException, hide: Sequence[str]) -> BackendUnavailableError:
    return BackendUnavailableError(f"Redis unavailable: {describe(exc, hide=hide)}")


def _timed_out(exc: BaseException, hide: Sequence[str]) -> TimeoutError:
    return TimeoutError(describe(exc, hide=hide))


def _failure(
    exc: BaseException, timeouts: tuple[type[BaseException], ...], hide: Sequence[str]
) -> Exception:
    """A failed request: :class:`TimeoutError` for one of ``timeouts``, else unavailable."""
    return _timed_out(exc, hide) if isinstance(exc, timeouts) else _unavailable(exc, hide)


class RedisPyClient:
    """:class:`ScriptClient` over ``redis.asyncio`` (asyncio only)."""

    def __init__(self, client: Any, *, owned: bool, hide: Sequence[str] = ()) -> None:
        import redis.exceptions

        self._client = client
        self._owned = owned
        self.bounded = owned  # from_url() sets the socket timeouts
        self._hide = hide
        self._errors: tuple[type[BaseException], ...] = (redis.exceptions.RedisError, OSError)
        self._timeouts: tuple[type[BaseException], ...] = (
            redis.exceptions.TimeoutError,
            TimeoutError,
        )
        self._noscript = redis.exceptions.NoScriptError

    @classmethod
    def from_url(cls, url: Secret, *, timeout: float, connect_timeout: float) -> RedisPyClient:
        try:
            import redis.asyncio
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff
            from redis.exceptions import ConnectionError
        except ImportError as exc:
            raise ImportError(_INSTALL_HINT) from exc
        client = redis.asyncio.Redis.from_url(
            url.reveal(),
            socket_timeout=timeout,
            socket_connect_timeout=connect_timeout,
            # One immediate retry on a fresh connection after a dropped one
            # (a restarted server), never on a timeout: a timed-out script may
            # have run.
            retry=Retry(NoBackoff(), 1, supported_errors=(ConnectionError,)),
            decode_responses=False,
        )
        return cls(client, owned=True, hide=passwords(url.reveal()))

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        try:
            try:
                return await self._client.evalsha(script.sha, len(keys), *keys, *args)
            except self._noscript:
                await self._client.script_load(script.source)
                return await self._client.evalsha(script.sha, len(keys), *keys, *args)
        except (*self._timeouts, *self._errors) as exc:  # NOTE: built on failure only
            raise _failure(exc, self._timeouts, self._hide) from exc

    async def listen(
        self, channel: str, on_ready: Callable[[], None], on_message: Callable[[bytes], None]
    ) -> None:
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(channel)
            on_ready()
            while True:
                message = await pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=_KEEPALIVE
                )
                if message is None:  # idle: a dead connection fails the PING
                    await pubsub.ping()
                elif message.get("type") == "message":
                    on_message(cast(bytes, message["data"]))
        except self._errors as exc:
            raise _unavailable(exc, self._hide) from exc
        finally:
            with (
                anyio.CancelScope(shield=True),
                anyio.move_on_after(1.0),
                contextlib.suppress(*self._errors),
            ):
                await pubsub.aclose()

    async def aclose(self) -> None:
        if self._owned:
            with (
                anyio.CancelScope(shield=True),
                anyio.move_on_after(2.0),
                contextlib.suppress(*self._errors),
            ):
                await self._client.aclose()


class CoredisClient:
    """:class:`ScriptClient` over coredis (anyio: asyncio and trio)."""

    def __init__(self, client: Any, *, owned: bool, hide: Sequence[str] = ()) -> None:
        import coredis.exceptions

        self._client = client
        self._owned = owned
        self._hide = hide
        # NOTE: a connection torn down under a task (the server died, or the
        # pool closed while cancelling) surfaces as anyio's stream errors.
        self._errors: tuple[type[BaseException], ...] = (
            coredis.exceptions.RedisError,
            OSError,
            anyio.ClosedResourceError,
            anyio.BrokenResourceError,
            anyio.EndOfStream,
        )
        self._timeouts: tuple[type[BaseException], ...] = (TimeoutError,)
        self._noscript = coredis.exceptions.NoScriptError
        self._scope: anyio.CancelScope | None = None
        self.bounded = owned  # from_url() sets the stream and connect timeouts

    @classmethod
    async def from_url(
        cls, url: Secret, *, timeout: float, connect_timeout: float, task_group: TaskGroup
    ) -> CoredisClient:
        """A client for ``url``, entered by a task of ``task_group`` until :meth:`aclose`."""
        try:
            import coredis
            from coredis.exceptions import ConnectionError
            from coredis.retry import ConstantRetryPolicy
        except ImportError as exc:
            raise ImportError(_INSTALL_HINT) from exc
        pool = coredis.ConnectionPool.from_url(
            url.reveal(),
            decode_components=True,
            stream_timeout=timeout,
            connect_timeout=connect_timeout,
            # Waiting for a pooled connection is bounded too (see ``bounded``).
            timeout=timeout,
        )
        pool.connection_class = _closing_connection_class(pool.connection_class)
        client = coredis.Redis(
            connection_pool=pool,
            # As with redis-py: one retry after a dropped connection, none on a timeout.
            retry_policy=ConstantRetryPolicy((ConnectionError,), retries=1, delay=0),
        )
        adapter = cls(client, owned=True, hide=passwords(url.reveal()))
        # NOTE: coredis clients are async context managers whose pool runs a
        # task group; it must be entered and exited by one task, so a task of
        # the balancer's group holds it open.
        await task_group.start(adapter._hold)
        return adapter

    async def _hold(self, *, task_status: TaskStatus[None]) -> None:
        with anyio.CancelScope() as scope:
            self._scope = scope
            async with self._client:
                task_status.started()
                await anyio.sleep_forever()

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        try:
            try:
                return await self._client.evalsha(script.sha, keys=keys, args=args)
            except self._noscript:
                await self._client.script_load(script.source)
                return await self._client.evalsha(script.sha, keys=keys, args=args)
        except BaseExceptionGroup as group:
            raise self._translate(group, timeouts=True) from group
        except (*self._timeouts, *self._errors) as exc:  # NOTE: built on failure only
            raise _failure(exc, self._timeouts, self._hide) from exc

    async def listen(
        self, channel: str, on_ready: Callable[[], None], on_message: Callable[[bytes], None]
    ) -> None:
        from coredis.retry import NoRetryPolicy

        try:
            async with self._client.pubsub(
                channels=[channel],
                ignore_subscribe_messages=True,
                retry_policy=NoRetryPolicy(),
                max_idle_seconds=_KEEPALIVE,
            ) as pubsub:
                on_ready()
                while True:
                    message = await pubsub.get_message()
                    if message is not None and message.get("type") == "message":
                        on_message(cast(bytes, message["data"]))
        except BaseExceptionGroup as group:
            raise self._translate(group) from group
        except self._errors as exc:
            raise _unavailable(exc, self._hide) from exc

    def _translate(
        self, group: BaseExceptionGroup[BaseException], *, timeouts: bool = False
    ) -> BaseException:
        """
        coredis raises connection failures from its task groups, in groups.

        A group of client errors (maybe beside a cancellation, which the
        cancelled scope raises again at the next checkpoint) becomes
        :class:`BackendUnavailableError` (with ``timeouts``, a group of timeouts
        only becomes :class:`TimeoutError`); anything else is re-raised as it is.
        """
        matched, rest = group.split(self._errors)
        if matched is None:
            return group
        if rest is not None and rest.split(anyio.get_cancelled_exc_class())[1] is not None:
            return group
        if timeouts and matched.split(self._timeouts)[1] is None:
            return _timed_out(matched, self._hide)
        return _unavailable(matched, self._hide)

    async def aclose(self) -> None:
        if self._scope is not None:
            self._scope.cancel()
            self._scope = None


#: coredis connection attributes holding memory streams (closed by the subclass below).
_CONNECTION_STREAMS = (
    "_write_buffer_in",
    "_write_buffer_out",
    "_push_message_buffer_in",
    "_push_message_buffer_out",
    "_streamed_message_buffer_in",
    "_streamed_message_buffer_out",
)
_closing_classes: dict[type[Any], type[Any]] = {}


def _closing_connection_class(base: type[Any]) -> type[Any]:
    """
    ``base`` with its buffers closed whatever way ``run`` ends.

    coredis (6.9) opens a connection's memory streams in ``__init__`` but closes
    them only once connected, so each refused attempt (Redis down, the listener
    reconnecting) leaves six unclosed streams and a ``ResourceWarning`` apiece.
    """
    found = _closing_classes.get(base)
    if found is not None:
        return found

    async def run(self: Any, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            await base.run(self, task_status=task_status)
        finally:
            for name in _CONNECTION_STREAMS:
                stream = getattr(self, name, None)
                if stream is not None:
                    stream.close()

    closing = type(f"Closing{base.__name__}", (base,), {"run": run})
    _closing_classes[base] = closing
    return closing


async def connect(
    target: Secret | str | object,
    *,
    library: str,
    timeout: float,
    connect_timeout: float,
    task_group: TaskGroup,
) -> ScriptClient:
    """
    Build the adapter for ``target`` (a URL or a client) on the running event loop.

    Raises:
        ImportError: the redis extra is not installed.
        TypeError: a redis-py client under trio, or an object that is no client.
    """
    if isinstance(target, str):
        target = Secret(target)
    if isinstance(target, Secret):
        if library == "asyncio":
            return RedisPyClient.from_url(target, timeout=timeout, connect_timeout=connect_timeout)
        return await CoredisClient.from_url(
            target, timeout=timeout, connect_timeout=connect_timeout, task_group=task_group
        )
    if is_coredis_client(target):
        return CoredisClient(target, owned=False)
    if is_redis_py_client(target):
        if library != "asyncio":
            raise TypeError(
                f"a redis-py client runs on asyncio only, not {library}: pass a coredis "
                "client or a URL (RedisBackend then uses coredis)"
            )
        return RedisPyClient(target, owned=False)
    raise TypeError(
        f"RedisBackend takes a URL, a redis.asyncio.Redis or a coredis.Redis, "
        f"not {type(target).__name__}"
    )


def current_library() -> str:
    """``"asyncio"`` or ``"trio"``: the event loop running this task."""
    try:
        import sniffio
    except ImportError:  # anyio no longer needs sniffio, but trio does: this is asyncio
        return "asyncio"
    return sniffio.current_async_library()
