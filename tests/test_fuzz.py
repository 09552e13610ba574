"""
Fuzzing of the two places untrusted bytes enter: ``parse_account_map`` and the HTTP layer.

* ``parse_account_map`` gets arbitrary JSON-like payloads (recursive
  strategies) and near-valid maps of both schemas with credentials planted in
  ``discord`` / ``jwt.token`` / ``password`` and in unexpected fields. It must
  raise nothing but :class:`~balancer.AccountMapError`, lose no key
  (accepted + rejected == keys, disjoint), and quote no credential in a reason.
* ``UseapiAccountSource.fetch`` runs against ``httpx.MockTransport`` handlers
  answering random status codes (100-599), headers (``Location``,
  ``Content-Type``, lying ``Content-Length`` / ``Content-Encoding``) and
  bodies (bytes, truncated JSON, deep nesting, non-UTF-8), and against a real
  loopback raw-socket server that sends raw, possibly truncated or malformed
  HTTP (garbage status lines, connection closed mid-headers, short bodies,
  connections held open). It must return ``ParsedAccounts`` (only for a 200
  whose body is a JSON object) or raise ``AuthError`` / ``ConfigNotFoundError``
  / ``SourceError`` / ``AccountMapError``, within a bound (``anyio.fail_after``
  over a small source timeout), with no credential in any message.

``TestRegressions`` keeps fixed what the fuzzing found (an unparsable redirect
``Location`` escaped as ``httpx.InvalidURL``; a trickling upstream was not cut
at ``timeout``).

The example budget is fixed and derandomized, so CI is deterministic. Long mode
for release checks: ``BALANCER_FUZZ_LONG=1 pytest tests/test_fuzz.py`` multiplies
every budget by 40 (``BALANCER_FUZZ_LONG=<n>`` by ``n``) and draws fresh
random examples each run instead of the fixed ones.
"""

from __future__ import annotations

import json
import os
import re
import socket
import string
import threading
import traceback
from collections.abc import Iterator, Mapping
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balancer import (
    AccountMapError,
    AuthError,
    ConfigNotFoundError,
    ParsedAccounts,
    SourceError,
    UseapiAccountSource,
    parse_account_map,
)

_LONG = os.environ.get("BALANCER_FUZZ_LONG", "")
FACTOR = (int(_LONG) if _LONG.isdigit() and int(_LONG) > 1 else 40) if _LONG else 1


def budget(n: int) -> settings:
    return settings(
        max_examples=n * FACTOR,
        deadline=None,
        derandomize=not _LONG,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


LOOPS = ["asyncio", "trio"]

# Credentials: 24+ letters with no hex digit, so a reason quoting an id, a
# number or a type name can never match an 8-character slice by chance.
TOKEN_ALPHABET = "GHIJKLMNOPQRSTUVWXYZghijklmnopqrstuvwxyz"
tokens = st.text(TOKEN_ALPHABET, min_size=24, max_size=48).map(lambda s: "TQK" + s)
API_TOKEN = "QWZXQWZXPLMNKJHGQWZXRSTUVWXYZQWZX"


def slices(secret: str) -> Iterator[str]:
    yield secret
    for i in range(len(secret) - 7):
        yield secret[i : i + 8]


def assert_no_secret(texts: list[str], secrets: list[str]) -> None:
    for secret in secrets:
        for needle in slices(secret):
            for text in texts:
                assert needle not in text, f"{needle!r} (of a credential) in {text[:300]!r}"


#: Fields that are identifiers, not credentials: an accepted entry shows them.
PUBLIC_FIELDS = ("server", "channel", "email")


def planted(value: object) -> list[str]:
    """Every string in a payload that looks like one of our credentials (keys and ids aside)."""
    found: list[str] = []
    if isinstance(value, str):
        if value.startswith("TQK"):
            found.append(value)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if key not in PUBLIC_FIELDS:
                found += planted(item)
    elif isinstance(value, list | tuple):
        for item in value:
            found += planted(item)
    return found


# -- strategies ---------------------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    tokens,
)


def _containers(inner: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    return st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    )


json_values = st.recursive(scalars, _containers, max_leaves=20)
max_jobs_values = st.one_of(
    st.integers(-3, 12),
    st.integers(-(2**70), 2**70),
    st.booleans(),
    st.none(),
    st.floats(),
    st.sampled_from(["5", "", "1e3"]),
    tokens,
    json_values,
)
keys = st.one_of(st.text(max_size=10), st.sampled_from(["", " ", "ch1", "a@b.c"]))


