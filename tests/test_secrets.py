"""
The secrets suite: one scenario that touches every surface, then a search of every byte.

The scenario runs, with distinctive fake credentials (40 letters drawn from an
alphabet without hex digits, so no lease id, hash, address or timestamp can
match an 8-character slice by chance):

* subprocesses, all started at once so they overlap: ``balancer demo`` and
  ``balancer demo --redis`` (two worker processes on the session's Redis; the
  demo's own tokens are ``make_accounts`` with the demo's seed and a random
  ``demo-api-token-<hex>``, audited by value and by pattern), ``balancer
  accounts`` (table, ``--json``, v2, ``--token-file``, ``--log-level debug``)
  against the fake with our tokens, and its error paths (401, 404, network
  fault, 500 with a token in the body, a malformed body quoting tokens, a
  redirect, a non-loopback ``http://`` URL, a token in the URL's userinfo),
  and ``balancer fake-server`` serving a map file of our tokens;
* in process, on asyncio and on trio: every failed fetch (each HTTP status,
  redirect, timeout, network fault and malformed body) straight from the
  source, on a balancer's enter and on a running balancer's refresh (with
  the statistics that describe it); errors of every other kind
  (``NoAccountsError``, ``NoCapacityError``, ``LeaseError``,
  ``StaleAccountMapError``, ``BackendUnavailableError`` with Redis killed or
  refusing a password in the URL); lease traffic with every outcome and
  misuse (released twice, by id, unknown ids, a job raising with a token in
  its message); a map rotated under a lease that is out; rejected entries;
  a :class:`~balancer.Balancer` on ``RedisBackend`` doing acquire / release /
  map change with every token rotated, a :class:`~balancer.SyncBalancer`, and
  the Prometheus exposition of each balancer;

then searches stdout, stderr, structlog events, stdlib log records (DEBUG),
every exception (message, repr, ``__dict__``, formatted traceback with its
whole ``__cause__`` / ``__context__`` chain, suppressed contexts included, and
the local variables of every library frame in it, as error trackers capture them),
the repr / str / format of every public object, the Prometheus text, and
every key and value in Redis (``SCAN`` of the whole server, dumped by type)
for any credential or any 8-character slice of one.

``test_public_objects`` checks the public objects before any use, without
I/O; ``TestRegressions`` keeps fixed the leaks and faults this suite found.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import socket
import subprocess
import sys
import traceback
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest
import structlog.testing
from prometheus_client import CollectorRegistry, generate_latest

from balancer import (
    Account,
    AccountMapError,
    AuthError,
    BackendUnavailableError,
    Balancer,
    BalancerError,
    ConfigNotFoundError,
    LeaseError,
    MemoryBackend,
    NoAccountsError,
    NoCapacityError,
    Secret,
    SourceError,
    StaleAccountMapError,
    StaticAccountSource,
    SyncBalancer,
    UseapiAccountSource,
    parse_account_map,
)
from balancer.backends.redis import RedisBackend
from balancer.metrics import BalancerCollector
from balancer.testing import FakeUseapi, make_accounts
from tests._redis import dump_redis

if TYPE_CHECKING:
    from tests._redis import RedisServer

pytestmark = pytest.mark.redis

ROOT = Path(__file__).resolve().parent.parent
_ALPHABET = "GHIJKLMNOPQRSTUVWXYZ"  # no hex digit: ids and hashes cannot match
_rng = random.Random(0x5EC2E75)


def _token(prefix: str) -> str:
    return prefix + "".join(_rng.choice(_ALPHABET) for _ in range(40 - len(prefix)))


API_TOKEN = _token("QWZX")
WRONG_TOKEN = _token("QWZY")
DISCORD = [_token("DSCX") for _ in range(3)]
ROTATED = [_token("DSCR") for _ in range(3)]
JWT = [_token("JWTX") for _ in range(2)]
PASSWORDS = [_token("PWDX") for _ in range(2)]
REDIS_PASSWORD = _token("RPWX")
OURS = [API_TOKEN, WRONG_TOKEN, *DISCORD, *ROTATED, *JWT, *PASSWORDS, REDIS_PASSWORD]

#: The demo's own credentials, by shape (its API token is random per run).
DEMO_PATTERNS = [
    re.compile(r"demo-api-token-[0-9a-f]{8}"),
    re.compile(r"discord-token-[0-9a-f]{8}"),
]
DEMO_SEED = 1
DEMO_CHANNELS = 6


def v1_map(tokens: list[str]) -> dict[str, Any]:
    return {
        f"9{i}00{i}": {"server": "4242", "channel": f"9{i}00{i}", "discord": t, "maxJobs": 2}
        for i, t in enumerate(tokens)
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


def slices(secrets: Iterable[str]) -> set[str]:
    """Every secret and every 8-character slice of each."""
    found: set[str] = set()
    for secret in secrets:
        found.add(secret)
        found.update(secret[i : i + 8] for i in range(len(secret) - 7))
    return found


def demo_secrets() -> list[str]:
    """The Discord tokens the demo serves: ``make_accounts`` with its seed."""
    raw = make_accounts(DEMO_CHANNELS, seed=DEMO_SEED)
    return [entry["discord"] for entry in raw.values()]


#: Frame locals allowed to hold a credential: none (TestRegressions covers the ones
#: the audit once found).
KNOWN_LEAKY_LOCALS: set[tuple[str, str, str]] = set()


def frame_locals(exc: BaseException) -> str:
    """
    Every local variable of every library frame of the chain, as error trackers
    (Sentry) capture them; a repr that raises is noted, not fatal (see TestRegressions).
    Other frames are left out: this test's hold the tokens, and the Redis clients'
    hold the password they were given, as any client must.
    """
    lines: list[str] = []
    seen: list[BaseException] = []
    link: BaseException | None = exc
    while link is not None and not any(link is s for s in seen):
        seen.append(link)
        tb = link.__traceback__
        while tb is not None:
            module = str(tb.tb_frame.f_globals.get("__name__", ""))
            function = tb.tb_frame.f_code.co_name
            for name, value in tb.tb_frame.f_locals.items():
                if not module.startswith("balancer"):
                    continue  # ours hold the tokens; redis-py's hold the URL's password
                if (module, function, name) in KNOWN_LEAKY_LOCALS:
                    continue
                try:
                    shown = repr(value)
                except Exception as error:  # noqa: BLE001 - a broken repr is not a leak
                    shown = f"<repr raised {type(error).__name__}>"
                lines.append(f"{tb.tb_frame.f_code.co_name}: {name} = {shown}")
            tb = tb.tb_next
        link = link.__cause__ or link.__context__
    return "\n".join(lines)


def exception_texts(exc: BaseException) -> list[str]:
    """Everything an exception shows: its chain, formatted, and each link's message and state."""
    texts = ["".join(traceback.format_exception(exc))]
    texts.append(frame_locals(exc))
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        link = todo.pop()
        if link is None or any(link is s for s in seen):
            continue
        seen.append(link)
        # Suppressed contexts too: a debugger or Sentry walks them.
        todo += [link.__cause__, link.__context__]
        texts += [str(link), repr(link), repr(vars(link)), repr(link.args)]
        texts.append("".join(traceback.format_exception_only(link)))
    return texts


