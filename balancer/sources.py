"""
Account sources: where the balancer gets its account map from.

A source is anything with ``async def fetch(self) -> ParsedAccounts`` (the
:class:`AccountSource` protocol), and optionally ``async def aclose(self)``,
which the balancer calls on exit.

* :class:`UseapiAccountSource` asks useapi.net over HTTPS and maps every HTTP
  outcome to one of :mod:`balancer.errors`. The API token is attached by an
  :class:`httpx.Auth` that only ever sends it to the configured origin, and
  redirects are never followed.
* :class:`StaticAccountSource` serves a map held in memory, for tests and for
  deployments that configure channels themselves.
"""

from __future__ import annotations

import ipaddress
import json
import math
from collections.abc import Generator, Mapping
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

import anyio
import anyio.lowlevel
import httpx

from .accounts import (
    MASK,
    Account,
    ParsedAccounts,
    Rejected,
    Schema,
    Secret,
    parse_account_map,
)
from .errors import AccountMapError, AuthError, ConfigNotFoundError, SourceError

__all__ = ["AccountSource", "StaticAccountSource", "UseapiAccountSource"]

_DEFAULT_PORTS = {"http": 80, "https": 443}
_PATHS: dict[str, str] = {"v1": "/v1/pixverse/account", "v2": "/v2/pixverse/accounts"}

Origin = tuple[str, str, int | None]


@runtime_checkable
class AccountSource(Protocol):
    """
    Something that can produce the current account map.

    ``fetch()`` may raise :class:`~balancer.AuthError`,
    :class:`~balancer.ConfigNotFoundError`, :class:`~balancer.SourceError` or
    :class:`~balancer.AccountMapError`. A source may also define
    ``async def aclose(self) -> None``; the balancer calls it on exit if present.
    """

    async def fetch(self) -> ParsedAccounts:
        """Return the current account map."""
        ...


def _origin(url: httpx.URL) -> Origin:
    """Return the (scheme, host, port) triple that identifies the URL's origin."""
    scheme = url.scheme.lower()
    return (scheme, url.host.lower(), url.port or _DEFAULT_PORTS.get(scheme))


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_base_url(base_url: object) -> httpx.URL:
    if not isinstance(base_url, str):
        raise TypeError(f"base_url must be a str, not {type(base_url).__name__}")
    try:
        url = httpx.URL(base_url.rstrip("/"))
    except httpx.InvalidURL:
        raise ValueError("base_url is not a valid URL") from None
    if url.scheme not in ("https", "http") or not url.host:
        raise ValueError("base_url must be an https:// URL with a host")
    if url.scheme == "http" and not _is_loopback(url.host):
        raise ValueError(
            "base_url must use https:// (http:// is only allowed for loopback hosts: "
            "127.0.0.0/8, ::1, localhost)"
        )
    if url.userinfo or url.query or url.fragment:
        raise ValueError("base_url must not carry credentials, a query or a fragment")
    return url


class _OriginBoundBearer(httpx.Auth):
    """Adds ``Authorization: Bearer <token>`` to requests for one origin, and no other."""

    def __init__(self, token: Secret, origin: Origin) -> None:
        self._token = token
        self._origin = origin

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if _origin(request.url) == self._origin:
            request.headers["Authorization"] = f"Bearer {self._token.reveal()}"
        yield request

    def __repr__(self) -> str:
        return f"_OriginBoundBearer(token={self._token!r}, origin={self._origin!r})"


