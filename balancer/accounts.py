"""
Accounts: the channels useapi lets us dispatch to, and their credentials.

The account map arrives as untrusted JSON. :func:`parse_account_map` keeps every
good entry and rejects each bad one with a human reason, so one typo in one
channel never takes the others down. It never raises anything but
:class:`~balancer.errors.AccountMapError`, whatever the input.

Credentials (Discord tokens, jwt tokens) are wrapped in :class:`Secret` the
moment they are read, so they cannot reach a log line, a repr or a traceback's
local variables by accident.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import AccountMapError

__all__ = ["MASK", "Account", "ParsedAccounts", "Rejected", "Schema", "Secret", "parse_account_map"]

Schema = Literal["v1", "v2"]

#: What every credential prints as: no part of it, not even a prefix.
MASK = "********"


class Secret:
    """
    A credential that prints as ``Secret('********')``.

    ``str()``, ``repr()`` and ``format()`` are masked; :meth:`reveal` is the only way
    to read the value. Two secrets are equal when their values are; a secret is
    hashable and pickles with its value, so accounts can cross to worker processes.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"Secret() takes a str, not {type(value).__name__}")
        self._value = value

    def reveal(self) -> str:
        """Return the credential itself."""
        return self._value

    def __repr__(self) -> str:
        return f"Secret({MASK!r})"

    __str__ = __repr__

    def __format__(self, format_spec: str) -> str:
        return format(repr(self), format_spec)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Secret):
            # Constant time: equality must not leak a token through timing.
            return hmac.compare_digest(self._value.encode(), other._value.encode())
        return NotImplemented

    def __hash__(self) -> int:
        return hash((Secret, self._value))

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self) -> tuple[type[Secret], tuple[str]]:
        return (Secret, (self._value,))


@dataclass(frozen=True, slots=True)
class Account:
    """
    One channel the balancer may dispatch to.

    :ivar channel: the map key (v1: the Discord channel id; v2: the email)
    :ivar server: the Discord server id (v1), or ``None``
    :ivar discord: the Discord token (v1) or the jwt token (v2); never printed
    :ivar max_jobs: how many jobs the channel may run at once
    """

    channel: str
    server: str | None
    discord: Secret = field(repr=True)
    max_jobs: int

    def __post_init__(self) -> None:
        if not isinstance(self.discord, Secret):
            raise TypeError("Account.discord must be a Secret; wrap the token: Secret(token)")
        if isinstance(self.max_jobs, bool) or not isinstance(self.max_jobs, int):
            raise TypeError("Account.max_jobs must be an int")
        if self.max_jobs < 1:
            raise ValueError("Account.max_jobs must be at least 1")
        if not isinstance(self.channel, str) or not self.channel:
            raise ValueError("Account.channel must be a non-empty str")


@dataclass(frozen=True, slots=True)
class Rejected:
    """
    An entry of the account map that was not used.

    :ivar key: the entry's key in the map
    :ivar reason: why, in plain words; never a secret
    """

    key: str
    reason: str


@dataclass(frozen=True, slots=True)
class ParsedAccounts:
    """
    The result of :func:`parse_account_map`.

    :ivar accounts: the usable accounts, keyed by channel
    :ivar rejected: the entries left out, each with its reason
    """

    accounts: dict[str, Account]
    rejected: list[Rejected] = field(default_factory=list)


def parse_account_map(payload: object, *, schema: str = "v1") -> ParsedAccounts:
    """
    Turn a decoded account-map payload into accounts, rejecting bad entries.

    An entry is rejected, with a reason, when it is not an object, its key is
    empty, ``maxJobs`` is missing, not an integer (``true``, ``"5"`` and ``2.5``
    included) or below 1, or its ``channel`` (v1) / ``email`` (v2) field disagrees
    with its key. An entry without ``channel`` takes its key. ``maxJobs`` above
    upstream's documented maximum is accepted as given.

    Args:
        payload: the decoded JSON body.
        schema: ``"v1"`` (channel-keyed, the default) or ``"v2"`` (email-keyed).

    Raises:
        AccountMapError: the payload is not a JSON object.
        ValueError: ``schema`` is neither ``"v1"`` nor ``"v2"``.
    """
    if schema not in ("v1", "v2"):
        raise ValueError("schema must be 'v1' or 'v2'")
    if not isinstance(payload, Mapping):
        message = f"account map must be a JSON object, not {_json_type_name(payload)}"
        # NOTE: the payload may be a list of tokens; it must not stay in this
        # frame's locals, which error trackers capture with the traceback.
        del payload
        raise AccountMapError(message)
    parse_entry = _parse_v1 if schema == "v1" else _parse_v2
    fast = schema == "v1"
    accounts: dict[str, Account] = {}
    rejected: list[Rejected] = []
    for raw_key, entry in payload.items():
        if fast and type(entry) is dict and type(raw_key) is str:
            # NOTE: the fast path takes only entries that are plainly good
            # (exact dict, int maxJobs >= 1, str fields, channel == key); the
            # general path below decides everything else, so both agree.
            account = _fast_v1(raw_key, entry)
            if account is not None:
                accounts[raw_key] = account
                continue
        key = raw_key if isinstance(raw_key, str) else str(raw_key)
        result = _parse_common(key, raw_key, entry)
        if isinstance(result, str):
            rejected.append(Rejected(key, result))
            continue
        outcome = parse_entry(key, entry, result)
        if isinstance(outcome, str):
            rejected.append(Rejected(key, outcome))
        else:
            accounts[key] = outcome
    return ParsedAccounts(accounts, rejected)


