"""
The floor of the Redis benchmarks: one ``EVALSHA`` of a trivial Lua script.

Three trivial commands (``TIME``, ``INCR``, ``GET``) in one script are the
cheapest atomic server-side step a client can make; an acquire+release is two
such steps, so its floor is two round trips through the same client library.
``redis_bench`` and ``redis_flat`` both compare against it. It is a benchmark
fixture, not part of the library: the backend never runs it.
"""

from __future__ import annotations

from balancer.backends.redis.scripts import Script

__all__ = ["FLOOR_SOURCE", "TRIVIAL"]

#: KEYS[1] a counter; returns its new value.
FLOOR_SOURCE = r"""
-- KEYS[1] a counter; return: its new value
redis.call('TIME')
redis.call('INCR', KEYS[1])
return redis.call('GET', KEYS[1])
"""

#: The floor as the backend's client adapter runs scripts (``client.run(TRIVIAL, keys, args)``).
TRIVIAL = Script.of("trivial", FLOOR_SOURCE)