class UseapiAccountSource:
    """
    Fetch the account map from useapi.net.

    One :class:`httpx.AsyncClient` is shared by every fetch: the one passed in
    (used as given and never closed here), or one created on first use and
    closed by :meth:`aclose`. Each request uses this source's ``timeout`` and
    ``follow_redirects=False``, whatever the client's own settings; the token
    is only ever sent to ``base_url``'s origin (scheme, host and port).

    Args:
        token: the useapi.net API token. Kept only as a :class:`~balancer.Secret`.
        base_url: the API root. Must be ``https://``, except loopback hosts
            (``127.0.0.0/8``, ``::1``, ``localhost``), which may use ``http://``.
        schema: ``"v1"`` (``GET /v1/pixverse/account``, keyed by Discord channel)
            or ``"v2"`` (``GET /v2/pixverse/accounts``, keyed by email).
        client: an httpx client to send requests through; never closed here.
        timeout: seconds allowed for each request (connect, read, write, pool).

    Raises:
        TypeError: ``token``, ``base_url``, ``timeout`` or ``client`` has the wrong type.
        ValueError: an empty or malformed token, an unknown schema, a
            non-positive timeout, or a base URL that is not https (or http to loopback).
    """

    def __init__(
        self,
        token: str,
        *,
        base_url: str = "https://api.useapi.net",
        schema: str = "v1",
        client: httpx.AsyncClient | None = None,
        timeout: float = 10.0,
    ) -> None:
        if not isinstance(token, str):
            raise TypeError(f"token must be a str, not {type(token).__name__}")
        # NOTE: wrapped before anything else can raise, so no frame of ours
        # holds the raw token as a local (error trackers capture locals).
        secret = Secret(token)
        del token
        if not secret:
            raise ValueError("token must not be empty")
        if not all("!" <= char <= "~" for char in secret.reveal()):
            # Header-encoding errors would quote the value; refuse it up front.
            raise ValueError("token must be printable ASCII without spaces")
        if schema not in _PATHS:
            raise ValueError("schema must be 'v1' or 'v2'")
        if isinstance(timeout, bool) or not isinstance(timeout, int | float):
            raise TypeError(f"timeout must be a number, not {type(timeout).__name__}")
        if not (0 < timeout < math.inf):
            raise ValueError(f"timeout must be a positive finite number, not {timeout!r}")
        if client is not None and not isinstance(client, httpx.AsyncClient):
            raise TypeError(f"client must be an httpx.AsyncClient, not {type(client).__name__}")
        url = _check_base_url(base_url)
        self._base_url = str(url)
        self._schema: Schema = "v1" if schema == "v1" else "v2"
        self._url = url.copy_with(path=url.path.rstrip("/") + _PATHS[schema])
        self._timeout = float(timeout)
        self._token = secret
        self._auth = _OriginBoundBearer(self._token, _origin(url))
        self._client = client
        self._owns_client = client is None

    @property
    def base_url(self) -> str:
        """The API root requests go to."""
        return self._base_url

    @property
    def schema(self) -> Schema:
        """``"v1"`` or ``"v2"``."""
        return self._schema

    @property
    def timeout(self) -> float:
        """Seconds allowed for each request."""
        return self._timeout

    def __repr__(self) -> str:
        base_url = getattr(self, "_base_url", None)
        schema = getattr(self, "_schema", None)
        return (
            f"UseapiAccountSource(base_url={base_url!r}, schema={schema!r}, token=Secret({MASK!r}))"
        )

    def _get_client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(follow_redirects=False, timeout=self._timeout)
        return self._client

    async def fetch(self) -> ParsedAccounts:
        """
        GET the account map and parse it.

        Cancellation aborts the request and leaves the source usable.

        Raises:
            AuthError: useapi answered 401 or 403 (the token was refused).
            ConfigNotFoundError: useapi answered 404 (no account configured yet).
            SourceError: a redirect, 429, 5xx or any other status, a timeout or a
                network fault; ``status_code`` is ``None`` for the last two.
            AccountMapError: a 200 whose body is not a JSON object.
        """
        client = self._get_client()
        try:
            # httpx's timeout bounds each socket operation, not the request: an
            # upstream trickling a byte at a time would never time out.
            with anyio.fail_after(self._timeout):
                response = await client.get(
                    self._url,
                    auth=self._auth,
                    follow_redirects=False,
                    timeout=self._timeout,
                    headers={"Accept": "application/json"},
                )
        except (httpx.TimeoutException, TimeoutError) as exc:
            raise SourceError(f"useapi request timed out ({type(exc).__name__})") from exc
        except httpx.InvalidURL as exc:
            # A 3xx whose Location httpx cannot parse: it builds the next
            # request even when it will not follow it.
            raise SourceError(
                f"useapi answered an unusable redirect ({type(exc).__name__})"
            ) from exc
        except httpx.HTTPError as exc:
            raise SourceError(f"useapi request failed ({type(exc).__name__})") from exc
        return self._parse(response)

    def _parse(self, response: httpx.Response) -> ParsedAccounts:
        status = response.status_code
        if status == 200:
            return parse_account_map(_decode_json(response), schema=self._schema)
        if status in (401, 403):
            raise AuthError(f"useapi refused the API token (HTTP {status})", status_code=status)
        if status == 404:
            raise ConfigNotFoundError("no account is configured at useapi yet (HTTP 404)")
        if 300 <= status < 400:
            raise SourceError(
                f"useapi answered a redirect (HTTP {status}); redirects are not followed",
                status_code=status,
            )
        raise SourceError(f"useapi answered HTTP {status}", status_code=status)

    async def aclose(self) -> None:
        """Close the HTTP client if this source created it; a passed-in client stays open."""
        client, self._client = self._client, (None if self._owns_client else self._client)
        if self._owns_client and client is not None:
            await client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def _decode_json(response: httpx.Response) -> object:
    """
    Decode a response body; the errors quote positions, never the body.

    The error is raised after the ``except`` blocks, not inside them: a decode
    error holds the whole body (Discord tokens included) in ``.doc``, and an
    exception raised inside ``except`` keeps it as ``__context__`` even with
    ``from None``, where traceback tools that walk the chain would print it.
    """
    message: str
    try:
        return json.loads(response.content.decode("utf-8"))
    except UnicodeDecodeError as exc:
        message = f"account map is not UTF-8 (byte {exc.start})"
    except json.JSONDecodeError as exc:
        message = (
            f"account map is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        )
    except (ValueError, RecursionError) as exc:
        message = f"account map is not valid JSON ({type(exc).__name__})"
    raise AccountMapError(message)


class StaticAccountSource:
    """
    Serve an account map held in memory.

    ``accounts`` is either a mapping of channel to :class:`~balancer.Account`,
    used as is, or the raw v1 JSON shape
    (``{"<channel>": {"server": ..., "discord": ..., "maxJobs": ...}}``), which
    goes through :func:`~balancer.parse_account_map`; its rejected entries are
    reported by every fetch. :meth:`set` replaces the map; the next fetch (so
    the balancer's next refresh) returns the new one.

    :ivar fetch_count: how many times :meth:`fetch` was called

    Args:
        accounts: the map to serve.
        schema: the raw map's schema (``"v1"`` or ``"v2"``); ignored for ``Account`` values.

    Raises:
        TypeError: ``accounts`` is not a mapping, or mixes ``Account`` and raw values.
        ValueError: an ``Account`` is keyed by something other than its channel.
    """

    def __init__(
        self, accounts: Mapping[str, Account] | Mapping[str, object], *, schema: str = "v1"
    ) -> None:
        if schema not in _PATHS:
            raise ValueError("schema must be 'v1' or 'v2'")
        self._schema = schema
        self.fetch_count = 0
        self._accounts: dict[str, Account] = {}
        self._rejected: list[Rejected] = []
        self.set(accounts)

    def set(self, accounts: Mapping[str, Account] | Mapping[str, object]) -> None:
        """
        Replace the map; the next :meth:`fetch` returns it.

        Raises:
            TypeError: ``accounts`` is not a mapping, or mixes ``Account`` and raw values.
            ValueError: an ``Account`` is keyed by something other than its channel.
        """
        if not isinstance(accounts, Mapping):
            raise TypeError(f"accounts must be a mapping, not {type(accounts).__name__}")
        values = list(accounts.values())
        n_accounts = sum(isinstance(value, Account) for value in values)
        if values and n_accounts == len(values):
            parsed: dict[str, Account] = {}
            for key, account in accounts.items():
                assert isinstance(account, Account)
                if key != account.channel:
                    raise ValueError(f"account for channel {account.channel!r} is keyed {key!r}")
                parsed[key] = account
            self._accounts, self._rejected = parsed, []
        elif n_accounts:
            raise TypeError("accounts must be all Account values or all raw JSON entries")
        else:
            result = parse_account_map(dict(accounts), schema=self._schema)
            self._accounts, self._rejected = result.accounts, result.rejected

    async def fetch(self) -> ParsedAccounts:
        """Return a copy of the current map (a checkpoint, never failing)."""
        self.fetch_count += 1
        await anyio.lowlevel.checkpoint()
        return ParsedAccounts(dict(self._accounts), list(self._rejected))

    def __repr__(self) -> str:
        accounts = getattr(self, "_accounts", {})
        rejected = getattr(self, "_rejected", [])
        return f"StaticAccountSource(channels={len(accounts)}, rejected={len(rejected)})"