class Audit:
    """Everything captured; :meth:`check` searches it."""

    def __init__(self) -> None:
        self.texts: list[tuple[str, str]] = []  # (where, text)
        self.errors: list[type[BaseException]] = []

    def add(self, where: str, text: str | bytes) -> None:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        self.texts.append((where, text))

    def obj(self, where: str, obj: object) -> None:
        for f in (repr, str, format):
            self.add(f"{f.__name__}({where})", f(obj))

    def exc(self, where: str, exc: BaseException) -> None:
        self.errors.append(type(exc))
        for text in exception_texts(exc):
            self.add(f"exception {type(exc).__name__} ({where})", text)

    def logs(self, where: str, events: Iterable[Mapping[str, Any]]) -> None:
        """structlog events, whole and value by value."""
        for event in events:
            self.add(where, repr(event))
            self.texts += [(f"{where} value", str(value)) for value in event.values()]

    async def expect(
        self, where: str, error: type[BaseException], call: Callable[[], Awaitable[Any]]
    ) -> None:
        with pytest.raises(error) as info:
            with anyio.fail_after(15):
                await call()
        self.exc(where, info.value)

    def check(self, secrets: Iterable[str]) -> None:
        needles = sorted(slices(secrets))
        assert self.texts
        leaks = []
        for where, text in self.texts:
            for needle in needles:
                if needle in text:
                    at = text.index(needle)
                    leaks.append(f"{where}: {needle!r} in ...{text[max(0, at - 80) : at + 60]!r}")
                    break
            matches = (pattern.search(text) for pattern in DEMO_PATTERNS)
            leaks.extend(f"{where}: demo credential {m.group()!r}" for m in matches if m)
        assert not leaks, "secrets leaked:\n" + "\n".join(leaks[:20])


