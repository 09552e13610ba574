from __future__ import annotations

import logging
import random
import traceback
from collections.abc import Callable, Iterable
from typing import Any

import anyio
import pytest
import structlog.testing

import balancer
from balancer import (
    Account,
    AuthError,
    Balancer,
    BalancerError,
    ConfigNotFoundError,
    LeaseError,
    Secret,
    SourceError,
    StaticAccountSource,
    UseapiAccountSource,
    parse_account_map,
)
from balancer.testing import FakeUseapi

# Tokens drawn from letters that are not hex digits, so that no lease id, hash,
# timestamp or address in the captured output can match one of their 8-character
# slices by chance.
_ALPHABET = "GHJKLMNPQRSTUVWXYZ"
_rng = random.Random(20240601)


def _token() -> str:
    return "".join(_rng.choice(_ALPHABET) for _ in range(40))


API_TOKEN = _token()
WRONG_TOKEN = _token()
DISCORD = [_token() for _ in range(4)]
ROTATED = [_token() for _ in range(4)]
JWT = [_token() for _ in range(2)]
PASSWORDS = [_token() for _ in range(2)]
SECRETS = [API_TOKEN, WRONG_TOKEN, *DISCORD, *ROTATED, *JWT, *PASSWORDS]


def v1_map(tokens: list[str]) -> dict[str, Any]:
    return {
        f"ch{i}": {"server": "1234567", "channel": f"ch{i}", "discord": token, "maxJobs": 2}
        for i, token in enumerate(tokens)
    }


def v2_map() -> dict[str, Any]:
    return {
        f"user{i}@example.com": {
            "email": f"user{i}@example.com",
            "maxJobs": 2,
            "jwt": {"token": JWT[i], "expires": 4102444800},
            "password": PASSWORDS[i],
        }
        for i in range(2)
    }


def needles() -> list[str]:
    """Every secret and every 8-character slice of each."""
    found = set()
    for secret in SECRETS:
        found.add(secret)
        found.update(secret[i : i + 8] for i in range(len(secret) - 7))
    return sorted(found)


def assert_clean(texts: Iterable[str]) -> None:
    checked = list(texts)
    assert checked, "nothing was captured"
    patterns = needles()
    for text in checked:
        for needle in patterns:
            assert needle not in text, f"a secret fragment leaked into: {text[:200]!r}..."


def chain(exc: BaseException, *, suppressed: bool = False) -> list[BaseException]:
    """The exception and its causes / contexts, as a traceback shows them (or all of them)."""
    found = []
    seen: BaseException | None = exc
    while seen is not None and seen not in found:
        found.append(seen)
        if seen.__cause__ is not None:
            seen = seen.__cause__
        elif suppressed or not seen.__suppress_context__:
            seen = seen.__context__
        else:
            seen = None
    return found


def describe_exception(exc: BaseException) -> list[str]:
    texts = ["".join(traceback.format_exception(exc))]
    for link in chain(exc):
        texts += [str(link), repr(link), repr(getattr(link, "__dict__", {}))]
    return texts


class Collector:
    """Everything the scenario produced that a user could see or log."""

    def __init__(self) -> None:
        self.errors: list[BaseException] = []
        self.objects: list[object] = []

    async def expect(self, error: type[BaseException], call: Callable[[], Any]) -> None:
        """Await ``call()``, which must raise ``error``; keep the exception."""
        with pytest.raises(error) as info:
            await call()
        self.errors.append(info.value)

    def texts(self) -> list[str]:
        texts: list[str] = []
        for exc in self.errors:
            texts += describe_exception(exc)
        for obj in self.objects:
            texts += [repr(obj), str(obj), format(obj)]
        return texts


