"""
Test helpers: a fake useapi.net account API, and account maps to feed it.

:class:`FakeUseapi` answers the two account endpoints the balancer reads
(``GET /v1/pixverse/account`` and ``GET /v2/pixverse/accounts``) the way
useapi.net does, and lets a test inject the faults a real deployment meets:
forced statuses (401, 404, 429, 5xx), slow answers, malformed bodies and
redirects. It serves real HTTP on loopback from a background thread, so it
works under asyncio, trio and plain threads alike::

    from balancer import Balancer
    from balancer.testing import FakeUseapi, make_accounts

    async def test_my_worker():
        with FakeUseapi(make_accounts(3, max_jobs=2)) as fake:
            async with Balancer(fake.source()) as lb:
                await my_worker(lb)          # your code, talking to the balancer
            fake.set_status(503)             # upstream outage from now on
            ...

For unit tests without sockets, route an httpx client through
:meth:`FakeUseapi.handle` (or :meth:`FakeUseapi.ahandle`, which honours
:meth:`FakeUseapi.set_delay`)::

    fake = FakeUseapi(make_accounts(2))
    client = httpx.AsyncClient(transport=httpx.MockTransport(fake.handle))
    source = UseapiAccountSource(fake.token, client=client)   # any base_url works

No token appears in the fake's repr or in :attr:`FakeUseapi.request_log`.
"""

from __future__ import annotations

import hmac
import json
import random
import secrets
import socket
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, NamedTuple, Self

import anyio
import anyio.to_thread
import httpx

from .sources import UseapiAccountSource

__all__ = [
    "V1_PATH",
    "V2_PATH",
    "FakeUseapi",
    "LoggedRequest",
    "make_accounts",
    "make_v2_accounts",
    "random_token",
]

V1_PATH = "/v1/pixverse/account"
V2_PATH = "/v2/pixverse/accounts"
_MASK = "********"
NOT_CONFIGURED = (
    b"Configuration not found. To configure an account use POST /v1/pixverse/account/<channel>"
)


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
    limits = _limits(n, max_jobs)
    rng = random.Random(seed)
    server = str(rng.randrange(10**17, 10**18))
    accounts: dict[str, dict[str, Any]] = {}
    for i, limit in enumerate(limits):
        channel = f"{prefix}{i}"
        accounts[channel] = {
            "server": server,
            "channel": channel,
            "discord": f"discord-token-{rng.getrandbits(96):024x}",
            "maxJobs": limit,
        }
    return accounts


def make_v2_accounts(
    n: int, *, max_jobs: int | Sequence[int] = 3, domain: str = "example.com", seed: int = 0
) -> dict[str, dict[str, Any]]:
    """
    Build a raw v2 account map (keyed by email, with a jwt and a password) with ``n`` accounts.

    Raises:
        ValueError: ``n`` is negative or ``max_jobs`` is an empty sequence.
    """
    limits = _limits(n, max_jobs)
    rng = random.Random(seed)
    accounts: dict[str, dict[str, Any]] = {}
    for i, limit in enumerate(limits):
        email = f"user{i}@{domain}"
        accounts[email] = {
            "email": email,
            "maxJobs": limit,
            "jwt": {"token": f"jwt-token-{rng.getrandbits(96):024x}", "expires": 4102444800},
            "password": f"password-{rng.getrandbits(64):016x}",
        }
    return accounts


def _limits(n: int, max_jobs: int | Sequence[int]) -> list[int]:
    if n < 0:
        raise ValueError(f"n must be >= 0, not {n}")
    if isinstance(max_jobs, int):
        return [max_jobs] * n
    if not max_jobs:
        raise ValueError("max_jobs must not be an empty sequence")
    return [max_jobs[i % len(max_jobs)] for i in range(n)]


class LoggedRequest(NamedTuple):
    """One request the fake received; ``headers`` has the authorization value masked."""

    method: str
    path: str
    headers: dict[str, str]


@dataclass(frozen=True, slots=True)
class _Reply:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    delay: float


def _json_reply(status: int, payload: object, delay: float) -> _Reply:
    body = json.dumps(payload).encode()
    return _Reply(status, (("Content-Type", "application/json"),), body, delay)


def _text_reply(status: int, body: bytes, delay: float) -> _Reply:
    return _Reply(status, (("Content-Type", "text/plain; charset=utf-8"),), body, delay)


def _mask_headers(headers: Mapping[str, str]) -> dict[str, str]:
    masked = {}
    for name, value in headers.items():
        if name.lower() in ("authorization", "proxy-authorization", "cookie"):
            scheme = value.split(" ", 1)[0] if " " in value else ""
            value = f"{scheme} {_MASK}" if scheme else _MASK
        masked[name.lower()] = value
    return masked


