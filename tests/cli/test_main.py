"""Tests of the ``balancer`` command: demo, accounts, fake-server."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import structlog

from balancer import cli
from balancer.testing import FakeUseapi, make_accounts, make_v2_accounts, random_token

ROOT = Path(__file__).resolve().parents[2]


def run_balancer(*args: str, env: dict[str, str] | None = None, timeout: float = 60):
    """Run ``python -m balancer ARGS`` in a fresh interpreter."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("USEAPI_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "balancer", *args],
        capture_output=True,
        check=False,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=full_env,
    )


def report_rows(stdout: str) -> list[tuple[str, int, int, str, int]]:
    """(channel, maxJobs, peak, held, jobs) for each row of the plain report."""
    rows = re.findall(r"^(ch\d+)\s+(\d+)\s+(\d+)\s+(yes|NO)\s+(\d+)\s", stdout, re.MULTILINE)
    return [(c, int(m), int(p), h, int(j)) for c, m, p, h, j in rows]


def slices(secret: str, size: int = 8) -> set[str]:
    """Every ``size``-character slice of ``secret``."""
    return {secret[i : i + size] for i in range(len(secret) - size + 1)}


def assert_no_secret(text: str, *secrets: str) -> None:
    for secret in secrets:
        for piece in slices(secret):
            assert piece not in text, "part of a secret was printed"


@pytest.fixture(autouse=True)
def restore_structlog() -> Iterator[None]:
    """``main()`` configures structlog for the process; put the test suite's back."""
    saved = structlog.get_config()
    yield
    structlog.reset_defaults()
    structlog.configure(**saved)


@pytest.fixture
def fake() -> Iterator[FakeUseapi]:
    raw = make_accounts(3, max_jobs=[1, 2, 4], prefix="chan-", seed=3)
    with FakeUseapi(raw, token=random_token(""), v2_accounts=make_v2_accounts(2)) as server:
        yield server


