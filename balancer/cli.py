"""
The ``balancer`` command (also ``python -m balancer``).

``balancer demo``
    Simulated Discord jobs through a real balancer against a fake useapi
    server on loopback, with a live per-channel view and a closing report
    that proves no channel ever ran more than its ``maxJobs``.
``balancer accounts``
    Fetch the account map (``USEAPI_TOKEN``) and print each channel and its
    capacity, credentials masked.
``balancer fake-server``
    Serve the fake useapi account API on loopback until Ctrl-C.

This is the only module that configures logging (structlog, to stderr) or
reads environment variables: ``USEAPI_TOKEN`` (the API token; ``accounts``,
and ``fake-server``'s default) and ``USEAPI_BASE_URL`` (``accounts``).

Exit codes: 0 success; 1 the demo saw a limit exceeded, or failed; 2 bad
usage (including a missing token); 3 the API token was refused (401/403); 4
no account configured (404); 5 any other failure to fetch the map (network,
timeout, 429, 5xx, malformed answer); 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from .errors import AccountMapError, AuthError, ConfigNotFoundError, SourceError

if TYPE_CHECKING:
    from types import FrameType

    from ._demo import DemoConfig
    from .testing import FakeUseapi


__all__ = ["configure_logging", "main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_AUTH, EXIT_NOT_FOUND, EXIT_SOURCE = 0, 1, 2, 3, 4, 5
EXIT_INTERRUPTED = 130
#: The token ``balancer fake-server`` accepts when neither ``--token`` nor USEAPI_TOKEN is set.
DEFAULT_FAKE_TOKEN = "test-api-token"
_LEVELS = ("debug", "info", "warning", "error")


# -- logging -----------------------------------------------------------------


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


def _error(message: str) -> None:
    sys.stderr.write(f"balancer: {message}\n")
    sys.stderr.flush()


# -- demo --------------------------------------------------------------------


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _on_signals(handler: Callable[[int, FrameType | None], None], *names: str) -> Iterator[None]:
    """Handle the named signals this platform has with ``handler`` (main thread only)."""
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


def _has_rich() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import DemoConfig

    config = DemoConfig(
        duration=args.duration,
        channels=args.channels,
        workers=args.workers,
        seed=args.seed,
        processes=args.processes,
    )
    live = not args.no_live and sys.stdout.isatty()
    if live and not _has_rich():
        _error("the live view needs rich: pip install 'balancer[cli]' (plain lines for now)")
        live = False
    # Stopped by a terminal closing or a supervisor: clean up as for Ctrl-C
    # (worker processes, the throwaway redis-server).
    with _on_signals(_interrupt, "SIGTERM", "SIGHUP"):
        return _run_demo(config, args, live=live)


def _run_demo(config: DemoConfig, args: argparse.Namespace, *, live: bool) -> int:
    import anyio

    if args.redis is None:
        from ._demo_local import run_local

        result = anyio.run(lambda: run_local(config, live=live))
    else:
        from ._demo_redis import FleetError, run_fleet

        try:
            result = run_fleet(config, args.redis or None, live=live, log_level=args.log_level)
        except FleetError as exc:
            _error(str(exc))
            return EXIT_FAILED
    return EXIT_OK if not result.violations and not result.leaked else EXIT_FAILED


# -- accounts ----------------------------------------------------------------


def _read_token(args: argparse.Namespace) -> str | None:
    if args.token_file is None:
        token = os.environ.get("USEAPI_TOKEN", "").strip()
        if not token:
            _error("no API token: set USEAPI_TOKEN or pass --token-file FILE")
        return token or None
    try:
        token = Path(args.token_file).read_text().strip()
    except OSError as exc:
        _error(f"cannot read --token-file {args.token_file}: {exc.strerror}")
        return None
    if not token:
        _error(f"--token-file {args.token_file} is empty")
    return token or None


def cmd_accounts(args: argparse.Namespace) -> int:
    import anyio

    from ._cli_accounts import fetch_accounts, print_json, print_table
    from .sources import UseapiAccountSource

    token = _read_token(args)
    if token is None:
        return EXIT_USAGE
    try:
        source = UseapiAccountSource(
            token, base_url=args.base_url, schema=args.schema, timeout=args.timeout
        )
    except (TypeError, ValueError) as exc:
        _error(str(exc))
        return EXIT_USAGE
    try:
        parsed = anyio.run(fetch_accounts, source)
    except AuthError as exc:
        _error(f"{exc}: check USEAPI_TOKEN (or --token-file) and --base-url")
        return EXIT_AUTH
    except ConfigNotFoundError:
        _error(
            f"no account is configured at {args.base_url} yet (HTTP 404, schema "
            f"{args.schema}); add one through useapi.net first"
        )
        return EXIT_NOT_FOUND
    except (SourceError, AccountMapError) as exc:
        _error(f"could not fetch the account map from {args.base_url}: {exc}")
        return EXIT_SOURCE
    if args.json:
        print_json(parsed, args.schema)
    else:
        print_table(parsed, args.schema, args.base_url, rich=_has_rich())
    return EXIT_OK


# -- fake-server -------------------------------------------------------------


def _load_map(path: str | None) -> dict[str, Any] | None:
    if path is None:
        return None
    raw = json.loads(Path(path).read_text())
    if not isinstance(raw, dict):
        raise TypeError(f"{path}: the account map must be a JSON object")
    return raw


def cmd_fake_server(args: argparse.Namespace) -> int:
    from ._demo import demo_limits
    from .testing import FakeUseapi, make_accounts, make_v2_accounts

    try:
        v1 = _load_map(args.map) or make_accounts(6, max_jobs=demo_limits(6))
        v2 = _load_map(args.v2_map) or make_v2_accounts(3, max_jobs=[2, 4, 8])
    except (OSError, ValueError, TypeError) as exc:
        _error(f"cannot load the map: {exc}")
        return EXIT_USAGE
    if args.token:
        token, where = args.token, "as given by --token"
    elif os.environ.get("USEAPI_TOKEN"):
        token, where = os.environ["USEAPI_TOKEN"], "from USEAPI_TOKEN"
    else:
        token, where = DEFAULT_FAKE_TOKEN, f"{DEFAULT_FAKE_TOKEN!r} (the default)"
    env = f"USEAPI_TOKEN={DEFAULT_FAKE_TOKEN} " if token == DEFAULT_FAKE_TOKEN else ""
    fake = FakeUseapi(v1, v2_accounts=v2, token=token, port=args.port)
    try:
        fake.start()
    except OSError as exc:
        _error(f"cannot listen on 127.0.0.1:{args.port}: {exc.strerror}")
        return EXIT_FAILED
    with _on_signals(_interrupt, "SIGTERM"):
        return _serve(fake, v1, v2, where, env)


def _serve(fake: FakeUseapi, v1: dict[str, Any], v2: dict[str, Any], where: str, env: str) -> int:
    print(f"fake useapi listening on {fake.base_url}", flush=True)
    print(f"  GET {fake.base_url}/v1/pixverse/account   ({len(v1)} channels)")
    print(f"  GET {fake.base_url}/v2/pixverse/accounts  ({len(v2)} accounts)")
    print(f"  API token: {where}")
    print(f"  try: {env}balancer accounts --base-url {fake.base_url}")
    print("Ctrl-C to stop.", flush=True)
    try:
        fake.wait()
    except KeyboardInterrupt:
        pass
    finally:
        fake.stop()
    return EXIT_OK


# -- the parser --------------------------------------------------------------


def _positive(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, not {value}")
    return number


def _count(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {value}")
    return number


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--log-level", choices=_LEVELS, default=argparse.SUPPRESS, help="default: info"
    )
    parser = argparse.ArgumentParser(
        prog="balancer",
        description="Client-side balancing of jobs across useapi.net Discord channels.",
        parents=[common],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo", parents=[common], help="simulated jobs through a balancer, with a live view"
    )
    demo.add_argument("--duration", type=_positive, default=8.0, help="seconds (default: 8)")
    demo.add_argument("--channels", type=_count, default=6, help="channels (default: 6)")
    demo.add_argument("--workers", type=_count, help="workers (default: 1.5 x capacity)")
    demo.add_argument("--seed", type=int, help="repeat a run's choices and job mix")
    demo.add_argument("--no-live", action="store_true", help="plain lines (logs, CI)")
    demo.add_argument(
        "--redis",
        nargs="?",
        const="",
        metavar="URL",
        help="run several worker processes sharing one Redis (no URL: start a throwaway one)",
    )
    demo.add_argument(
        "--processes", type=_count, default=3, help="worker processes with --redis (default: 3)"
    )
    demo.set_defaults(func=cmd_demo)

    accounts = sub.add_parser(
        "accounts", parents=[common], help="print the account map (token from USEAPI_TOKEN)"
    )
    accounts.add_argument("--token-file", help="read the API token from this file")
    accounts.add_argument(
        "--base-url",
        default=os.environ.get("USEAPI_BASE_URL") or "https://api.useapi.net",
        help="default: USEAPI_BASE_URL, else https://api.useapi.net",
    )
    accounts.add_argument("--schema", choices=("v1", "v2"), default="v1")
    accounts.add_argument("--timeout", type=_positive, default=10.0, help="seconds")
    accounts.add_argument("--json", action="store_true", help="machine-readable output")
    accounts.set_defaults(func=cmd_accounts)

    fake = sub.add_parser(
        "fake-server", parents=[common], help="serve the fake useapi account API on loopback"
    )
    fake.add_argument("--port", type=int, default=0, help="default: a free port")
    fake.add_argument("--map", help="raw v1 account map (JSON file); default: a demo map")
    fake.add_argument("--v2-map", help="raw v2 account map (JSON file); default: a demo map")
    fake.add_argument(
        "--token", help=f"token to accept (default: USEAPI_TOKEN, else {DEFAULT_FAKE_TOKEN!r})"
    )
    fake.set_defaults(func=cmd_fake_server)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``balancer`` command; return its exit code."""
    args = build_parser().parse_args(argv)
    # Given before or after the subcommand; never defaulted by either parser,
    # since argparse shares the option between them.
    args.log_level = getattr(args, "log_level", "info")
    configure_logging(args.log_level)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        _error("interrupted")
        return EXIT_INTERRUPTED
    return code