@st.composite
def v1_entries(draw: st.DrawFn, key: str) -> object:
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    entry: dict[str, object] = {}
    if draw(st.booleans()):
        entry["maxJobs"] = draw(max_jobs_values)
    if draw(st.integers(0, 3)):
        entry["discord"] = draw(st.one_of(tokens, tokens, json_values))
    if draw(st.booleans()):
        entry["channel"] = draw(st.one_of(st.just(key), st.none(), tokens, json_values))
    if draw(st.booleans()):
        entry["server"] = draw(st.one_of(st.text(string.digits, max_size=18), tokens, json_values))
    if draw(st.integers(0, 3)) == 0:
        entry[draw(st.text(max_size=6))] = draw(st.one_of(tokens, json_values))
    return entry


@st.composite
def v2_entries(draw: st.DrawFn, key: str) -> object:
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    entry: dict[str, object] = {}
    if draw(st.booleans()):
        entry["maxJobs"] = draw(max_jobs_values)
    if draw(st.integers(0, 3)):
        jwt: object = {"token": draw(st.one_of(tokens, tokens, json_values)), "expires": 1}
        if draw(st.integers(0, 4)) == 0:
            jwt = draw(st.one_of(tokens, json_values))
        entry["jwt"] = jwt
    if draw(st.booleans()):
        entry["password"] = draw(tokens)
    if draw(st.booleans()):
        entry["email"] = draw(st.one_of(st.just(key), st.none(), tokens, json_values))
    if draw(st.integers(0, 3)) == 0:
        entry[draw(st.text(max_size=6))] = draw(st.one_of(tokens, json_values))
    return entry


@st.composite
def account_maps(draw: st.DrawFn) -> tuple[str, object]:
    schema = draw(st.sampled_from(["v1", "v2"]))
    if draw(st.integers(0, 5)) == 0:
        return schema, draw(json_values)  # anything at all, object or not
    entries = v1_entries if schema == "v1" else v2_entries
    names = draw(st.lists(keys, max_size=8, unique=True))
    return schema, {name: draw(entries(name)) for name in names}


# -- parse_account_map ------------------------------------------------------------------


class TestParseAccountMapFuzz:
    @budget(150)
    @given(account_maps())
    def test_never_raises_never_loses_a_key_never_quotes_a_secret(
        self, case: tuple[str, object]
    ) -> None:
        schema, payload = case
        try:
            parsed = parse_account_map(payload, schema=schema)
        except AccountMapError as exc:
            assert not isinstance(payload, Mapping)
            assert_no_secret([str(exc), repr(exc)], planted(payload))
            return
        assert isinstance(payload, Mapping)
        accepted = set(parsed.accounts)
        rejected = [r.key for r in parsed.rejected]
        assert len(rejected) == len(set(rejected))
        assert not accepted & set(rejected)
        assert accepted | set(rejected) == set(payload)
        assert len(accepted) + len(rejected) == len(payload)
        for key, account in parsed.accounts.items():
            entry = payload[key]
            assert isinstance(entry, Mapping)
            assert account.channel == key and key.strip()
            assert account.max_jobs == entry["maxJobs"] and account.max_jobs >= 1
            assert not isinstance(entry["maxJobs"], bool)
            if schema == "v2":
                assert account.server is None
        texts = [r.reason for r in parsed.rejected]
        texts += [repr(parsed), str(parsed), *(repr(a) for a in parsed.accounts.values())]
        # Keys and ids are not credentials: they may be echoed, nothing else.
        public = set(payload)
        for entry in payload.values():
            if isinstance(entry, Mapping):
                public.update(str(entry.get(f)) for f in PUBLIC_FIELDS)
        assert_no_secret(texts, [s for s in planted(payload) if s not in public])

    @budget(60)
    @given(st.dictionaries(st.one_of(st.integers(), st.none(), st.booleans()), json_values))
    def test_non_string_keys_are_rejected_not_raised(self, payload: dict[Any, Any]) -> None:
        parsed = parse_account_map(payload)
        assert parsed.accounts == {}
        assert len(parsed.rejected) == len(payload)

    @budget(40)
    @given(st.integers(1, 3000), st.sampled_from(["[", '{"a":']))
    def test_deep_nesting(self, depth: int, opener: str) -> None:
        """Deeply nested entries are rejected or accepted, never a RecursionError."""
        inner: object = 1
        for _ in range(min(depth, 200)):
            inner = [inner] if opener == "[" else {"a": inner}
        parse_account_map({"k": {"maxJobs": 1, "discord": inner}})
        parse_account_map({"k": inner}, schema="v2")


