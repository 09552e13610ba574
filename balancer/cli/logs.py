"""
The command's logging: structlog events rendered for humans, one line each.

:func:`configure_logging` is called by :func:`balancer.cli.main.main` for the
command's own process, and by each worker process of ``balancer demo --redis``
(:mod:`balancer.cli.demo.fleet`), whose lines go to the parent. Nothing
outside :mod:`balancer.cli` configures logging: the library only emits events.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import structlog

__all__ = ["LEVELS", "configure_logging"]

LEVELS = ("debug", "info", "warning", "error")


def _to_stderr(line: str) -> None:
    # Looked up at each call: rich's live view swaps sys.stderr to print above itself.
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


class _LineLogger:
    """A structlog logger that hands each rendered line to ``sink``."""

    def __init__(self, sink: Callable[[str], object]) -> None:
        self._sink = sink

    def msg(self, message: str) -> None:
        self._sink(message)

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


def configure_logging(level: str = "info", *, sink: Callable[[str], object] | None = None) -> None:
    """
    Render structlog events for humans, at ``level`` and above, to stderr (or
    to ``sink``, one line per call; the demo's worker processes send theirs to
    the parent). Tracebacks never show local variables.
    """
    logger = _LineLogger(sink or _to_stderr)
    try:
        from structlog.dev import RichTracebackFormatter

        formatter: Any = RichTracebackFormatter(show_locals=False)
    except ImportError:  # rich is missing
        formatter = structlog.dev.plain_traceback
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="%H:%M:%S"),
            structlog.dev.ConsoleRenderer(
                colors=sys.stderr.isatty(), exception_formatter=formatter
            ),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=lambda *args: logger,
        cache_logger_on_first_use=False,
    )
