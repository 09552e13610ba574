from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from balancer.accounts import Account, ParsedAccounts, Secret
from balancer.errors import AccountMapError, AuthError, ConfigNotFoundError, SourceError
from balancer.sources import AccountSource, StaticAccountSource, UseapiAccountSource
from balancer.testing import FakeUseapi, make_accounts, make_v2_accounts

TOKEN = "useapi-SECRET-token-0123456789"
BASE = "https://api.useapi.net"


class App:
    """A recording MockTransport handler: answers by host, remembers every request."""

    def __init__(
        self,
        status: int = 200,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        other: Callable[[httpx.Request], httpx.Response] | None = None,
    ) -> None:
        self.status = status
        self.body = json.dumps(make_accounts(2)).encode() if body is None else body
        self.headers = headers or {}
        self.other = other
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.host != "api.useapi.net" and self.other is not None:
            return self.other(request)
        return httpx.Response(self.status, headers=self.headers, content=self.body)

    def for_host(self, host: str) -> list[httpx.Request]:
        return [r for r in self.requests if r.url.host == host]


def mock_client(app: Callable[[httpx.Request], httpx.Response], **kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(app), **kwargs)


def assert_no_token(exc: BaseException) -> None:
    seen: BaseException | None = exc
    while seen is not None:
        assert TOKEN not in str(seen)
        assert TOKEN not in repr(seen)
        seen = seen.__cause__ or seen.__context__


async def fetch_with(app: App, **kwargs: Any) -> ParsedAccounts:
    async with mock_client(app) as client:
        return await UseapiAccountSource(TOKEN, client=client, **kwargs).fetch()


@pytest.fixture
def fake() -> Iterator[FakeUseapi]:
    with FakeUseapi(make_accounts(3), token=TOKEN, v2_accounts=make_v2_accounts(2)) as server:
        yield server


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class TestUseapiAccountSourceValidation:
    @pytest.mark.parametrize("token", [None, 123, b"bytes"])
    def test_non_str_token_raises_type_error(self, token: Any):
        """The token must be a str."""
        with pytest.raises(TypeError):
            UseapiAccountSource(token)

    @pytest.mark.parametrize("token", ["", "has space", "line\nbreak", "caf\u00e9"])
    def test_bad_token_raises_value_error_without_echoing_it(self, token: str):
        """An empty or non-printable-ASCII token is refused, and the message does not quote it."""
        with pytest.raises(ValueError) as info:
            UseapiAccountSource(token)
        assert not token or token not in str(info.value)

    def test_unknown_schema_raises_value_error(self):
        """Only v1 and v2 are supported."""
        with pytest.raises(ValueError):
            UseapiAccountSource(TOKEN, schema="v3")

    @pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf")])
    def test_bad_timeout_raises_value_error(self, timeout: float):
        """The timeout must be positive and finite."""
        with pytest.raises(ValueError):
            UseapiAccountSource(TOKEN, timeout=timeout)

    @pytest.mark.parametrize("timeout", ["5", None, True])
    def test_non_number_timeout_raises_type_error(self, timeout: Any):
        """The timeout must be a number."""
        with pytest.raises(TypeError):
            UseapiAccountSource(TOKEN, timeout=timeout)

    @pytest.mark.parametrize(
        "base_url",
        [
            "http://api.useapi.net",
            "http://10.0.0.1",
            "http://128.0.0.1",
            "http://localhost.example.com",
            "ftp://api.useapi.net",
            "ws://localhost",
            "api.useapi.net",
            "https://",
            "https://user:pw@api.useapi.net",
            "https://api.useapi.net/?x=1",
        ],
    )
    def test_bad_base_url_raises_value_error(self, base_url: str):
        """Only https, or http to a loopback host, is allowed as base URL."""
        with pytest.raises(ValueError):
            UseapiAccountSource(TOKEN, base_url=base_url)

    @pytest.mark.parametrize(
        "base_url",
        [
            "http://localhost",
            "http://LOCALHOST:8080",
            "http://127.0.0.1:9000",
            "http://127.0.0.5",
            "http://127.255.255.254",
            "http://[::1]:9000",
            "https://api.useapi.net/",
            "https://proxy.example.com/useapi",
        ],
    )
    def test_good_base_url_accepted(self, base_url: str):
        """https anywhere and http on loopback are accepted."""
        source = UseapiAccountSource(TOKEN, base_url=base_url)
        assert source.base_url == base_url.rstrip("/").lower()

    def test_non_async_client_raises_type_error(self):
        """The client must be an httpx.AsyncClient."""
        with httpx.Client() as client, pytest.raises(TypeError):
            UseapiAccountSource(TOKEN, client=client)  # type: ignore[arg-type]

    def test_properties_and_repr(self):
        """base_url and schema are exposed; the repr shows them and masks the token."""
        source = UseapiAccountSource(TOKEN, base_url="http://127.0.0.1:1", schema="v2")
        assert source.base_url == "http://127.0.0.1:1"
        assert source.schema == "v2"
        assert source.timeout == 10.0
        text = repr(source) + str(source) + repr(vars(source))
        assert TOKEN not in text
        assert "http://127.0.0.1:1" in repr(source)
        assert "'v2'" in repr(source)

    def test_is_an_account_source(self):
        """Both sources satisfy the AccountSource protocol."""
        assert isinstance(UseapiAccountSource(TOKEN), AccountSource)
        assert isinstance(StaticAccountSource({}), AccountSource)


