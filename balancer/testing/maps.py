"""Raw useapi account maps (the JSON the account endpoints return) with fake credentials."""

from __future__ import annotations

import random
import secrets
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["make_accounts", "make_v2_accounts", "random_token"]


def random_token(prefix: str = "discord-token-", nbytes: int = 16) -> str:
    """Return a fresh random credential, e.g. ``"discord-token-9f86d0..."``."""
    return prefix + secrets.token_hex(nbytes)


def make_accounts(
    n: int, *, max_jobs: int | Sequence[int] = 3, prefix: str = "ch", seed: int = 0
) -> dict[str, dict[str, Any]]:
    """
    Build a raw v1 account map (the JSON useapi returns) with ``n`` channels.

    Channels are named ``f"{prefix}{i}"``; each gets a distinctive fake Discord
    token (``"discord-token-<hex>"``) and a server id, repeatable for a given ``seed``.

    Args:
        n: how many channels.
        max_jobs: every channel's ``maxJobs``, or a sequence cycled over the channels.
        prefix: the channel-id prefix.
        seed: seeds the tokens and server ids.

    Raises:
        ValueError: ``n`` is negative or ``max_jobs`` is an empty sequence.
    """
    entries = _numbered(lambda i: f"{prefix}{i}", n, max_jobs)
    rng = random.Random(seed)
    server = str(rng.randrange(10**17, 10**18))
    return {
        channel: {
            "server": server,
            "channel": channel,
            "discord": f"discord-token-{rng.getrandbits(96):024x}",
            "maxJobs": limit,
        }
        for channel, limit in entries
    }


def make_v2_accounts(
    n: int, *, max_jobs: int | Sequence[int] = 3, domain: str = "example.com", seed: int = 0
) -> dict[str, dict[str, Any]]:
    """
    Build a raw v2 account map (keyed by email, with a jwt and a password) with ``n`` accounts.

    Raises:
        ValueError: ``n`` is negative or ``max_jobs`` is an empty sequence.
    """
    entries = _numbered(lambda i: f"user{i}@{domain}", n, max_jobs)
    rng = random.Random(seed)
    return {
        email: {
            "email": email,
            "maxJobs": limit,
            "jwt": {"token": f"jwt-token-{rng.getrandbits(96):024x}", "expires": 4102444800},
            "password": f"password-{rng.getrandbits(64):016x}",
        }
        for email, limit in entries
    }


def _numbered(
    key: Callable[[int], str], n: int, max_jobs: int | Sequence[int]
) -> list[tuple[str, int]]:
    """``(key(i), its maxJobs)`` for the ``n`` entries of a map."""
    return [(key(i), limit) for i, limit in enumerate(_limits(n, max_jobs))]


def _limits(n: int, max_jobs: int | Sequence[int]) -> list[int]:
    if n < 0:
        raise ValueError(f"n must be >= 0, not {n}")
    if isinstance(max_jobs, int):
        return [max_jobs] * n
    if not max_jobs:
        raise ValueError("max_jobs must not be an empty sequence")
    return [max_jobs[i % len(max_jobs)] for i in range(n)]