# -- the HTTP layer: MockTransport ------------------------------------------------------

EXPECTED = (AuthError, ConfigNotFoundError, SourceError, AccountMapError)
DISCORD = "TQKDISCORDTOKENGHIJKLMNOPQRSTUVWXYZ"


def body_strategy() -> st.SearchStrategy[bytes]:
    good = {"ch1": {"channel": "ch1", "discord": DISCORD, "maxJobs": 2}}
    text = json.dumps(good)
    return st.one_of(
        st.binary(max_size=200),
        st.just(text.encode()),
        st.integers(0, len(text)).map(lambda n: text[:n].encode()),  # truncated JSON
        json_values.map(lambda v: json.dumps(v).encode()),
        st.integers(1, 100_000).map(lambda n: b"[" * n + b"]" * (n % 3)),  # huge nesting
        st.integers(1, 50_000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
        st.just(b"\xff\xfe" + text.encode("utf-16-le")),  # not UTF-8
        st.just(text.encode() + b"\x80"),
        st.just(b"\xef\xbb\xbf" + text.encode()),  # UTF-8 BOM
        st.just(('{"ch1": {"maxJobs": ' + "9" * 5000 + "}}").encode()),  # int too long
        st.just(f'"{DISCORD}"'.encode()),
        st.just(b""),
    )


header_values = st.text(string.ascii_letters + string.digits + " /;=-_.:?&%", max_size=30).map(
    str.strip
)
header_strategy = st.lists(
    st.one_of(
        st.tuples(st.just("Location"), st.one_of(header_values, st.just(f"http://x/{API_TOKEN}"))),
        st.tuples(
            st.just("Content-Type"),
            st.sampled_from(
                [
                    "application/json",
                    "text/html",
                    "application/json; charset=latin-1",
                    "",
                    "multipart/form-data; boundary=x",
                ]
            ),
        ),
        st.tuples(st.just("Content-Length"), st.integers(0, 10**6).map(str)),
        st.tuples(st.just("Content-Encoding"), st.sampled_from(["gzip", "br", "deflate", "zstd"])),
        st.tuples(st.just("Transfer-Encoding"), st.sampled_from(["chunked", "gzip"])),
        st.tuples(st.just("Retry-After"), header_values),
        st.tuples(st.sampled_from(["X-Junk", "Set-Cookie", "WWW-Authenticate"]), header_values),
    ),
    max_size=4,
)
status_strategy = st.one_of(
    st.integers(100, 599),
    st.sampled_from([200, 200, 200, 301, 302, 307, 401, 403, 404, 429, 500, 503]),
)


def check_outcome(
    outcome: ParsedAccounts | BaseException, status: int, body: bytes, secrets: list[str]
) -> None:
    if isinstance(outcome, ParsedAccounts):
        assert status == 200
        assert isinstance(json.loads(body.decode("utf-8")), dict)
        texts = [repr(outcome), *(r.reason for r in outcome.rejected)]
    else:
        assert isinstance(outcome, EXPECTED), repr(outcome)
        if isinstance(outcome, AuthError):
            assert status in (401, 403)
        if isinstance(outcome, ConfigNotFoundError):
            assert status == 404
        texts = ["".join(traceback.format_exception(outcome))]
        link: BaseException | None = outcome
        while link is not None:  # the whole chain, suppressed contexts included
            texts += [str(link), repr(link), repr(vars(link))]
            link = link.__cause__ or link.__context__
    assert_no_secret(texts, secrets)


async def fetch_with(transport: httpx.AsyncBaseTransport) -> ParsedAccounts | BaseException:
    async with httpx.AsyncClient(transport=transport) as client:
        source = UseapiAccountSource(API_TOKEN, client=client, timeout=0.5)
        try:
            with anyio.fail_after(5):
                return await source.fetch()
        except EXPECTED as exc:
            return exc


class TestHttpFuzzMock:
    @pytest.mark.parametrize("loop", LOOPS)
    @budget(150)
    @given(status=status_strategy, headers=header_strategy, body=body_strategy())
    def test_any_response_maps_to_a_documented_outcome(
        self, loop: str, status: int, headers: list[tuple[str, str]], body: bytes
    ) -> None:
        seen: list[httpx.Request] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            return httpx.Response(status, headers=headers, content=body)

        outcome = anyio.run(fetch_with, httpx.MockTransport(handler), backend=loop)
        if isinstance(outcome, httpx.InvalidURL):
            assert 300 <= status < 400 and any(name == "Location" for name, _ in headers)
            return
        assert len(seen) == 1, "exactly one request: no redirect is ever followed"
        assert seen[0].headers["authorization"] == f"Bearer {API_TOKEN}"
        decodable = not any(
            name in ("Content-Encoding", "Transfer-Encoding") for name, _ in headers
        )
        if decodable or not isinstance(outcome, ParsedAccounts):
            check_outcome(outcome, status, body, [API_TOKEN, DISCORD])

    @pytest.mark.parametrize("loop", LOOPS)
    @budget(40)
    @given(
        error=st.sampled_from(
            [
                httpx.ConnectError,
                httpx.ReadError,
                httpx.WriteError,
                httpx.ReadTimeout,
                httpx.ConnectTimeout,
                httpx.PoolTimeout,
                httpx.RemoteProtocolError,
                httpx.LocalProtocolError,
                httpx.DecodingError,
                httpx.ProxyError,
                httpx.UnsupportedProtocol,
            ]
        ),
        message=st.sampled_from(["", "boom", f"peer sent {DISCORD}"]),
    )
    def test_transport_errors_are_source_errors(
        self, loop: str, error: type[httpx.RequestError], message: str
    ) -> None:
        def handler(request: httpx.Request) -> httpx.Response:
            raise error(message, request=request)

        outcome = anyio.run(fetch_with, httpx.MockTransport(handler), backend=loop)
        assert isinstance(outcome, SourceError), outcome
        assert outcome.status_code is None
        assert DISCORD not in str(outcome) and API_TOKEN not in str(outcome)


# -- the HTTP layer: a raw loopback socket server --------------------------------------


class RawServer:
    """
    A loopback server that answers each connection with ``script``: raw bytes,
    then either a close or a hold (the connection stays open, silent).
    """

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port: int = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        self.reply = b""
        self.hold = False
        self.trickle = 0.0  # seconds between bytes (0: all at once)
        self.requests: list[bytes] = []
        self.stopping = threading.Event()
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, name="raw-http", daemon=True)
        self.thread.start()

    def script(self, reply: bytes, hold: bool, trickle: float = 0.0) -> None:
        with self.lock:
            self.reply, self.hold, self.trickle = reply, hold, trickle
            self.requests.clear()
            held, self.held = self.held, []
        for conn in held:
            conn.close()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.settimeout(2)
            data = b""
            try:
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                with self.lock:
                    self.requests.append(data)
                    reply, hold, trickle = self.reply, self.hold, self.trickle
                if trickle:
                    for i in range(0, len(reply), 8):
                        conn.sendall(reply[i : i + 8])
                        self.stopping.wait(trickle)
                else:
                    conn.sendall(reply)
            except OSError:
                conn.close()
                continue
            if hold:
                with self.lock:
                    self.held.append(conn)
            else:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.close()

    def close(self) -> None:
        self.stopping.set()
        try:  # wake accept()
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            pass
        self.sock.close()
        self.script(b"", False)
        self.thread.join(5)