class FakeUseapi:
    """
    A fake useapi.net account API, over real HTTP on loopback or through ``MockTransport``.

    With no fault set it answers like useapi: 200 and the map as JSON; 401
    ``{"error": "Unauthorized", "code": 401}`` without ``Authorization: Bearer
    <token>``; 404 ``Configuration not found...`` when that endpoint's map is
    ``None``. Every knob is thread-safe and takes effect on the next request.
    Faults apply to the account endpoints only, before the token is checked
    (like an outage in front of useapi); :meth:`clear_fault` restores normal
    service. Other paths answer 404.

    ``start()`` returns as soon as the socket listens; :meth:`wait` blocks
    until :meth:`stop`, so ``start(); wait()`` serves forever (the
    ``balancer fake-server`` command). Both ``with`` and ``async with`` start
    and stop it.

    Args:
        accounts: the raw v1 map served at ``/v1/pixverse/account``, or ``None`` (404).
        token: the API token the fake accepts.
        v2_accounts: the raw v2 map served at ``/v2/pixverse/accounts``, or ``None`` (404).
        port: the loopback port to listen on; 0 picks a free one.
    """

    def __init__(
        self,
        accounts: Mapping[str, Any] | None = None,
        *,
        token: str = "test-api-token",
        v2_accounts: Mapping[str, Any] | None = None,
        port: int = 0,
    ) -> None:
        if not isinstance(token, str) or not token:
            raise ValueError("token must be a non-empty str")
        self._token = token
        self._port = port
        self._lock = threading.Lock()
        self._accounts = None if accounts is None else dict(accounts)
        self._v2_accounts = None if v2_accounts is None else dict(v2_accounts)
        self._fault: _Reply | None = None
        self._delay = 0.0
        self._requests = 0
        self._log: list[LoggedRequest] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()

    # -- knobs ---------------------------------------------------------------

    @property
    def token(self) -> str:
        """The API token the fake accepts (a test value, not a real credential)."""
        return self._token

    def set_accounts(self, raw: Mapping[str, Any] | None) -> None:
        """Serve this raw v1 map from now on; ``None`` answers 404 (nothing configured)."""
        with self._lock:
            self._accounts = None if raw is None else dict(raw)

    def set_v2_accounts(self, raw: Mapping[str, Any] | None) -> None:
        """Serve this raw v2 map from now on; ``None`` answers 404 (nothing configured)."""
        with self._lock:
            self._v2_accounts = None if raw is None else dict(raw)

    def set_status(self, code: int, body: bytes | str | None = None) -> None:
        """Answer every following request with ``code`` (and ``body``, or a default one)."""
        if isinstance(body, str):
            body = body.encode()
        if body is None:
            if code == 401:
                reply = _json_reply(401, {"error": "Unauthorized", "code": 401}, 0.0)
            elif code == 404:
                reply = _text_reply(404, NOT_CONFIGURED, 0.0)
            else:
                try:
                    reason = HTTPStatus(code).phrase
                except ValueError:
                    reason = f"HTTP {code}"
                reply = _json_reply(code, {"error": reason, "code": code}, 0.0)
        else:
            reply = _Reply(code, (("Content-Type", "application/json"),), body, 0.0)
        with self._lock:
            self._fault = reply

    def set_body(self, raw: bytes | str) -> None:
        """Answer every following request with 200 and exactly these bytes (e.g. malformed JSON)."""
        self.set_status(200, raw)

    def set_redirect(self, location: str, status: int = 302) -> None:
        """Answer every following request with a redirect to ``location``."""
        with self._lock:
            self._fault = _Reply(status, (("Location", location),), b"", 0.0)

    def set_delay(self, seconds: float) -> None:
        """Wait this long before answering each request (0 for no delay)."""
        if seconds < 0:
            raise ValueError("delay must be >= 0")
        with self._lock:
            self._delay = float(seconds)

    def clear_fault(self) -> None:
        """Undo :meth:`set_status`, :meth:`set_body`, :meth:`set_redirect` and :meth:`set_delay`."""
        with self._lock:
            self._fault = None
            self._delay = 0.0

    @property
    def requests(self) -> int:
        """How many requests reached the account endpoints."""
        with self._lock:
            return self._requests

    @property
    def request_log(self) -> list[LoggedRequest]:
        """Every request received, oldest first, with credentials masked (a copy)."""
        with self._lock:
            return list(self._log)

    # -- the shared logic ----------------------------------------------------

    def _respond(self, method: str, path: str, headers: Mapping[str, str]) -> _Reply:
        path = path.split("?", 1)[0]
        with self._lock:
            self._log.append(LoggedRequest(method, path, _mask_headers(headers)))
            delay = self._delay
            if path not in (V1_PATH, V2_PATH):
                return _text_reply(404, b"Not Found", delay)
            self._requests += 1
            if self._fault is not None:
                fault = self._fault
                return _Reply(fault.status, fault.headers, fault.body, delay)
            if method != "GET":
                return _Reply(405, (("Allow", "GET"),), b"", delay)
            authorization = next(
                (value for name, value in headers.items() if name.lower() == "authorization"), ""
            )
            expected = f"Bearer {self._token}"
            if not hmac.compare_digest(authorization.encode(), expected.encode()):
                return _json_reply(401, {"error": "Unauthorized", "code": 401}, delay)
            accounts = self._accounts if path == V1_PATH else self._v2_accounts
            if accounts is None:
                return _text_reply(404, NOT_CONFIGURED, delay)
            return _json_reply(200, accounts, delay)

    def handle(self, request: httpx.Request) -> httpx.Response:
        """
        Answer an httpx request without a socket: ``httpx.MockTransport(fake.handle)``.

        Serves any host. :meth:`set_delay` is ignored here (a sync handler would
        block the event loop); use :meth:`ahandle` for delays.
        """
        reply = self._respond(request.method, request.url.raw_path.decode(), request.headers)
        return httpx.Response(reply.status, headers=list(reply.headers), content=reply.body)

    async def ahandle(self, request: httpx.Request) -> httpx.Response:
        """Like :meth:`handle`, but sleeps for :meth:`set_delay` first (asyncio or trio)."""
        reply = self._respond(request.method, request.url.raw_path.decode(), request.headers)
        if reply.delay:
            await anyio.sleep(reply.delay)
        return httpx.Response(reply.status, headers=list(reply.headers), content=reply.body)

    # -- serving over HTTP ---------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the HTTP server is listening."""
        return self._server is not None

    @property
    def port(self) -> int:
        """
        The port the server listens on.

        Raises:
            RuntimeError: the server is not running.
        """
        if self._server is None:
            raise RuntimeError("FakeUseapi is not running; call start() first")
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        """``"http://127.0.0.1:<port>"``, for ``UseapiAccountSource(base_url=...)``."""
        return f"http://127.0.0.1:{self.port}"

    def source(self, *, schema: str = "v1", **kwargs: Any) -> UseapiAccountSource:
        """Return a :class:`~balancer.UseapiAccountSource` pointed at this running fake."""
        return UseapiAccountSource(self._token, base_url=self.base_url, schema=schema, **kwargs)

    def start(self) -> Self:
        """
        Listen on ``127.0.0.1`` and serve from a daemon thread; returns at once.

        Raises:
            RuntimeError: already running.
            OSError: the port is taken.
        """
        if self._server is not None:
            raise RuntimeError("FakeUseapi is already running")
        self._stopping.clear()
        server = _Server(("127.0.0.1", self._port), _Handler, self)
        self._server = server
        self._stopped.clear()
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"FakeUseapi:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, drop open connections and release the port; does nothing if stopped."""
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.close_connections()
        server.server_close()
        if thread is not None:
            thread.join()
        self._server = self._thread = None
        self._stopped.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until :meth:`stop` (from another thread); return False on timeout."""
        return self._stopped.wait(timeout)

    def serve_forever(self) -> None:
        """Start if needed, then block until :meth:`stop` is called from another thread."""
        if self._server is None:
            self.start()
        self.wait()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await anyio.to_thread.run_sync(self.stop)

    def __repr__(self) -> str:
        where = self.base_url if self._server is not None else "stopped"
        v1 = "none" if self._accounts is None else len(self._accounts)
        v2 = "none" if self._v2_accounts is None else len(self._v2_accounts)
        return f"FakeUseapi({where}, v1_accounts={v1}, v2_accounts={v2}, token={_MASK!r})"


class _Server(ThreadingHTTPServer):
    """A threading HTTP server that knows its fake and can drop live connections."""

    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], fake: FakeUseapi
    ) -> None:
        self.fake = fake
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, handler)

    def close_connections(self) -> None:
        with self.connections_lock:
            connections = list(self.connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet: a client that timed out and hung up is an expected event here."""


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; with Nagle's algorithm and
    # delayed ACKs the body waits ~40 ms on loopback for every request.
    disable_nagle_algorithm = True

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        fake = self.server.fake
        reply = fake._respond(self.command, self.path, dict(self.headers.items()))
        if reply.delay and fake._stopping.wait(reply.delay):
            self.close_connection = True
            return
        self.send_response(reply.status)
        for name, value in reply.headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _serve

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output clean."""