def discord_tokens(fake: FakeUseapi) -> list[str]:
    """The random part of every credential in the fake's maps (their prefixes are public)."""
    raw = make_accounts(3, max_jobs=[1, 2, 4], prefix="chan-", seed=3)
    v2 = make_v2_accounts(2)
    secrets = [e["discord"] for e in raw.values()] + [
        secret for e in v2.values() for secret in (e["jwt"]["token"], e["password"])
    ]
    return [secret.rsplit("-", 1)[1] for secret in secrets]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class TestDemo:
    def test_demo_reports_that_limits_held(self) -> None:
        """`balancer demo --no-live` runs by itself and ends with a passing report."""
        result = run_balancer("demo", "--no-live", "--duration", "2", "--seed", "1")
        assert result.returncode == 0, result.stderr
        out = result.stdout
        assert "== balancer demo: report ==" in out
        assert "OK: limits held" in out
        assert re.search(r"jobs done:\s+\d+ \(", out)
        assert re.search(r"throughput: [\d.]+ jobs/s", out)
        assert re.search(r"p50 [\d.]+ s, p90 [\d.]+ s, p99 [\d.]+ s", out)
        rows = report_rows(out)
        assert [row[1] for row in rows] == [1, 2, 3, 4, 1, 2]
        for channel, max_jobs, peak, held, jobs in rows:
            assert 1 <= peak <= max_jobs, channel
            assert held == "yes" and jobs > 0
        assert re.search(r"^\[\s*1\.\ds\] done=\d+", out, re.MULTILINE)  # a status line

    @pytest.mark.redis
    def test_demo_on_redis_holds_fleet_wide(self) -> None:
        """`demo --redis` starts a throwaway redis-server and worker processes."""
        result = run_balancer(
            "demo", "--redis", "--no-live", "--duration", "2", "--seed", "2",
            "--processes", "2", "--channels", "4",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert "Redis, shared by 2 worker processes" in result.stdout
        assert "peak counted fleet-wide, in Redis" in result.stdout
        rows = report_rows(result.stdout)
        assert len(rows) == 4
        assert all(peak <= max_jobs for _, max_jobs, peak, _, _ in rows)

    def test_bad_arguments(self) -> None:
        """Argument errors exit 2 with argparse's message."""
        with pytest.raises(SystemExit) as info:
            cli.main(["demo", "--duration", "0"])
        assert info.value.code == 2
        with pytest.raises(SystemExit) as info:
            cli.main(["--help"])
        assert info.value.code == 0


class TestAccounts:
    def test_table_is_masked(
        self, fake: FakeUseapi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The table lists channels, servers and maxJobs, with tokens masked."""
        monkeypatch.setenv("USEAPI_TOKEN", fake.token)
        assert cli.main(["accounts", "--base-url", fake.base_url]) == 0
        out, err = capsys.readouterr()
        for channel, max_jobs in (("chan-0", 1), ("chan-1", 2), ("chan-2", 4)):
            assert re.search(rf"{channel}\W+\d+\W+{max_jobs}\W+\*{{8}}", out), out
        assert "total capacity 7" in out
        assert_no_secret(out + err, fake.token, *discord_tokens(fake))

    def test_plain_table_without_rich(
        self, fake: FakeUseapi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Without rich the table is plain text, masked just the same."""
        monkeypatch.setitem(sys.modules, "rich", None)
        monkeypatch.setenv("USEAPI_TOKEN", fake.token)
        assert cli.main(["accounts", "--base-url", fake.base_url]) == 0
        out, err = capsys.readouterr()
        assert re.search(r"^chan-2\s+\d+\s+4\s+\*{8}$", out, re.MULTILINE), out
        assert_no_secret(out + err, fake.token, *discord_tokens(fake))

    def test_json(
        self, fake: FakeUseapi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--json prints the map for scripts, secrets masked; v2 too."""
        monkeypatch.setenv("USEAPI_TOKEN", fake.token)
        assert cli.main(["accounts", "--base-url", fake.base_url, "--json"]) == 0
        payload = json.loads(capsys.readouterr().out)
        assert payload["capacity"] == 7
        assert [c["channel"] for c in payload["channels"]] == ["chan-0", "chan-1", "chan-2"]
        assert {c["discord"] for c in payload["channels"]} == {"********"}
        assert cli.main(["accounts", "--base-url", fake.base_url, "--json", "--schema", "v2"]) == 0
        out, err = capsys.readouterr()
        payload = json.loads(out)
        assert [c["channel"] for c in payload["channels"]] == [
            "user0@example.com",
            "user1@example.com",
        ]
        assert all(c["server"] is None for c in payload["channels"])
        assert_no_secret(out + err, fake.token, *discord_tokens(fake))

    def test_token_file(
        self, fake: FakeUseapi, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--token-file reads the token from a file."""
        path = tmp_path / "token"
        path.write_text(fake.token + "\n")
        assert cli.main(["accounts", "--base-url", fake.base_url, "--token-file", str(path)]) == 0
        assert "chan-1" in capsys.readouterr().out
        assert cli.main(["accounts", "--token-file", str(tmp_path / "missing")]) == 2

    @pytest.mark.parametrize(
        ("fault", "code", "message"),
        [
            ("wrong-token", 3, "refused the API token"),
            ("404", 4, "no account is configured"),
            ("503", 5, "HTTP 503"),
            ("closed-port", 5, "request failed"),
            ("no-token", 2, "USEAPI_TOKEN"),
            ("http-remote", 2, "https://"),
        ],
    )
    def test_errors_have_distinct_exit_codes(
        self,
        fake: FakeUseapi,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
        fault: str,
        code: int,
        message: str,
    ) -> None:
        """401 exits 3, 404 exits 4, network and upstream faults 5, usage errors 2."""
        base_url = fake.base_url
        monkeypatch.setenv("USEAPI_TOKEN", fake.token)
        if fault == "wrong-token":
            monkeypatch.setenv("USEAPI_TOKEN", "not-" + fake.token)
        elif fault == "404":
            fake.set_accounts(None)
        elif fault == "503":
            fake.set_status(503)
        elif fault == "closed-port":
            base_url = f"http://127.0.0.1:{closed_port()}"
        elif fault == "no-token":
            monkeypatch.delenv("USEAPI_TOKEN")
        elif fault == "http-remote":
            base_url = "http://example.com"
        assert cli.main(["accounts", "--base-url", base_url, "--timeout", "5"]) == code
        out, err = capsys.readouterr()
        assert message in err
        assert out == ""
        assert_no_secret(out + err, fake.token, *discord_tokens(fake))

    def test_entry_point(self, fake: FakeUseapi) -> None:
        """`python -m balancer accounts` works end to end and prints no secret."""
        result = run_balancer(
            "accounts", "--base-url", fake.base_url, env={"USEAPI_TOKEN": fake.token}
        )
        assert result.returncode == 0, result.stderr
        assert "chan-0" in result.stdout
        assert_no_secret(result.stdout + result.stderr, fake.token, *discord_tokens(fake))
        result = run_balancer("accounts", "--base-url", fake.base_url, env={"USEAPI_TOKEN": "x"})
        assert result.returncode == 3
        assert "refused" in result.stderr


class TestFakeServer:
    def test_serves_until_terminated(self, tmp_path: Path) -> None:
        """`balancer fake-server` prints its URL, answers, and stops cleanly on SIGTERM."""
        custom = make_accounts(2, max_jobs=[5, 6], prefix="mine-")
        (tmp_path / "map.json").write_text(json.dumps(custom))
        env = {k: v for k, v in os.environ.items() if not k.startswith("USEAPI_")}
        proc = subprocess.Popen(
            [sys.executable, "-m", "balancer", "fake-server", "--port", "0",
             "--map", str(tmp_path / "map.json"), "--token", "tok-123"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()
            match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", first)
            assert match, first
            url = match.group(1)
            ok = httpx.get(
                f"{url}/v1/pixverse/account", headers={"Authorization": "Bearer tok-123"}
            )
            assert ok.status_code == 200
            assert {k: v["maxJobs"] for k, v in ok.json().items()} == {"mine-0": 5, "mine-1": 6}
            refused = httpx.get(f"{url}/v1/pixverse/account")
            assert refused.status_code == 401
            v2 = httpx.get(
                f"{url}/v2/pixverse/accounts", headers={"Authorization": "Bearer tok-123"}
            )
            assert v2.status_code == 200
        finally:
            proc.terminate()
            out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert "tok-123" not in first + out + err  # a given token is not echoed

    def test_bad_map_file(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A map that is not a JSON object is refused with exit code 2."""
        (tmp_path / "map.json").write_text("[1, 2]")
        assert cli.main(["fake-server", "--map", str(tmp_path / "map.json")]) == 2
        assert "JSON object" in capsys.readouterr().err


def test_log_level_before_or_after_the_command() -> None:
    """--log-level works on either side of the subcommand; info by default."""
    parser = cli.build_parser()
    assert parser.parse_args(["--log-level", "warning", "demo"]).log_level == "warning"
    assert parser.parse_args(["demo", "--log-level", "debug"]).log_level == "debug"
    assert not hasattr(parser.parse_args(["demo"]), "log_level")  # main() makes it "info"


class TestDemoVerdict:
    @staticmethod
    def result(peak: int, leaked: int = 0):
        from balancer.cli.demo.model import ChannelRow, RunResult, Snapshot

        row = ChannelRow("ch0", 2, 0, peak, 0, 5, 1, 1, "active")
        final = Snapshot([row], elapsed=1.0, duration=1.0, waiting=0, workers=3)
        return RunResult(final, [0.1, 0.2], 1.0, 1, "memory (one process)", leaked)

    def test_report_and_exit_code_when_a_limit_was_exceeded(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A peak above maxJobs (or a leaked slot) fails the report and the command."""
        from balancer.cli.demo import local as demo_local
        from balancer.cli.demo.view import plain_report

        bad = self.result(peak=3)
        assert "FAIL: LIMIT EXCEEDED: ch0 peak 3 > maxJobs 2" in plain_report(bad)
        assert "FAIL:" in plain_report(self.result(peak=2, leaked=1))
        assert "OK: limits held" in plain_report(self.result(peak=2))

        async def fake_run(config: object, *, live: bool) -> object:
            return bad

        monkeypatch.setattr(demo_local, "run_local", fake_run)
        assert cli.main(["demo", "--no-live"]) == 1
