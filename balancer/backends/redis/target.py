"""
What a :class:`~balancer.backends.redis.RedisBackend` is built on, and how it is shown.

The backend takes a URL or a client. A URL is kept as a
:class:`~balancer.accounts.Secret` (its password must never be shown: in a
``repr``, a log line or an error, it is ``***``); a client is recognised
without importing its library for any other object.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from ...accounts import Secret

__all__ = ["is_coredis_client", "is_redis_py_client", "mask_url", "passwords", "target_of"]


def target_of(url_or_client: Any) -> tuple[Secret | object, str]:
    """
    What a backend connects to (a URL, kept as a :class:`Secret`, or a client) and how it shows it.

    Raises:
        TypeError: neither a URL nor a supported client.
        ValueError: a URL scheme other than redis, rediss or unix.
    """
    if isinstance(url_or_client, str):
        if urlsplit(url_or_client).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("unsupported Redis URL scheme (use redis://, rediss:// or unix://)")
        return Secret(url_or_client), mask_url(url_or_client)
    if is_redis_py_client(url_or_client) or is_coredis_client(url_or_client):
        kind = type(url_or_client)
        return url_or_client, f"<{kind.__module__}.{kind.__name__}>"
    raise TypeError(
        "RedisBackend takes a Redis URL, a redis.asyncio.Redis or a coredis.Redis, "
        f"not {type(url_or_client).__name__}"
    )


def is_redis_py_client(obj: object) -> bool:
    """True for a ``redis.asyncio`` client (without importing redis for other objects)."""
    module = type(obj).__module__
    if not module.startswith("redis."):
        return False
    import redis.asyncio

    return isinstance(obj, (redis.asyncio.Redis, redis.asyncio.RedisCluster))


def is_coredis_client(obj: object) -> bool:
    """True for a coredis client (without importing coredis for other objects)."""
    module = type(obj).__module__
    if not module.startswith("coredis"):
        return False
    import coredis

    return isinstance(obj, (coredis.Redis, coredis.RedisCluster))


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def passwords(url: str) -> tuple[str, ...]:
    """The URL's password as written and percent-decoded (what must never be shown)."""
    password = urlsplit(url).password
    return (password, unquote(password)) if password else ()
