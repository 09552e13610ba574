from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest

from balancer.accounts import parse_account_map
from balancer.testing import (
    V1_PATH,
    V2_PATH,
    FakeUseapi,
    make_accounts,
    make_v2_accounts,
    random_token,
)

TOKEN = "fake-api-SECRET-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def get(url: str, **kwargs: Any) -> httpx.Response:
    """Plain GET; verify=False skips loading CA certificates (these URLs are http)."""
    return httpx.get(url, verify=False, **kwargs)


@pytest.fixture
def fake() -> Iterator[FakeUseapi]:
    with FakeUseapi(make_accounts(2), token=TOKEN) as server:
        yield server


@pytest.fixture
def client(fake: FakeUseapi) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake.base_url, headers=AUTH, verify=False) as http:
        yield http


class TestFakeUseapiResponses:
    def test_v1_map_served(self, fake: FakeUseapi, client: httpx.Client):
        """GET /v1/pixverse/account with the token answers 200 and the raw map."""
        response = client.get(V1_PATH)
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        assert response.json() == make_accounts(2)

    def test_v2_map_served(self, fake: FakeUseapi, client: httpx.Client):
        """GET /v2/pixverse/accounts answers the v2 map once one is set."""
        assert client.get(V2_PATH).status_code == 404
        fake.set_v2_accounts(make_v2_accounts(3))
        assert client.get(V2_PATH).json() == make_v2_accounts(3)

    @pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"X": "y"}])
    def test_bad_token_answers_401(self, fake: FakeUseapi, headers: dict[str, str]):
        """A missing or wrong bearer token answers useapi's 401 JSON."""
        response = get(fake.base_url + V1_PATH, headers=headers)
        assert response.status_code == 401
        assert response.json() == {"error": "Unauthorized", "code": 401}

    def test_unconfigured_answers_404_text(self, fake: FakeUseapi, client: httpx.Client):
        """With no map configured the endpoint answers 404 'Configuration not found...'."""
        fake.set_accounts(None)
        response = client.get(V1_PATH)
        assert response.status_code == 404
        assert response.text.startswith("Configuration not found")

    def test_unknown_path_answers_404_uncounted(self, fake: FakeUseapi, client: httpx.Client):
        """Other paths answer 404 and do not count as account requests."""
        assert client.get("/v1/other").status_code == 404
        assert fake.requests == 0
        assert fake.request_log[0].path == "/v1/other"

    def test_post_answers_405(self, client: httpx.Client):
        """Only GET is served on the account endpoints."""
        assert client.post(V1_PATH, json={}).status_code == 405

    def test_set_accounts_takes_effect(self, fake: FakeUseapi, client: httpx.Client):
        """A new map is served on the next request."""
        fake.set_accounts(make_accounts(4, seed=1))
        assert len(client.get(V1_PATH).json()) == 4