@pytest.fixture(scope="module")
def raw_server() -> Iterator[RawServer]:
    server = RawServer()
    yield server
    server.close()


GOOD_BODY = json.dumps({"ch1": {"channel": "ch1", "discord": DISCORD, "maxJobs": 2}}).encode()


@st.composite
def raw_responses(draw: st.DrawFn) -> tuple[bytes, bool, int | None]:
    """Raw response bytes, whether to hold the connection open, and the status if well-formed."""
    status = draw(status_strategy)
    body = draw(st.one_of(st.just(GOOD_BODY), body_strategy()))
    status_line = draw(
        st.one_of(
            st.just(f"HTTP/1.1 {status} X\r\n".encode()),
            st.just(f"HTTP/1.0 {status} \r\n".encode()),
            st.sampled_from(
                [
                    b"HTTP/1.1 2OO OK\r\n",
                    b"garbage\r\n",
                    b"HTTP/9.9 200 OK\r\n",
                    b"\r\n",
                    b"HTTP/1.1 200\n",
                    b"ICY 200 OK\r\n",
                    f"HTTP/1.1 200 {DISCORD}\r\n".encode(),
                ]
            ),
            st.binary(max_size=30),
        )
    )
    well_formed = (
        status_line.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")) and status_line[9:12].isdigit()
    )
    length = draw(
        st.one_of(
            st.just(len(body)),
            st.integers(0, len(body) + 50),  # a lie, short or long
            st.none(),  # no length: body until close
        )
    )
    headers = b"Content-Type: application/json\r\n"
    if length is not None:
        headers += f"Content-Length: {length}\r\n".encode()
    if draw(st.integers(0, 6)) == 0:
        headers += draw(
            st.sampled_from(
                [
                    b"Transfer-Encoding: chunked\r\n",
                    b"Content-Encoding: gzip\r\n",
                    b"Bad Header Line\r\n",
                    b"Location: http://127.0.0.1:9/\r\n",
                    f"X-Echo: {DISCORD}\r\n".encode(),
                    b"Content-Length: 1\r\n",
                ]
            )
        )
    raw = status_line + headers + b"\r\n" + body
    cut = draw(st.one_of(st.none(), st.integers(0, len(raw))))  # truncate anywhere
    if cut is not None:
        raw = raw[:cut]
    hold = draw(st.integers(0, 5)) == 0  # some connections stay open, silent
    return raw, hold, status if well_formed else None


