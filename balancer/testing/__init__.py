"""
Test helpers for code that uses the balancer, and for the balancer itself.

* :class:`FakeUseapi` (:mod:`balancer.testing.useapi`): a fake useapi.net
  account API over real HTTP on loopback, or through ``httpx.MockTransport``,
  with injectable faults (forced statuses, delays, malformed bodies, redirects);
* :func:`make_accounts`, :func:`make_v2_accounts`, :func:`random_token`
  (:mod:`balancer.testing.maps`): raw account maps with fake credentials;
* :class:`FakeClock` (:mod:`balancer.testing.clock`): a monotonic clock that
  moves only when told to;
* :class:`RedisServer` (:mod:`balancer.testing.redis_server`): a throwaway
  ``redis-server`` on a free loopback port.

Each module's docstring shows it in use. The library itself never imports
this package (an import-linter contract in ``pyproject.toml`` checks it).
"""

from __future__ import annotations

from .clock import FakeClock
from .maps import make_accounts, make_v2_accounts, random_token
from .redis_server import RedisServer, find_redis_server, free_port
from .useapi import NOT_CONFIGURED, V1_PATH, V2_PATH, FakeUseapi, LoggedRequest

__all__ = [
    "NOT_CONFIGURED",
    "V1_PATH",
    "V2_PATH",
    "FakeClock",
    "FakeUseapi",
    "LoggedRequest",
    "RedisServer",
    "find_redis_server",
    "free_port",
    "make_accounts",
    "make_v2_accounts",
    "random_token",
]