async def lease_traffic(lb: Balancer, seen: Collector) -> None:
    """Acquire and release in every way, with every outcome and misuse."""
    for i in range(30):
        lease = await lb.acquire(timeout=1)
        seen.objects += [lease, lease.account, lease.account.discord]
        outcome = ("ok", "failed", "ok", "throttled")[i % 4]
        await lb.release(lease, outcome=outcome)
    async with lb.acquire(timeout=1) as lease:
        seen.objects.append(lease)
    with pytest.raises(RuntimeError):
        async with lb.acquire(timeout=1) as lease:
            raise RuntimeError("job failed")
    await lb.release(lease)  # already released: a warning
    other = await lb.acquire(timeout=1)
    await lb.release(other.id)
    await lb.release(other.id)  # already released by id: a warning
    await seen.expect(LeaseError, lambda: lb.release("not-a-lease-id"))
    seen.objects.append(lb.statistics())
    seen.objects += list(lb.statistics().channels.values())


async def faults(fake: FakeUseapi, lb: Balancer, seen: Collector) -> None:
    """Every kind of failed refresh, each raised to the user by refresh()."""
    cases: list[tuple[Callable[[], None], type[BalancerError]]] = [
        (lambda: fake.set_status(401), AuthError),
        (lambda: fake.set_accounts(None), ConfigNotFoundError),
        (lambda: fake.set_status(500, f'{{"error": "{DISCORD[0]}"}}'), SourceError),
        (lambda: fake.set_status(429), SourceError),
        (
            lambda: fake.set_body(f'{{"ch0": {{"discord": "{DISCORD[1]}", "maxJobs": '),
            BalancerError,
        ),
        (lambda: fake.set_body(f'"{API_TOKEN}"'), BalancerError),
        (lambda: fake.set_redirect("http://127.0.0.1:9/elsewhere"), SourceError),
        (lambda: fake.set_delay(2), SourceError),
    ]
    for inject, error in cases:
        inject()
        with anyio.fail_after(10):
            await seen.expect(error, lb.refresh)
        seen.objects.append(lb.statistics())
        assert lb.statistics().last_refresh_error is not None
        fake.clear_fault()
        fake.set_accounts(v1_map(DISCORD))
    await lb.refresh()


