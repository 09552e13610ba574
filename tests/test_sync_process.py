"""SyncBalancer across process boundaries: fork (Celery prefork) and interpreter exit."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from balancer import BalancerError, StaticAccountSource, SyncBalancer
from balancer.testing import make_accounts

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["asyncio", "trio"])
def loop(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def _run(code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )


class TestFork:
    def test_use_in_a_forked_child_raises_at_once(self, loop: str) -> None:
        """A balancer opened in the parent raises a clear error in a forked child, never hangs (#9)."""
        code = f"""
        import os, sys, time
        from balancer import BalancerError, StaticAccountSource, SyncBalancer
        from balancer.testing import make_accounts

        lb = SyncBalancer(StaticAccountSource(make_accounts(1)), ttl=3600,
                          async_backend={loop!r}).open()
        pid = os.fork()
        if pid == 0:
            started = time.monotonic()
            codes = []
            for call in (lambda: lb.acquire(timeout=1), lb.statistics, lb.refresh):
                try:
                    call()
                    codes.append("no error")
                except BalancerError as exc:
                    codes.append("fork" in str(exc) and "BalancerError")
            took = time.monotonic() - started
            print(codes, took < 1.0, flush=True)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        lease = lb.acquire(timeout=1)   # the parent is unaffected
        lb.release(lease)
        lb.close()
        sys.exit(os.waitstatus_to_exitcode(status))
        """
        result = _run(code)
        assert result.returncode == 0, result.stderr
        last = result.stdout.strip().splitlines()[-1]
        assert last == "['BalancerError', 'BalancerError', 'BalancerError'] True"


class TestInterpreterExit:
    def test_an_unclosed_balancer_in_a_global_does_not_hang_exit(self, loop: str) -> None:
        """A module-level SyncBalancer never closed lets the interpreter exit (#9)."""
        code = f"""
        from balancer import StaticAccountSource, SyncBalancer
        from balancer.testing import make_accounts

        LB = SyncBalancer(StaticAccountSource(make_accounts(2)), ttl=3600,
                          async_backend={loop!r}).open()
        HELD = LB.acquire(timeout=1)
        print("opened", flush=True)
        """
        result = _run(code, timeout=30)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().splitlines()[-1] == "opened"

    def test_close_after_exit_hook_ran_is_a_no_op(self, loop: str) -> None:
        """A balancer closed by its owner before exit closes once; nothing is left to hang."""
        lb = SyncBalancer(StaticAccountSource(make_accounts(1)), ttl=3600, async_backend=loop)
        with lb:
            lb.statistics()
        lb.close()
        with pytest.raises(BalancerError):
            lb.acquire(timeout=0)