class TestUseapiAccountSourceMock:
    async def test_v1_request(self):
        """v1 GETs /v1/pixverse/account with the bearer token and parses the map."""
        app = App()
        parsed = await fetch_with(app)
        assert set(parsed.accounts) == {"ch0", "ch1"}
        (request,) = app.requests
        assert request.method == "GET"
        assert str(request.url) == "https://api.useapi.net/v1/pixverse/account"
        assert request.headers["Authorization"] == f"Bearer {TOKEN}"

    async def test_v2_request(self):
        """v2 GETs /v2/pixverse/accounts and parses the email-keyed map."""
        app = App(body=json.dumps(make_v2_accounts(2)).encode())
        parsed = await fetch_with(app, schema="v2")
        assert app.requests[0].url.path == "/v2/pixverse/accounts"
        assert set(parsed.accounts) == {"user0@example.com", "user1@example.com"}
        assert all(a.server is None for a in parsed.accounts.values())

    async def test_base_url_path_prefix_kept(self):
        """A base URL with a path prefix keeps it in front of the endpoint."""
        app = App()
        await fetch_with(app, base_url="https://api.useapi.net/proxy/")
        assert app.requests[0].url.path == "/proxy/v1/pixverse/account"

    @pytest.mark.parametrize(
        ("status", "error"),
        [
            (401, AuthError),
            (403, AuthError),
            (404, ConfigNotFoundError),
            (429, SourceError),
            (500, SourceError),
            (502, SourceError),
            (503, SourceError),
            (301, SourceError),
            (302, SourceError),
            (307, SourceError),
            (308, SourceError),
            (204, SourceError),
            (418, SourceError),
        ],
    )
    async def test_status_mapping(self, status: int, error: type[Exception]):
        """Each non-200 status maps to its error, with the status code kept."""
        app = App(status=status, body=b'{"error": "x"}', headers={"Location": "/elsewhere"})
        with pytest.raises(error) as info:
            await fetch_with(app)
        assert type(info.value) is error
        assert info.value.status_code == status  # type: ignore[attr-defined]
        assert len(app.requests) == 1
        assert_no_token(info.value)

    @pytest.mark.parametrize(
        "body",
        [b"{not json", b"", b"\xff\xfe\x00garbage", b"[1, 2]", b'"text"', b"null", b"[" * 100_000],
    )
    async def test_bad_200_body_raises_account_map_error(self, body: bytes):
        """A 200 whose body is not a JSON object raises AccountMapError."""
        with pytest.raises(AccountMapError) as info:
            await fetch_with(App(body=body))
        assert_no_token(info.value)

    async def test_malformed_body_error_does_not_quote_body(self):
        """The JSON error names a position, never the body's secrets."""
        body = b'{"c1": {"discord": "discord-SECRET-xyz", "maxJobs": 3,}}'
        with pytest.raises(AccountMapError) as info:
            await fetch_with(App(body=body))
        assert "SECRET" not in str(info.value)
        assert info.value.__cause__ is None

    @pytest.mark.parametrize(
        "exc",
        [
            httpx.ConnectError("connection refused"),
            httpx.ReadTimeout("timed out"),
            httpx.ConnectTimeout("timed out"),
            httpx.RemoteProtocolError("peer closed"),
            httpx.ReadError("reset"),
        ],
    )
    async def test_transport_errors_raise_source_error(self, exc: httpx.HTTPError):
        """Network faults and timeouts become SourceError without a status code."""

        def boom(request: httpx.Request) -> httpx.Response:
            raise exc

        async with mock_client(boom) as client:
            with pytest.raises(SourceError) as info:
                await UseapiAccountSource(TOKEN, client=client).fetch()
        assert info.value.status_code is None
        assert info.value.__cause__ is exc
        assert_no_token(info.value)

    async def test_redirect_not_followed_and_token_stays_home(self):
        """A redirect to another origin is a SourceError and the other origin sees nothing."""
        app = App(status=302, headers={"Location": "https://evil.example/steal"})
        with pytest.raises(SourceError) as info:
            await fetch_with(app)
        assert info.value.status_code == 302
        assert app.for_host("evil.example") == []

    async def test_following_client_still_does_not_follow(self):
        """A user client with follow_redirects=True does not make the source follow."""
        app = App(
            status=302,
            headers={"Location": "https://evil.example/steal"},
            other=lambda request: httpx.Response(200, json={}),
        )
        async with mock_client(app, follow_redirects=True) as client:
            with pytest.raises(SourceError):
                await UseapiAccountSource(TOKEN, client=client).fetch()
        assert app.for_host("evil.example") == []
        assert len(app.requests) == 1

    async def test_client_auth_and_base_url_overridden(self):
        """A user client's own auth and base_url change neither the URL nor the token."""
        app = App()
        async with mock_client(
            app, auth=("user", "password-SECRET"), base_url="https://evil.example"
        ) as client:
            await UseapiAccountSource(TOKEN, client=client).fetch()
        (request,) = app.requests
        assert request.url.host == "api.useapi.net"
        assert request.headers["Authorization"] == f"Bearer {TOKEN}"

    @pytest.mark.parametrize(
        "url",
        [
            "https://evil.example/v1/pixverse/account",
            "http://api.useapi.net/v1/pixverse/account",
            "https://api.useapi.net:8443/v1/pixverse/account",
            "https://useapi.net/v1/pixverse/account",
        ],
    )
    async def test_auth_never_attaches_to_another_origin(self, url: str):
        """The source's httpx.Auth adds the token only for base_url's scheme, host and port."""
        app = App(other=lambda request: httpx.Response(200, json={}))
        source = UseapiAccountSource(TOKEN)
        async with mock_client(app, follow_redirects=True) as client:
            await client.get(url, auth=source._auth)
            await client.get("https://api.useapi.net:443/x", auth=source._auth)
        assert "Authorization" not in app.requests[0].headers
        assert app.requests[1].headers["Authorization"] == f"Bearer {TOKEN}"
        assert TOKEN not in repr(source._auth)

    async def test_passed_in_client_not_closed(self):
        """aclose() leaves a caller's client open and usable."""
        app = App()
        async with mock_client(app) as client:
            source = UseapiAccountSource(TOKEN, client=client)
            await source.fetch()
            await source.aclose()
            assert not client.is_closed
            await source.fetch()
        assert len(app.requests) == 2

    async def test_own_client_closed_and_recreated(self, fake: FakeUseapi):
        """aclose() closes the source's own client; a later fetch opens a new one."""
        source = UseapiAccountSource(TOKEN, base_url=fake.base_url)
        await source.fetch()
        own = source._client
        assert own is not None
        await source.aclose()
        assert own.is_closed
        await source.fetch()
        async with source:
            pass
        assert fake.requests == 2