# -- subprocesses ----------------------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("USEAPI_", "PYTEST"))}
    env.update(COLUMNS="200", PYTHONUNBUFFERED="1", **extra)
    return env


def _spawn(args: list[str], **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "balancer", *args],
        cwd=ROOT,
        env=_env(**env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- the in-process scenario -------------------------------------------------------------


async def _enter(lb: Balancer) -> None:
    async with lb:
        pytest.fail("must not be entered")


def redis_texts(url: str) -> list[tuple[str, str]]:
    """Every key of the server and its whole value, whatever its type."""
    rows: list[tuple[str, str]] = []
    for key, kind, value in dump_redis(url):
        rows.append((f"redis {kind} key", repr(key)))
        rows.append((f"redis {kind} value of {key!r}", repr(value)))
    return rows


def prometheus(lb: object) -> str:
    registry = CollectorRegistry()
    registry.register(BalancerCollector(lb))  # type: ignore[arg-type]
    return generate_latest(registry).decode()


async def http_errors(audit: Audit, fakes: dict[str, FakeUseapi]) -> None:
    """Every failed fetch: straight from the source, on a balancer's enter, on a refresh."""
    good = fakes["good"]
    async with Balancer(good.source(timeout=0.5), ttl=3600) as refreshing:
        await _fetch_errors(audit, good, refreshing)
    # Wrong token, unreachable upstream, a non-loopback http URL (ValueError).
    wrong = UseapiAccountSource(WRONG_TOKEN, base_url=good.base_url)
    audit.obj("wrong source", wrong)
    await audit.expect("wrong token", AuthError, lambda: _enter(Balancer(wrong)))
    dead_url = f"http://127.0.0.1:{closed_port()}"
    dead = UseapiAccountSource(API_TOKEN, base_url=dead_url, timeout=1)
    await audit.expect("network", SourceError, dead.fetch)
    await dead.aclose()
    dead = UseapiAccountSource(API_TOKEN, base_url=dead_url, timeout=1)
    await audit.expect("network enter", SourceError, lambda: _enter(Balancer(dead)))
    constructors: list[Callable[[], object]] = [
        lambda: UseapiAccountSource(API_TOKEN, base_url="http://example.com"),
        lambda: UseapiAccountSource(API_TOKEN + " x"),
        lambda: UseapiAccountSource(API_TOKEN, schema="v3"),
    ]
    for bad in constructors:
        with pytest.raises(ValueError) as info:
            bad()
        audit.exc("constructor", info.value)
    with pytest.raises(AccountMapError) as map_info:
        parse_account_map([API_TOKEN])
    audit.exc("parse", map_info.value)
    with pytest.raises(ValueError) as schema_info:
        parse_account_map({}, schema="v3")
    audit.exc("parse schema", schema_info.value)


async def _fetch_errors(audit: Audit, good: FakeUseapi, refreshing: Balancer) -> None:
    """Each fault of the fake upstream, through a source, an enter and ``refreshing``."""
    cases: list[tuple[str, Callable[[FakeUseapi], None], type[BalancerError]]] = [
        ("401", lambda f: f.set_status(401), AuthError),
        ("403", lambda f: f.set_status(403, f"forbidden {API_TOKEN}"), AuthError),
        ("404", lambda f: f.set_accounts(None), ConfigNotFoundError),
        ("429", lambda f: f.set_status(429, DISCORD[0]), SourceError),
        ("500", lambda f: f.set_status(500, f'{{"error": "{DISCORD[1]}"}}'), SourceError),
        ("503", lambda f: f.set_status(503), SourceError),
        ("redirect", lambda f: f.set_redirect("http://127.0.0.1:9/elsewhere"), SourceError),
        (
            "truncated",
            lambda f: f.set_body(f'{{"a": {{"discord": "{DISCORD[2]}", '),
            AccountMapError,
        ),
        ("not-object", lambda f: f.set_body(json.dumps([API_TOKEN, DISCORD[0]])), AccountMapError),
        ("not-utf8", lambda f: f.set_body(DISCORD[0].encode() + b"\xff\xfe"), AccountMapError),
        ("json-string", lambda f: f.set_body(f'"{API_TOKEN}"'), AccountMapError),
        ("timeout", lambda f: f.set_delay(3), SourceError),
    ]
    for name, inject, error in cases:
        inject(good)
        source = good.source(timeout=0.5)
        audit.obj(f"source {name}", source)
        async with source:
            await audit.expect(f"fetch {name}", error, source.fetch)
        if error is not ConfigNotFoundError:  # a 404 on enter enters with an empty map
            await audit.expect(
                f"enter {name}", error, lambda: _enter(Balancer(good.source(timeout=0.5)))
            )
        await audit.expect(f"refresh {name}", error, refreshing.refresh)
        assert refreshing.statistics().last_refresh_error is not None
        audit.obj(f"statistics after refresh {name}", refreshing.statistics())
        good.clear_fault()
        good.set_accounts(v1_map(DISCORD))
    await refreshing.refresh()


async def balancer_errors(audit: Audit, fakes: dict[str, FakeUseapi]) -> None:
    """Lease traffic and misuse on the memory backend, a refresh that 404s, max_stale."""
    good = fakes["good"]
    memory = MemoryBackend()
    lb = Balancer(
        good.source(timeout=0.5), backend=memory, ttl=0.3, max_stale=0.6, cooldown=0.05, seed=3
    )
    async with lb:
        audit.obj("balancer", lb)
        channels = sorted(lb.statistics().channels)
        handle = lb.acquire(timeout=1)
        audit.obj("acquire handle", handle)
        await lb.release(await handle)
        audit.obj("memory backend", memory)
        audit.obj("collector", BalancerCollector(lb))
        leases = [await lb.acquire(timeout=1, channel=channels[0]) for _ in range(2)]
        for lease in leases:
            audit.obj("lease", lease)
            audit.obj("account", lease.account)
            audit.obj("secret", lease.account.discord)
        await audit.expect(
            "no capacity", NoCapacityError, lambda: lb.acquire(timeout=0.05, channel=channels[0])
        )
        await audit.expect(
            "no accounts", NoAccountsError, lambda: lb.acquire(channel="no-such-channel")
        )
        await audit.expect("lease id", LeaseError, lambda: lb.release("x-unknown-lease"))
        with pytest.raises(RuntimeError):
            async with lb.acquire(timeout=1) as held:
                raise RuntimeError(f"job failed with {held.account.discord}")
        await lb.release(leases[0], outcome="throttled")
        await lb.release(leases[0])  # twice: a warning
        await lb.release(leases[1], outcome="failed")
        # Every outcome in turn (cooling channels), released by lease and by id.
        for i in range(12):
            lease = await lb.acquire(timeout=1)
            audit.obj("traffic lease", lease)
            await lb.release(lease, outcome=("ok", "failed", "ok", "throttled")[i % 4])
        async with lb.acquire(timeout=1) as lease:
            audit.obj("context lease", lease)
        by_id = await lb.acquire(timeout=1)
        await lb.release(by_id.id)
        await lb.release(by_id.id)  # twice by id: a warning
        # Every token rotated while a lease is out: that lease keeps its account.
        held = await lb.acquire(timeout=1)
        good.set_accounts(v1_map(ROTATED))
        await lb.refresh()
        rotated = await lb.acquire(timeout=1, channel=held.channel)
        assert held.account.discord.reveal() in DISCORD
        assert rotated.account.discord.reveal() in ROTATED
        for lease in (held, rotated):
            audit.obj("rotation lease", lease)
            audit.obj("rotation account", lease.account)
            await lb.release(lease)
        good.set_accounts(None)
        await audit.expect("refresh 404", ConfigNotFoundError, lb.refresh)
        good.set_status(500, f"boom {DISCORD[0]}")
        await audit.expect("refresh 500", SourceError, lb.refresh)
        audit.obj("stats", lb.statistics())
        for cs in lb.statistics().channels.values():
            audit.obj("channel stats", cs)
        audit.add("prometheus memory", prometheus(lb))
        await anyio.sleep(0.7)
        await audit.expect("stale", StaleAccountMapError, lambda: lb.acquire(timeout=0))
        good.clear_fault()
        good.set_accounts(v1_map(DISCORD))
        await lb.refresh()
    other = Balancer(StaticAccountSource(v1_map(DISCORD)))
    async with other:
        foreign = await other.acquire(timeout=1)
        async with Balancer(good.source()) as mine:
            await audit.expect("foreign lease", LeaseError, lambda: mine.release(foreign))
        await other.release(foreign)
    audit.obj("static source", StaticAccountSource(v1_map(DISCORD)))
    bad = {
        "mismatch": {"channel": "other", "discord": DISCORD[0], "maxJobs": 1},
        "tokenjobs": {"discord": DISCORD[1], "maxJobs": DISCORD[2]},
        "badserver": {"server": ROTATED[0], "discord": 5, "maxJobs": 1},
        "list": [ROTATED[1]],
        "": {"discord": ROTATED[2], "maxJobs": 1},
        "jwt": {"jwt": JWT[0], "maxJobs": 0},
    }
    for schema in ("v1", "v2"):
        parsed = parse_account_map(bad, schema=schema)
        audit.obj(f"rejected {schema}", parsed)
        audit.texts += [("rejected reason", r.reason) for r in parsed.rejected]
    assert parse_account_map(bad).accounts == {}
    with structlog.testing.capture_logs() as rejected_logs:
        async with Balancer(StaticAccountSource(bad)) as rejecting:  # logs each rejected entry
            await audit.expect(
                "all rejected", NoAccountsError, lambda: rejecting.acquire(timeout=0)
            )
    audit.logs("structlog (rejected)", rejected_logs)
    assert sum(e["event"] == "account_rejected" for e in rejected_logs) == len(bad)
    async with Balancer(good.source(schema="v2")) as v2:
        lease = await v2.acquire(timeout=1)
        assert lease.account.discord.reveal() in JWT
        audit.obj("v2 lease", lease)
        audit.obj("v2 parsed", parse_account_map(v2_map(), schema="v2"))
        await v2.release(lease)
    audit.obj("request log", good.request_log)
    audit.obj("fake", good)


async def redis_scenario(
    audit: Audit, fakes: dict[str, FakeUseapi], url: str, down: RedisServer
) -> None:
    """A balancer on Redis: acquire, release, tokens rotated, a lease lost, Redis killed."""
    good = fakes["redis"]
    namespace = f"audit-{uuid.uuid4().hex[:8]}"
    backend = RedisBackend(url, namespace=namespace, timeout=1.0, connect_timeout=0.5)
    lb = Balancer(good.source(), backend=backend, ttl=3600, lease_ttl=2.0, cooldown=0.1)
    async with lb:
        audit.obj("redis backend", backend)
        leases = [await lb.acquire(timeout=2) for _ in range(4)]
        await lb.release(leases[0], outcome="throttled")
        await lb.release(leases[1].id, outcome="failed")
        good.set_accounts(v1_map(ROTATED))  # every token rotated, one channel gone
        good.set_accounts({k: v for k, v in v1_map(ROTATED).items() if not k.startswith("92")})
        await lb.refresh()
        rotated = await lb.acquire(timeout=2)
        assert rotated.account.discord.reveal() in ROTATED
        audit.obj("rotated lease", rotated)
        audit.obj("redis stats", lb.statistics())
        audit.add("prometheus redis", prometheus(lb))
        audit.texts += redis_texts(url)  # while leases are out
        await lb.release("unknown-lease-id")  # any process may release by id: a warning
        for lease in (leases[2], leases[3], rotated):
            await lb.release(lease)
    audit.texts += redis_texts(url)
    # Redis down: acquire raises BackendUnavailableError within its timeout.
    down.start()
    backend = RedisBackend(down.url, namespace=namespace, timeout=0.5, connect_timeout=0.5)
    async with Balancer(StaticAccountSource(v1_map(DISCORD)), backend=backend) as lb:
        held = await lb.acquire(timeout=2)
        audit.texts += redis_texts(down.url)
        down.kill()
        await audit.expect("redis down", BackendUnavailableError, lambda: lb.acquire(timeout=1.5))
        with anyio.move_on_after(2):
            await lb.release(held)
        audit.obj("redis down stats", lb.statistics())
    await audit.expect(
        "redis down enter",
        BackendUnavailableError,
        lambda: _enter(
            Balancer(
                StaticAccountSource(v1_map(DISCORD)),
                backend=RedisBackend(down.url, namespace=namespace, connect_timeout=0.5),
            )
        ),
    )
    pw_url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{closed_port()}/0"
    audit.obj("redis backend with password", RedisBackend(pw_url))
    await audit.expect(
        "redis password down",
        BackendUnavailableError,
        lambda: _enter(
            Balancer(
                StaticAccountSource(v1_map(DISCORD)),
                backend=RedisBackend(pw_url, namespace=namespace, connect_timeout=0.5),
            )
        ),
    )
    # A password the running server refuses (it has none): the AUTH error is shown.
    refused_url = url.replace("redis://", f"redis://user:{REDIS_PASSWORD}@")
    refused = Balancer(
        StaticAccountSource(v1_map(DISCORD)),
        backend=RedisBackend(refused_url, namespace=namespace, connect_timeout=0.5, timeout=1),
    )
    with pytest.raises(BalancerError) as info:
        with anyio.fail_after(15):
            await _enter(refused)
    audit.exc("redis auth refused", info.value)


def sync_scenario(audit: Audit, fakes: dict[str, FakeUseapi]) -> None:
    good = fakes["sync"]
    lb = SyncBalancer(good.source(), seed=1)
    audit.obj("sync balancer (closed)", lb)
    with lb:
        lease = lb.acquire(timeout=1)
        audit.obj("sync lease", lease)
        audit.obj("sync balancer", lb)
        with pytest.raises(NoAccountsError) as info:
            lb.acquire(timeout=0, channel="no-such-channel")
        audit.exc("sync no accounts", info.value)
        lb.release(lease, "throttled")
        with lb.acquire(timeout=1) as inner:
            audit.obj("sync inner", inner)
        audit.add("prometheus sync", prometheus(lb))
        audit.obj("sync stats", lb.statistics())
        good.set_status(401)
        with pytest.raises(AuthError) as auth_info:
            lb.refresh()
        audit.exc("sync refresh", auth_info.value)
        good.clear_fault()
    with pytest.raises(AuthError) as enter_info:
        SyncBalancer(UseapiAccountSource(WRONG_TOKEN, base_url=good.base_url)).open()
    audit.exc("sync enter", enter_info.value)


# -- the test --------------------------------------------------------------------------


class TestSecrets:
    def test_no_secret_reaches_any_output(
        self,
        redis_url: str,
        private_redis: RedisServer,
        caplog: pytest.LogCaptureFixture,
        capfd: pytest.CaptureFixture[str],
        tmp_path: Path,
    ) -> None:
        """Demo, CLI, every error, Redis and metrics: no credential, nor 8 characters of one."""
        caplog.set_level(logging.DEBUG)
        audit = Audit()
        names = ("good", "redis", "sync", "cli", "missing", "bad-body", "boom", "moved")
        with structlog.testing.capture_logs() as logs, _fakes(names) as fakes:
            fakes["missing"].set_accounts(None)
            fakes["bad-body"].set_body(
                f'{{"1": {{"discord": "{DISCORD[0]}", "maxJobs": "{API_TOKEN}'
            )
            fakes["boom"].set_status(500, f"internal error for token {API_TOKEN} {DISCORD[1]}")
            fakes["moved"].set_redirect(f"https://evil.example/?token={API_TOKEN}")
            token_file = tmp_path / "token"
            token_file.write_text(API_TOKEN + "\n")
            map_file = tmp_path / "map.json"
            map_file.write_text(json.dumps(v1_map(DISCORD)))
            v2_file = tmp_path / "v2.json"
            v2_file.write_text(json.dumps(v2_map()))
            cli, tok = fakes["cli"].base_url, {"USEAPI_TOKEN": API_TOKEN}
            runs = {
                "demo": _spawn(["demo", "--no-live", "--duration", "2", "--seed", str(DEMO_SEED),
                                "--channels", str(DEMO_CHANNELS), "--log-level", "debug"]),
                "accounts": _spawn(["accounts", "--base-url", cli], **tok),
                "accounts-json": _spawn(["accounts", "--base-url", cli, "--json"], **tok),
                "accounts-v2": _spawn(["accounts", "--base-url", cli, "--schema", "v2", "--json",
                                       "--log-level", "debug"], **tok),
                "accounts-file": _spawn(["accounts", "--base-url", cli, "--token-file",
                                         str(token_file)]),
                "accounts-401": _spawn(["accounts", "--base-url", cli, "--log-level", "debug"],
                                       USEAPI_TOKEN=WRONG_TOKEN),
                "accounts-404": _spawn(["accounts", "--base-url", fakes["missing"].base_url], **tok),
                "accounts-net": _spawn(["accounts", "--base-url",
                                        f"http://127.0.0.1:{closed_port()}", "--timeout", "1"], **tok),
                "accounts-body": _spawn(["accounts", "--base-url", fakes["bad-body"].base_url,
                                         "--log-level", "debug"], **tok),
                "accounts-500": _spawn(["accounts", "--base-url", fakes["boom"].base_url], **tok),
                "accounts-302": _spawn(["accounts", "--base-url", fakes["moved"].base_url], **tok),
                "accounts-http": _spawn(["accounts", "--base-url", "http://example.com"], **tok),
                "accounts-userinfo": _spawn(["accounts", "--base-url",
                                             cli.replace("http://", f"http://u:{API_TOKEN}@")],
                                            **tok),
                "demo-redis": _spawn(["demo", "--no-live", "--duration", "1", "--seed",
                                      str(DEMO_SEED), "--channels", str(DEMO_CHANNELS),
                                      "--redis", redis_url, "--processes", "2"]),
                "fake-server": _spawn(["fake-server", "--port", "0", "--map", str(map_file),
                                       "--v2-map", str(v2_file), "--token", API_TOKEN]),
            }  # fmt: skip
            try:
                for loop in ("asyncio", "trio"):
                    anyio.run(http_errors, audit, fakes, backend=loop)
                    anyio.run(balancer_errors, audit, fakes, backend=loop)
                    anyio.run(redis_scenario, audit, fakes, redis_url, private_redis, backend=loop)
                sync_scenario(audit, fakes)
                audit.obj("secret", Secret(API_TOKEN))
                audit.add("secret padded", f"{Secret(API_TOKEN):>80}")
            finally:
                results = _collect(runs)
        codes = {}
        for name, (code, out, err) in results.items():
            codes[name] = code
            audit.add(f"{name} stdout", out)
            audit.add(f"{name} stderr", err)
        for name in ("demo", "demo-redis"):
            assert codes[name] == 0, results[name][2][-2000:]
        for name in ("accounts", "accounts-json", "accounts-v2", "accounts-file"):
            assert codes[name] == 0, (name, results[name])
        for name in ("accounts-401", "accounts-404", "accounts-net", "accounts-body",
                     "accounts-500", "accounts-302", "accounts-http",
                     "accounts-userinfo"):  # fmt: skip
            assert codes[name] != 0, (name, results[name])
        assert "********" in results["accounts"][1].decode()
        assert json.loads(results["accounts-json"][1])["capacity"] == 2 * len(DISCORD)
        assert b"listening on" in results["fake-server"][1]

        captured = capfd.readouterr()
        audit.add("stdout", captured.out)
        audit.add("stderr", captured.err)
        audit.logs("structlog", logs)
        for record in caplog.records:
            audit.add("stdlib log", record.getMessage())
            audit.add("stdlib record", repr(record.__dict__))
            if record.exc_info and record.exc_info[1] is not None:
                audit.exc("log record", record.exc_info[1])
        audit.add("caplog", caplog.text)
        audit.texts += redis_texts(redis_url)

        kinds = set(audit.errors)
        assert {AuthError, ConfigNotFoundError, SourceError, AccountMapError, NoAccountsError,
                NoCapacityError, LeaseError, StaleAccountMapError,
                BackendUnavailableError} <= kinds  # fmt: skip
        assert any(e["event"] == "map_refresh_failed" for e in logs)
        assert caplog.records, "httpx's stdlib logging was not captured"
        assert any(where.startswith("redis hash value") for where, _ in audit.texts)
        audit.check([*OURS, *demo_secrets()])

        # The search itself finds what it looks for.
        probe = Audit()
        probe.add("probe", f"...{API_TOKEN[7:15]}...")
        with pytest.raises(AssertionError):
            probe.check(OURS)
        probe = Audit()
        probe.add("probe", "token=discord-token-0123abcd")
        with pytest.raises(AssertionError):
            probe.check(OURS)

    def test_public_objects(self) -> None:
        """Secret, Account, sources and balancers print masked in every form, before any use."""
        secret = Secret(API_TOKEN)
        account = Account("c1", "s", Secret(DISCORD[0]), 3)
        objects: list[object] = [
            secret,
            account,
            UseapiAccountSource(API_TOKEN),
            StaticAccountSource({"c1": account}),
            StaticAccountSource(v1_map(DISCORD)),
            Balancer(UseapiAccountSource(API_TOKEN)),
            SyncBalancer(UseapiAccountSource(API_TOKEN)),
            parse_account_map(v2_map(), schema="v2"),
        ]
        audit = Audit()
        for obj in objects:
            audit.obj(type(obj).__name__, obj)
        audit.add("secret padded", f"{secret:>60}")
        audit.check(OURS)
        assert secret.reveal() == API_TOKEN


class _fakes:
    """Several running FakeUseapi servers, each for one part of the scenario."""

    def __init__(self, names: Iterable[str]) -> None:
        self.fakes = {
            name: FakeUseapi(v1_map(DISCORD), token=API_TOKEN, v2_accounts=v2_map())
            for name in names
        }

    def __enter__(self) -> dict[str, FakeUseapi]:
        for fake in self.fakes.values():
            fake.start()
        return self.fakes

    def __exit__(self, *exc: object) -> None:
        for fake in self.fakes.values():
            fake.stop()


def _collect(runs: dict[str, subprocess.Popen[bytes]]) -> dict[str, tuple[int, bytes, bytes]]:
    """Wait for every subprocess (stopping the server), bounded; return codes and output."""
    results: dict[str, tuple[int, bytes, bytes]] = {}
    server = runs.pop("fake-server")
    for name, proc in runs.items():
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        results[name] = (proc.returncode, out, err)
    server.terminate()
    try:
        out, err = server.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()
        out, err = server.communicate()
    results["fake-server"] = (server.returncode, out, err)
    return results


class TestRegressions:
    """Bugs this suite found, each fixed; these keep them fixed."""

    @pytest.mark.parametrize("case", ["payload", "token", "redis-url"])
    def test_no_library_frame_local_holds_a_credential(self, case: str) -> None:
        exc: BaseException
        if case == "payload":
            with pytest.raises(AccountMapError) as map_info:
                parse_account_map([DISCORD[0]])
            exc = map_info.value
        elif case == "token":
            with pytest.raises(ValueError) as value_info:
                UseapiAccountSource(API_TOKEN, base_url="http://api.example.com")
            exc = value_info.value
        else:
            url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{closed_port()}/0"
            lb = Balancer(
                StaticAccountSource(v1_map(DISCORD)),
                backend=RedisBackend(url, connect_timeout=0.5),
            )
            with pytest.raises(BackendUnavailableError) as redis_info:
                anyio.run(_enter, lb)
            exc = redis_info.value
        texts = []
        link: BaseException | None = exc
        while link is not None:
            tb = link.__traceback__
            while tb is not None:
                if str(tb.tb_frame.f_globals.get("__name__", "")).startswith("balancer"):
                    texts += [_safe_repr(v) for v in tb.tb_frame.f_locals.values()]
                tb = tb.tb_next
            link = link.__cause__ or link.__context__
        assert not any(secret in text for secret in OURS for text in texts)

    @pytest.mark.parametrize(
        "cls", [UseapiAccountSource, StaticAccountSource, RedisBackend, SyncBalancer]
    )
    def test_repr_of_an_object_whose_constructor_raised(self, cls: type[object]) -> None:
        """
        A constructor that raises leaves ``self`` in its frame; error trackers and
        debuggers repr it. Every public class's repr must survive a half-built self.
        """
        repr(object.__new__(cls))


def _safe_repr(value: object) -> str:
    try:
        return repr(value)
    except Exception as error:  # noqa: BLE001 - the half-built repr bug, not this one
        return f"<repr raised {type(error).__name__}>"
