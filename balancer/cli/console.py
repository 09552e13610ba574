"""
How the ``balancer`` command meets its terminal: exit codes, error lines on
stderr, whether rich is there, and signals turned into ``KeyboardInterrupt``.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from types import FrameType

__all__ = [
    "EXIT_AUTH",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_SOURCE",
    "EXIT_USAGE",
    "error",
    "has_rich",
    "interrupt_on",
]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_AUTH, EXIT_NOT_FOUND, EXIT_SOURCE = 0, 1, 2, 3, 4, 5
EXIT_INTERRUPTED = 130


def error(message: str) -> None:
    """Write ``balancer: <message>`` to stderr."""
    sys.stderr.write(f"balancer: {message}\n")
    sys.stderr.flush()


def has_rich() -> bool:
    """Whether rich (the ``cli`` extra) is installed."""
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def interrupt_on(*names: str) -> Iterator[None]:
    """
    Turn the named signals this platform has into ``KeyboardInterrupt`` (main
    thread only), so a terminal closing or a supervisor cleans up as Ctrl-C does.
    """
    handler: Callable[[int, FrameType | None], None] = _interrupt
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for name in names:
            signum = getattr(signal, name, None)
            if signum is not None:
                previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