def _slot_setter(cls: type, name: str) -> Callable[[object, object], None]:
    """The raw slot writer of ``cls.name``, which bypasses a frozen ``__setattr__``."""
    setter: Callable[[object, object], None] = vars(cls)[name].__set__
    return setter


_set_channel = _slot_setter(Account, "channel")
_set_server = _slot_setter(Account, "server")
_set_discord = _slot_setter(Account, "discord")
_set_max_jobs = _slot_setter(Account, "max_jobs")
_set_secret = _slot_setter(Secret, "_value")


def _fast_v1(key: str, entry: dict[str, Any]) -> Account | None:
    """
    A v1 entry that is plainly good, built without re-validating; else ``None``.

    A 10,000-channel map is parsed on every refresh of every worker: building
    accounts through the slot descriptors skips checks this function has just
    made, and keeps parsing within a small multiple of ``json.loads``.
    """
    max_jobs = entry.get("maxJobs")
    if type(max_jobs) is not int or max_jobs < 1:
        return None
    channel = entry.get("channel")
    if channel is not None and channel != key:
        return None
    server = entry.get("server")
    token = entry.get("discord")
    if (server is not None and type(server) is not str) or (
        token is not None and type(token) is not str
    ):
        return None
    if not key.strip():
        return None
    secret = object.__new__(Secret)
    _set_secret(secret, token or "")
    account = object.__new__(Account)
    _set_channel(account, key)
    _set_server(account, server)
    _set_discord(account, secret)
    _set_max_jobs(account, max_jobs)
    return account


def _parse_common(key: str, raw_key: object, entry: object) -> int | str:
    """Return the entry's ``maxJobs``, or the reason to reject it."""
    if not isinstance(raw_key, str) or not raw_key.strip():
        return "empty or non-string key"
    if not isinstance(entry, Mapping):
        return f"entry must be an object, not {_json_type_name(entry)}"
    if "maxJobs" not in entry:
        return "missing maxJobs"
    max_jobs = entry["maxJobs"]
    if isinstance(max_jobs, bool) or not isinstance(max_jobs, int):
        return f"maxJobs must be an integer, not {_json_type_name(max_jobs)}"
    if max_jobs < 1:
        return f"maxJobs must be at least 1, not {max_jobs}"
    return max_jobs


def _parse_v1(key: str, entry: Mapping[str, Any], max_jobs: int) -> Account | str:
    channel = entry.get("channel", key)
    if channel is None:
        channel = key
    if channel != key:
        return "channel field disagrees with its key"
    server = entry.get("server")
    if server is not None and not isinstance(server, str):
        return f"server must be a string, not {_json_type_name(server)}"
    token = entry.get("discord", "")
    if token is None:
        token = ""
    if not isinstance(token, str):
        return f"discord must be a string, not {_json_type_name(token)}"
    return Account(channel=key, server=server, discord=Secret(token), max_jobs=max_jobs)


def _parse_v2(key: str, entry: Mapping[str, Any], max_jobs: int) -> Account | str:
    email = entry.get("email", key)
    if email is None:
        email = key
    if email != key:
        return "email field disagrees with its key"
    jwt = entry.get("jwt")
    token: object = ""
    if isinstance(jwt, Mapping):
        token = jwt.get("token", "")
    elif jwt is not None:
        return f"jwt must be an object, not {_json_type_name(jwt)}"
    if token is None:
        token = ""
    if not isinstance(token, str):
        return f"jwt.token must be a string, not {_json_type_name(token)}"
    return Account(channel=key, server=None, discord=Secret(token), max_jobs=max_jobs)


def _json_type_name(value: object) -> str:
    """Name a decoded JSON value's type the way the JSON author wrote it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__