class TestFakeUseapiKnobs:
    @pytest.mark.parametrize("status", [403, 429, 500, 503])
    def test_set_status(self, fake: FakeUseapi, client: httpx.Client, status: int):
        """A forced status is answered, with a JSON error body, until cleared."""
        fake.set_status(status)
        response = client.get(V1_PATH)
        assert response.status_code == status
        assert response.json()["code"] == status
        fake.clear_fault()
        assert client.get(V1_PATH).status_code == 200

    def test_set_status_with_body(self, fake: FakeUseapi, client: httpx.Client):
        """A forced status can carry a custom body."""
        fake.set_status(500, "boom")
        assert client.get(V1_PATH).content == b"boom"

    def test_fault_applies_before_token_check(self, fake: FakeUseapi):
        """An outage answers even requests without a token."""
        fake.set_status(503)
        assert get(fake.base_url + V1_PATH).status_code == 503

    @pytest.mark.parametrize("body", [b"{broken", "[]", b"\xff\x00"])
    def test_set_body(self, fake: FakeUseapi, client: httpx.Client, body: bytes | str):
        """set_body serves exactly these bytes with 200."""
        fake.set_body(body)
        response = client.get(V1_PATH)
        assert response.status_code == 200
        assert response.content == (body.encode() if isinstance(body, str) else body)

    def test_set_redirect(self, fake: FakeUseapi, client: httpx.Client):
        """set_redirect answers 302 with the Location."""
        fake.set_redirect("https://elsewhere.example/x")
        response = client.get(V1_PATH)
        assert response.status_code == 302
        assert response.headers["location"] == "https://elsewhere.example/x"

    def test_set_delay_times_out_client(self, fake: FakeUseapi, client: httpx.Client):
        """A delay longer than the client's timeout makes it time out."""
        fake.set_delay(5)
        with pytest.raises(httpx.ReadTimeout):
            client.get(V1_PATH, timeout=0.1)

    def test_set_delay_delays(self, fake: FakeUseapi, client: httpx.Client):
        """A delay shorter than the timeout still answers, after the delay."""
        fake.set_delay(0.1)
        started = time.monotonic()
        assert client.get(V1_PATH, timeout=5).status_code == 200
        assert time.monotonic() - started >= 0.09

    def test_negative_delay_refused(self, fake: FakeUseapi):
        """A negative delay is a ValueError."""
        with pytest.raises(ValueError):
            fake.set_delay(-1)

    def test_counters_and_masked_log(self, fake: FakeUseapi, client: httpx.Client):
        """Account requests are counted and logged with the token masked."""
        client.get(V1_PATH)
        client.get(V2_PATH)
        get(fake.base_url + V1_PATH)
        assert fake.requests == 3
        log = fake.request_log
        assert [(entry.method, entry.path) for entry in log] == [
            ("GET", V1_PATH),
            ("GET", V2_PATH),
            ("GET", V1_PATH),
        ]
        assert log[0].headers["authorization"] == "Bearer ********"
        assert "authorization" not in log[2].headers
        assert TOKEN not in repr(log)

    def test_repr_has_no_token(self, fake: FakeUseapi):
        """The repr shows the address and map sizes, not the token."""
        text = repr(fake)
        assert fake.base_url in text
        assert TOKEN not in text
        assert "stopped" in repr(FakeUseapi(token=TOKEN))


class TestFakeUseapiLifecycle:
    def test_stop_releases_port(self):
        """After stop() the port refuses connections and can be bound again."""
        fake = FakeUseapi(make_accounts(1)).start()
        port = fake.port
        fake.stop()
        with pytest.raises(httpx.ConnectError):
            get(f"http://127.0.0.1:{port}{V1_PATH}")
        with FakeUseapi(make_accounts(1), port=port) as again:
            assert again.port == port

    def test_stop_drops_keep_alive_connections(self, fake: FakeUseapi, client: httpx.Client):
        """A pooled keep-alive connection does not outlive stop()."""
        assert client.get(V1_PATH).status_code == 200
        fake.stop()
        with pytest.raises(httpx.TransportError):
            client.get(V1_PATH)

    def test_start_twice_raises_and_stop_twice_is_fine(self):
        """start() on a running fake raises; stop() on a stopped one does nothing."""
        with FakeUseapi() as fake, pytest.raises(RuntimeError):
            fake.start()
        fake.stop()
        assert not fake.running

    def test_restart(self):
        """A stopped fake can be started again and keeps its state."""
        fake = FakeUseapi(make_accounts(2))
        with fake:
            fake.set_status(503)
        with fake:
            assert get(fake.base_url + V1_PATH).status_code == 503
        assert fake.requests == 1

    def test_base_url_needs_running_server(self):
        """base_url raises RuntimeError while stopped."""
        with pytest.raises(RuntimeError):
            _ = FakeUseapi().base_url

    def test_wait_returns_after_stop(self):
        """wait() times out while running and returns True once stopped."""
        fake = FakeUseapi().start()
        assert fake.wait(timeout=0) is False
        fake.stop()
        assert fake.wait(timeout=0) is True

    def test_serve_forever_until_stopped_from_another_thread(self):
        """serve_forever() blocks until stop() is called elsewhere."""
        fake = FakeUseapi(make_accounts(1))
        fake.start()

        def hit_and_stop() -> None:
            get(fake.base_url + V1_PATH)
            fake.stop()

        thread = threading.Thread(target=hit_and_stop)
        thread.start()
        fake.serve_forever()
        thread.join()
        assert fake.requests == 1

    async def test_async_context_manager(self):
        """async with starts and stops the fake under asyncio and trio."""
        async with FakeUseapi(make_accounts(2), token=TOKEN) as fake:
            async with httpx.AsyncClient(verify=False) as client:
                response = await client.get(fake.base_url + V1_PATH, headers=AUTH)
            assert response.status_code == 200
        assert not fake.running

    async def test_source_helper(self):
        """fake.source() builds a UseapiAccountSource pointed at the fake."""
        async with FakeUseapi(make_accounts(3), token=TOKEN) as fake, fake.source() as source:
            parsed = await source.fetch()
        assert len(parsed.accounts) == 3


