"""
Errors raised by :mod:`balancer`.

Every runtime failure derives from :class:`BalancerError`::

    BalancerError
    ├── AuthError                 the useapi API token was refused (401/403)
    ├── ConfigNotFoundError       no account configured upstream yet (404)
    ├── SourceError               transient upstream fault: 429, 5xx, 3xx, network, timeout
    ├── AccountMapError           the account map is not a JSON object
    ├── NoAccountsError           no channel can ever serve this acquire
    ├── NoCapacityError           (also TimeoutError) nothing freed up in time
    ├── StaleAccountMapError      no good map for longer than ``max_stale``
    ├── LeaseError                the lease belongs to another balancer, or is unknown
    └── BackendUnavailableError   the shared backend (Redis) cannot be reached

Programmer mistakes in arguments raise :class:`ValueError` or :class:`TypeError`
at construction, as anyio and trio do.

No message or attribute of these classes ever holds a credential: messages are
built here from ids, counts and status codes only.
"""

from __future__ import annotations

__all__ = [
    "AccountMapError",
    "AuthError",
    "BackendUnavailableError",
    "BalancerError",
    "ConfigNotFoundError",
    "LeaseError",
    "NoAccountsError",
    "NoCapacityError",
    "SourceError",
    "StaleAccountMapError",
]


class BalancerError(Exception):
    """Base class of every error :mod:`balancer` raises at run time."""


class SourceError(BalancerError):
    """
    The account source failed in a way worth retrying (429, 5xx, 3xx, network, timeout).

    :ivar status_code: the HTTP status, or ``None`` for a network fault
    """

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class AuthError(BalancerError):
    """
    The useapi API token was refused.

    :ivar status_code: the HTTP status (401, or 403)
    """

    def __init__(
        self, message: str = "useapi refused the API token", *, status_code: int = 401
    ) -> None:
        super().__init__(message)
        self.status_code = status_code


class ConfigNotFoundError(BalancerError):
    """No account is configured upstream yet (useapi answered 404)."""

    status_code = 404


class AccountMapError(BalancerError):
    """The account map payload is not a JSON object, so no entry of it can be used."""


class NoAccountsError(BalancerError):
    """
    No channel can serve this acquire: the map is empty, or the pinned channel is
    unknown or draining.

    :ivar channel: the pinned channel, or ``None``
    """

    def __init__(self, message: str, *, channel: str | None = None) -> None:
        super().__init__(message)
        self.channel = channel


class NoCapacityError(BalancerError, TimeoutError):
    """
    No slot freed up before the acquire's timeout.

    :ivar timeout: the timeout that ran out, in seconds
    :ivar channel: the pinned channel, or ``None``
    """

    def __init__(self, timeout: float, *, channel: str | None = None) -> None:
        where = f"channel {channel!r}" if channel is not None else "any channel"
        super().__init__(f"no free slot on {where} within {timeout:g}s")
        self.timeout = timeout
        self.channel = channel


class StaleAccountMapError(BalancerError):
    """
    No good account map was fetched for longer than ``max_stale`` seconds.

    :ivar age: seconds since the last good fetch (``None``: never fetched)
    :ivar max_stale: the configured limit
    """

    def __init__(self, age: float | None, max_stale: float) -> None:
        if age is None:
            message = "no account map was ever fetched"
        else:
            message = f"account map is {age:.1f}s old, over max_stale={max_stale:g}s"
        super().__init__(message)
        self.age = age
        self.max_stale = max_stale


class LeaseError(BalancerError):
    """The lease was not issued by this balancer, or its id is unknown here."""


class BackendUnavailableError(BalancerError):
    """The shared backend (Redis) could not be reached, or did not answer in time."""


def describe_error(exc: BaseException) -> str:
    """
    An exception as ``"Type: message"``, the form log lines and statistics use.

    The innermost leaf stands for an ``ExceptionGroup`` (what anyio raises
    around a single failure); messages of this package never hold a secret.
    """
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"
