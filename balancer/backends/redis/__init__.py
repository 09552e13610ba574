"""
The fleet-wide backend, :class:`RedisBackend`, split by concern.

Imports point down, never up::

    backend   RedisBackend: the Backend protocol, round trips, epoch and resync
    listener  the pub/sub listener and the checker (background tasks)
    leases    this balancer's lease book: live leases and releases still owed
    view      the per-channel figures as of the last round trip, server clock
    client    one interface over redis-py (asyncio) and coredis (trio)
    target    the URL or client a backend is built on, shown without a password
    scripts   the Lua scripts, the key layout they share, their replies
    lua       the Lua every script starts with (helpers, upkeep, one release)

Only the modules of this package import ``redis`` or ``coredis``, and only
when a client is built.
"""

from __future__ import annotations

from .backend import RedisBackend

__all__ = ["RedisBackend"]