class TestNoSecrets:
    async def test_full_scenario(self, caplog: pytest.LogCaptureFixture, capsys: Any):
        """No token, jwt or password (nor any 8-character slice of one) reaches any output."""
        caplog.set_level(logging.DEBUG)
        seen = Collector()
        with (
            structlog.testing.capture_logs() as logs,
            FakeUseapi(v1_map(DISCORD), token=API_TOKEN, v2_accounts=v2_map()) as fake,
        ):
            seen.objects.append(fake)
            # Refused on enter, with a wrong token that is a secret too.
            wrong = UseapiAccountSource(WRONG_TOKEN, base_url=fake.base_url)
            seen.objects.append(wrong)
            await seen.expect(AuthError, lambda: _enter(Balancer(wrong)))
            # Unreachable upstream on enter.
            with FakeUseapi(token=API_TOKEN) as gone:
                gone_url = gone.base_url
            dead = UseapiAccountSource(API_TOKEN, base_url=gone_url, timeout=2)
            await seen.expect(SourceError, lambda: _enter(Balancer(dead)))

            source = fake.source(timeout=0.3)
            seen.objects.append(source)
            lb = Balancer(source, ttl=0.3, cooldown=0.05, failures_to_cool=2, seed=1)
            seen.objects.append(lb)
            async with lb:
                seen.objects.append(lb)
                await lease_traffic(lb, seen)
                await faults(fake, lb, seen)
                # Rotate every Discord token; a lease out keeps the old account.
                held = await lb.acquire(timeout=1)
                fake.set_accounts(v1_map(ROTATED))
                await lb.refresh()
                rotated = await lb.acquire(timeout=1, channel=held.channel)
                assert held.account.discord.reveal() in DISCORD
                assert rotated.account.discord.reveal() in ROTATED
                seen.objects += [held, rotated, held.account, rotated.account]
                await lb.release(held)
                await lb.release(rotated)
                # A background refresh failing quietly.
                fake.set_status(503)
                errors = lb.statistics().refresh_errors_total
                with anyio.fail_after(5):
                    while lb.statistics().refresh_errors_total == errors:  # noqa: ASYNC110
                        await anyio.sleep(0.01)
                fake.clear_fault()
                seen.objects.append(lb.statistics())
            seen.objects.append(lb)

            async with Balancer(fake.source(schema="v2"), ttl=3600) as v2:
                lease = await v2.acquire(timeout=1)
                assert lease.account.discord.reveal() in JWT
                seen.objects += [v2, lease, lease.account, v2.statistics()]
                await v2.release(lease, outcome="failed")
            seen.objects.append(fake.request_log)

        captured = capsys.readouterr()
        texts = seen.texts()
        texts += [repr(event) for event in logs]
        texts += [str(value) for event in logs for value in event.values()]
        texts += [record.getMessage() for record in caplog.records]
        texts += [repr(record.__dict__) for record in caplog.records]
        texts += [captured.out, captured.err, caplog.text]
        assert any(event["event"] == "map_refresh_failed" for event in logs)
        assert any(event["event"] == "lease_already_released" for event in logs)
        assert caplog.records, "httpx's stdlib logging was not captured"
        assert_clean(texts)

    async def test_rejected_entries_never_quote_secrets(self):
        """Rejected entries give reasons without the values that made them bad."""
        payload = {
            "mismatch": {"channel": "other", "discord": DISCORD[0], "maxJobs": 1},
            "tokenjobs": {"discord": DISCORD[1], "maxJobs": DISCORD[2]},
            "badserver": {"server": DISCORD[3], "discord": 5, "maxJobs": 1},
            "list": [DISCORD[0]],
            "": {"discord": DISCORD[1], "maxJobs": 1},
        }
        parsed = parse_account_map(payload)
        assert parsed.accounts == {}
        with structlog.testing.capture_logs() as logs:
            async with Balancer(StaticAccountSource(payload)) as lb:
                seen = Collector()
                await seen.expect(BalancerError, lambda: lb.acquire(timeout=0))
        texts = [repr(parsed), str(parsed.rejected), *seen.texts()]
        texts += [repr(event) for event in logs]
        assert sum(event["event"] == "account_rejected" for event in logs) == len(payload)
        assert_clean(texts)

    def test_public_objects(self):
        """Secret, Account and sources print masked in every form."""
        secret = Secret(API_TOKEN)
        account = Account("c1", "s", Secret(DISCORD[0]), 3)
        objects: list[object] = [
            secret,
            account,
            UseapiAccountSource(API_TOKEN),
            StaticAccountSource({"c1": account}),
            StaticAccountSource(v1_map(DISCORD)),
            Balancer(UseapiAccountSource(API_TOKEN)),
            parse_account_map(v2_map(), schema="v2"),
        ]
        sync_balancer = getattr(balancer, "SyncBalancer", None)
        if sync_balancer is not None:
            objects.append(sync_balancer(UseapiAccountSource(API_TOKEN)))
        texts = [f(obj) for obj in objects for f in (repr, str, lambda o: f"{o}", format)]
        texts.append(f"{secret:>60}")
        assert_clean(texts)
        assert secret.reveal() == API_TOKEN


class TestSuppressedContext:
    async def test_malformed_body_error_keeps_no_body(self):
        """The error for a malformed map holds no reference to the body, even a suppressed one."""
        with FakeUseapi(token=API_TOKEN) as fake:
            fake.set_body(f'{{"ch0": {{"discord": "{DISCORD[0]}", "maxJobs": ')
            async with fake.source() as source:
                with pytest.raises(BalancerError) as info:
                    await source.fetch()
        texts = [repr(getattr(link, "__dict__", {})) for link in chain(info.value, suppressed=True)]
        texts += [repr(link) for link in chain(info.value, suppressed=True)]
        assert_clean(texts)


async def _enter(lb: Balancer) -> None:
    async with lb:
        pytest.fail("must not be entered")