class TestFakeUseapiHandle:
    async def test_mock_transport(self):
        """handle() serves the same answers through httpx.MockTransport, no socket needed."""
        fake = FakeUseapi(make_accounts(2), token=TOKEN)
        transport = httpx.MockTransport(fake.handle)
        async with httpx.AsyncClient(transport=transport) as client:
            ok = await client.get("https://api.useapi.net" + V1_PATH, headers=AUTH)
            denied = await client.get("https://api.useapi.net" + V1_PATH)
            fake.set_status(429)
            limited = await client.get("https://api.useapi.net" + V1_PATH, headers=AUTH)
        assert ok.json() == make_accounts(2)
        assert denied.status_code == 401
        assert limited.status_code == 429
        assert fake.requests == 3

    async def test_ahandle_honours_delay(self):
        """ahandle() sleeps for the configured delay on either event loop."""
        fake = FakeUseapi(make_accounts(1), token=TOKEN)
        fake.set_delay(0.05)
        transport = httpx.MockTransport(fake.ahandle)
        async with httpx.AsyncClient(transport=transport) as client:
            started = anyio.current_time()
            response = await client.get("https://x.example" + V1_PATH, headers=AUTH)
        assert response.status_code == 200
        assert anyio.current_time() - started >= 0.045


class TestHelpers:
    def test_make_accounts(self):
        """make_accounts builds n parseable channels with distinct fake tokens."""
        raw = make_accounts(5, max_jobs=[1, 2], prefix="c")
        parsed = parse_account_map(raw)
        assert list(parsed.accounts) == ["c0", "c1", "c2", "c3", "c4"]
        assert [a.max_jobs for a in parsed.accounts.values()] == [1, 2, 1, 2, 1]
        tokens = {a.discord.reveal() for a in parsed.accounts.values()}
        assert len(tokens) == 5
        assert all(t.startswith("discord-token-") for t in tokens)

    def test_make_accounts_seeded(self):
        """The same seed gives the same map; another seed gives other tokens."""
        assert make_accounts(3, seed=7) == make_accounts(3, seed=7)
        assert make_accounts(3, seed=7) != make_accounts(3, seed=8)

    @pytest.mark.parametrize(("n", "max_jobs"), [(-1, 3), (2, [])])
    def test_make_accounts_bad_arguments(self, n: int, max_jobs: int | list[int]):
        """A negative count or an empty max_jobs sequence is a ValueError."""
        with pytest.raises(ValueError):
            make_accounts(n, max_jobs=max_jobs)

    def test_make_v2_accounts(self):
        """make_v2_accounts builds a parseable email-keyed map."""
        parsed = parse_account_map(make_v2_accounts(2, max_jobs=8), schema="v2")
        assert [a.max_jobs for a in parsed.accounts.values()] == [8, 8]
        assert all(a.discord.reveal().startswith("jwt-token-") for a in parsed.accounts.values())

    def test_random_token(self):
        """random_token returns fresh values with the given prefix."""
        assert random_token() != random_token()
        assert random_token("x-", 4).startswith("x-")
        assert len(random_token("", 4)) == 8
