"""
Client-side balancer for useapi.net channels.

Spread jobs over the Discord channels of a useapi.net account map, never
running more than a channel's ``maxJobs`` at once, in one process or (with
``RedisBackend``) across a whole fleet of workers::

    async with Balancer(UseapiAccountSource(token)) as lb:
        async with lb.acquire(timeout=30) as lease:
            await send_job(lease.channel, lease.account.discord.reveal())
"""

from __future__ import annotations

from .accounts import Account, ParsedAccounts, Rejected, Secret, parse_account_map
from .backends.memory import MemoryBackend
from .backends.redis import RedisBackend
from .balancer import Balancer
from .errors import (
    AccountMapError,
    AuthError,
    BackendUnavailableError,
    BalancerError,
    ConfigNotFoundError,
    LeaseError,
    NoAccountsError,
    NoCapacityError,
    SourceError,
    StaleAccountMapError,
)
from .lease import AcquireHandle, Lease
from .sources import AccountSource, StaticAccountSource, UseapiAccountSource
from .statistics import BalancerStatistics, ChannelStatistics
from .sync import SyncBalancer

__version__ = "0.1.0.dev0"

__all__ = [
    "Account",
    "AccountMapError",
    "AccountSource",
    "AcquireHandle",
    "AuthError",
    "BackendUnavailableError",
    "Balancer",
    "BalancerError",
    "BalancerStatistics",
    "ChannelStatistics",
    "ConfigNotFoundError",
    "Lease",
    "LeaseError",
    "MemoryBackend",
    "NoAccountsError",
    "NoCapacityError",
    "ParsedAccounts",
    "RedisBackend",
    "Rejected",
    "Secret",
    "SourceError",
    "StaleAccountMapError",
    "StaticAccountSource",
    "SyncBalancer",
    "UseapiAccountSource",
    "parse_account_map",
]

# Present the public names as living in the package, as httpx does, so reprs
# and docs say `balancer.Balancer`, not `balancer.balancer.Balancer`.
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("balancer."):
        _obj.__module__ = "balancer"
del _name, _obj