async def fetch_raw(port: int) -> ParsedAccounts | BaseException:
    source = UseapiAccountSource(API_TOKEN, base_url=f"http://127.0.0.1:{port}", timeout=0.2)
    try:
        with anyio.fail_after(5):
            async with source:
                return await source.fetch()
    except EXPECTED as exc:
        return exc


# httpx leaves its body generators to the finalizer when a read times out mid-body;
# trio warns about that (encode/httpx#3686, not this library's doing).
HTTPX_TRIO_GENERATORS = [
    (
        "ignore:Exception ignored in. <async_generator object "
        "(AsyncResponseStream|BoundAsyncStream|Response|ByteStream):"
        "pytest.PytestUnraisableExceptionWarning"
    ),
    "ignore:Async generator 'httpx:ResourceWarning",
]


class TestHttpFuzzRawSocket:
    @pytest.mark.parametrize("loop", LOOPS)
    @pytest.mark.filterwarnings(*HTTPX_TRIO_GENERATORS)
    @budget(40)
    @given(case=raw_responses())
    def test_malformed_wire_bytes_map_to_a_documented_outcome(
        self, loop: str, raw_server: RawServer, case: tuple[bytes, bool, int | None]
    ) -> None:
        raw, hold, _ = case
        raw_server.script(raw, hold)
        outcome = anyio.run(fetch_raw, raw_server.port, backend=loop)
        with raw_server.lock:
            requests = list(raw_server.requests)
        assert len(requests) <= 1, "no retry, no redirect followed"
        if requests:
            assert f"Bearer {API_TOKEN}".encode() in requests[0]
        if isinstance(outcome, ParsedAccounts):
            assert re.match(rb"HTTP/\d\.\d 200[ \r\n]", raw), raw[:40]
            texts = [repr(outcome), *(r.reason for r in outcome.rejected)]
        else:
            assert isinstance(outcome, EXPECTED), repr(outcome)
            texts = [str(outcome), repr(outcome), repr(vars(outcome))]
        assert_no_secret(texts, [API_TOKEN, DISCORD])


class TestRegressions:
    """Bugs this suite found, each fixed; these keep them fixed."""

    @pytest.mark.parametrize("loop", LOOPS)
    @pytest.mark.parametrize("location", ["mailto:ops@example.com", "A:0"])
    def test_a_redirect_to_an_unparsable_location_is_a_source_error(
        self, loop: str, location: str
    ) -> None:
        def handler(request: httpx.Request) -> httpx.Response:
            return httpx.Response(302, headers={"Location": location})

        async def fetch() -> BaseException | None:
            async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
                try:
                    await UseapiAccountSource(API_TOKEN, client=client).fetch()
                except Exception as exc:  # noqa: BLE001 - whatever escapes is the finding
                    return exc
            return None

        outcome = anyio.run(fetch, backend=loop)
        assert isinstance(outcome, SourceError), repr(outcome)

    @pytest.mark.parametrize("loop", LOOPS)
    @pytest.mark.filterwarnings(*HTTPX_TRIO_GENERATORS)
    def test_a_trickling_upstream_is_cut_at_the_timeout(
        self, loop: str, raw_server: RawServer
    ) -> None:
        body = GOOD_BODY + b" " * 200
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        raw_server.script(head + body, hold=False, trickle=0.05)  # ~2 s in all

        async def timed() -> tuple[float, ParsedAccounts | BaseException]:
            started = anyio.current_time()
            outcome = await fetch_raw(raw_server.port)  # timeout=0.2
            return anyio.current_time() - started, outcome

        took, outcome = anyio.run(timed, backend=loop)
        raw_server.script(b"", False)
        assert took < 1.0, f"fetch() with timeout=0.2 took {took:.1f}s"
        assert isinstance(outcome, SourceError)