class TestUseapiAccountSourceLoopback:
    async def test_v1_200(self, fake: FakeUseapi):
        """A real HTTP fetch of the v1 map yields its accounts."""
        async with fake.source() as source:
            parsed = await source.fetch()
        assert set(parsed.accounts) == {"ch0", "ch1", "ch2"}
        assert parsed.accounts["ch0"].discord.reveal().startswith("discord-token-")
        assert fake.request_log[-1].headers["authorization"] == "Bearer ********"

    async def test_v2_200(self, fake: FakeUseapi):
        """A real HTTP fetch of the v2 map yields the email-keyed accounts."""
        async with fake.source(schema="v2") as source:
            parsed = await source.fetch()
        assert set(parsed.accounts) == {"user0@example.com", "user1@example.com"}
        assert fake.request_log[-1].path == "/v2/pixverse/accounts"

    async def test_wrong_token_raises_auth_error(self, fake: FakeUseapi):
        """The fake's 401 for a wrong token becomes AuthError(401)."""
        async with UseapiAccountSource("wrong-token", base_url=fake.base_url) as source:
            with pytest.raises(AuthError) as info:
                await source.fetch()
        assert info.value.status_code == 401

    @pytest.mark.parametrize(
        ("status", "error"),
        [
            (401, AuthError),
            (403, AuthError),
            (404, ConfigNotFoundError),
            (429, SourceError),
            (500, SourceError),
            (503, SourceError),
        ],
    )
    async def test_forced_status(self, fake: FakeUseapi, status: int, error: type[Exception]):
        """A forced upstream status maps to its error over real HTTP."""
        fake.set_status(status)
        async with fake.source() as source:
            with pytest.raises(error) as info:
                await source.fetch()
        assert info.value.status_code == status  # type: ignore[attr-defined]
        assert_no_token(info.value)

    async def test_unconfigured_raises_config_not_found(self, fake: FakeUseapi):
        """No account configured upstream (404) raises ConfigNotFoundError."""
        fake.set_accounts(None)
        async with fake.source() as source:
            with pytest.raises(ConfigNotFoundError):
                await source.fetch()

    @pytest.mark.parametrize("body", [b'{"ch0": {"maxJobs": 3', b"[]", b"\x80\x81"])
    async def test_bad_body_raises_account_map_error(self, fake: FakeUseapi, body: bytes):
        """A malformed or non-object 200 body raises AccountMapError."""
        fake.set_body(body)
        async with fake.source() as source:
            with pytest.raises(AccountMapError):
                await source.fetch()

    async def test_connection_refused_raises_source_error(self):
        """Nothing listening on the port raises SourceError without a status."""
        url = f"http://127.0.0.1:{closed_port()}"
        async with UseapiAccountSource(TOKEN, base_url=url, timeout=2) as source:
            with pytest.raises(SourceError) as info:
                await source.fetch()
        assert info.value.status_code is None
        assert isinstance(info.value.__cause__, httpx.ConnectError)
        assert_no_token(info.value)

    async def test_read_timeout_raises_source_error(self, fake: FakeUseapi):
        """An answer slower than the timeout raises SourceError without a status."""
        fake.set_delay(5)
        async with fake.source(timeout=0.2) as source:
            with pytest.raises(SourceError) as info:
                await source.fetch()
        assert info.value.status_code is None
        # httpx's per-read timeout or the whole-request bound, whichever fires first
        assert isinstance(info.value.__cause__, httpx.TimeoutException | TimeoutError)

    async def test_redirect_raises_source_error(self, fake: FakeUseapi):
        """A redirect from the fake is not followed."""
        fake.set_redirect("https://evil.example/steal")
        async with fake.source() as source:
            with pytest.raises(SourceError) as info:
                await source.fetch()
        assert info.value.status_code == 302
        assert fake.requests == 1

    async def test_source_recovers_after_fault(self, fake: FakeUseapi):
        """The same source works again once the fault clears."""
        async with fake.source() as source:
            fake.set_status(503)
            with pytest.raises(SourceError):
                await source.fetch()
            fake.clear_fault()
            assert len((await source.fetch()).accounts) == 3


