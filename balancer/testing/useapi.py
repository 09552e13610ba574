"""
A fake useapi.net account API for tests: :class:`FakeUseapi`.

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
import threading
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any, NamedTuple, Self

import anyio
import anyio.to_thread
import httpx

from ..accounts import MASK
from ..sources import UseapiAccountSource
from ._http import Reply, Server

__all__ = ["NOT_CONFIGURED", "V1_PATH", "V2_PATH", "FakeUseapi", "LoggedRequest"]

V1_PATH = "/v1/pixverse/account"
V2_PATH = "/v2/pixverse/accounts"
NOT_CONFIGURED = (
    b"Configuration not found. To configure an account use POST /v1/pixverse/account/<channel>"
)


class LoggedRequest(NamedTuple):
    """One request the fake received; ``headers`` has the authorization value masked."""

    method: str
    path: str
    headers: dict[str, str]


def _json_reply(status: int, payload: object, delay: float) -> Reply:
    body = json.dumps(payload).encode()
    return Reply(status, (("Content-Type", "application/json"),), body, delay)


def _text_reply(status: int, body: bytes, delay: float) -> Reply:
    return Reply(status, (("Content-Type", "text/plain; charset=utf-8"),), body, delay)


def _mask_headers(headers: Mapping[str, str]) -> dict[str, str]:
    masked = {}
    for name, value in headers.items():
        if name.lower() in ("authorization", "proxy-authorization", "cookie"):
            scheme = value.split(" ", 1)[0] if " " in value else ""
            value = f"{scheme} {MASK}" if scheme else MASK
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
        self._fault: Reply | None = None
        self._delay = 0.0
        self._requests = 0
        self._log: list[LoggedRequest] = []
        self._server: Server | None = None
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
            reply = Reply(code, (("Content-Type", "application/json"),), body, 0.0)
        with self._lock:
            self._fault = reply

    def set_body(self, raw: bytes | str) -> None:
        """Answer every following request with 200 and exactly these bytes (e.g. malformed JSON)."""
        self.set_status(200, raw)

    def set_redirect(self, location: str, status: int = 302) -> None:
        """Answer every following request with a redirect to ``location``."""
        with self._lock:
            self._fault = Reply(status, (("Location", location),), b"", 0.0)

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

    def _respond(self, method: str, path: str, headers: Mapping[str, str]) -> Reply:
        path = path.split("?", 1)[0]
        with self._lock:
            self._log.append(LoggedRequest(method, path, _mask_headers(headers)))
            delay = self._delay
            if path not in (V1_PATH, V2_PATH):
                return _text_reply(404, b"Not Found", delay)
            self._requests += 1
            if self._fault is not None:
                fault = self._fault
                return Reply(fault.status, fault.headers, fault.body, delay)
            if method != "GET":
                return Reply(405, (("Allow", "GET"),), b"", delay)
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
        server = Server(("127.0.0.1", self._port), self._respond, self._stopping)
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

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await anyio.to_thread.run_sync(self.stop)

    def __repr__(self) -> str:
        where = self.base_url if self._server is not None else "stopped"
        v1 = "none" if self._accounts is None else len(self._accounts)
        v2 = "none" if self._v2_accounts is None else len(self._v2_accounts)
        return f"FakeUseapi({where}, v1_accounts={v1}, v2_accounts={v2}, token={MASK!r})"
