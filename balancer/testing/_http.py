"""The loopback HTTP server under :class:`~balancer.testing.FakeUseapi`: one thread per connection."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["Reply", "Responder", "Server"]


@dataclass(frozen=True, slots=True)
class Reply:
    """What to answer one request with, after ``delay`` seconds."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    delay: float


#: Answers (method, path with query, headers) with a :class:`Reply`.
Responder = Callable[[str, str, Mapping[str, str]], Reply]


class Server(ThreadingHTTPServer):
    """
    A threading HTTP server on ``address`` that answers every method through
    ``respond``, and can drop live connections. A reply's delay ends early, with
    the connection closed unanswered, once ``stopping`` is set.
    """

    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], respond: Responder, stopping: threading.Event
    ) -> None:
        self.respond = respond
        self.stopping = stopping
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

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
    server: Server
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
        reply = self.server.respond(self.command, self.path, dict(self.headers.items()))
        if reply.delay and self.server.stopping.wait(reply.delay):
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