class TestStaticAccountSource:
    def accounts(self) -> dict[str, Account]:
        return {
            "a": Account("a", "s", Secret("discord-SECRET-a"), 2),
            "b": Account("b", None, Secret("discord-SECRET-b"), 1),
        }

    async def test_account_values_used_as_is(self):
        """A map of Account values is served unchanged."""
        accounts = self.accounts()
        parsed = await StaticAccountSource(accounts).fetch()
        assert parsed.accounts == accounts
        assert parsed.rejected == []

    async def test_raw_map_parsed_with_rejections(self):
        """A raw v1 map is parsed and its rejected entries reported."""
        raw = make_accounts(2)
        raw["bad"] = {"maxJobs": 0}
        parsed = await StaticAccountSource(raw).fetch()
        assert set(parsed.accounts) == {"ch0", "ch1"}
        assert [r.key for r in parsed.rejected] == ["bad"]

    async def test_raw_v2_map(self):
        """A raw v2 map is parsed with schema='v2'."""
        parsed = await StaticAccountSource(make_v2_accounts(1), schema="v2").fetch()
        assert list(parsed.accounts) == ["user0@example.com"]

    async def test_set_visible_on_next_fetch(self):
        """set() replaces the map for the next fetch, and fetches are counted."""
        source = StaticAccountSource(self.accounts())
        assert len((await source.fetch()).accounts) == 2
        source.set(make_accounts(5))
        assert len((await source.fetch()).accounts) == 5
        source.set({})
        assert (await source.fetch()).accounts == {}
        assert source.fetch_count == 3

    async def test_fetch_returns_a_copy(self):
        """Mutating a fetched map does not change the source."""
        source = StaticAccountSource(self.accounts())
        (await source.fetch()).accounts.clear()
        assert len((await source.fetch()).accounts) == 2

    def test_key_must_match_channel(self):
        """An Account keyed by another channel is refused."""
        with pytest.raises(ValueError):
            StaticAccountSource({"x": self.accounts()["a"]})

    def test_mixed_values_refused(self):
        """Account values and raw entries cannot be mixed."""
        with pytest.raises(TypeError):
            StaticAccountSource({"a": self.accounts()["a"], "c": {"maxJobs": 1}})

    def test_non_mapping_refused(self):
        """A list is not an account map."""
        with pytest.raises(TypeError):
            StaticAccountSource([])  # type: ignore[arg-type]

    def test_repr_has_no_secret(self):
        """The repr counts channels and shows no token."""
        assert "SECRET" not in repr(StaticAccountSource(self.accounts()))
