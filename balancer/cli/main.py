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

This is the only module that reads environment variables: ``USEAPI_TOKEN``
(the API token; ``accounts``, and ``fake-server``'s default) and
``USEAPI_BASE_URL`` (``accounts``); the commands get their values as
arguments. It configures the process's logging (structlog, to stderr, through
:mod:`balancer.cli.logs`) before running a command.

Exit codes: 0 success; 1 the demo saw a limit exceeded, or failed; 2 bad
usage (including a missing token); 3 the API token was refused (401/403); 4
no account configured (404); 5 any other failure to fetch the map (network,
timeout, 429, 5xx, malformed answer); 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .console import EXIT_INTERRUPTED, error
from .fake_server import DEFAULT_FAKE_TOKEN
from .logs import LEVELS, configure_logging

if TYPE_CHECKING:
    from typing import TypeAlias

    _Subparsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]

__all__ = ["build_parser", "main"]


# -- the commands ------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    # DemoConfig's first fields, in order: duration, channels, workers, seed, processes.
    config = DemoConfig(args.duration, args.channels, args.workers, args.seed, args.processes)
    live = not args.no_live and sys.stdout.isatty()
    return run_demo(config, live=live, redis=args.redis, log_level=args.log_level)


def cmd_accounts(args: argparse.Namespace) -> int:
    from .accounts import run_accounts

    return run_accounts(args, env_token=os.environ.get("USEAPI_TOKEN", ""))


def cmd_fake_server(args: argparse.Namespace) -> int:
    from .fake_server import run_fake_server

    return run_fake_server(args, env_token=os.environ.get("USEAPI_TOKEN", ""))


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


def _add_demo(sub: _Subparsers, common: argparse.ArgumentParser) -> None:
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


def _add_accounts(sub: _Subparsers, common: argparse.ArgumentParser) -> None:
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


def _add_fake_server(sub: _Subparsers, common: argparse.ArgumentParser) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--log-level", choices=LEVELS, default=argparse.SUPPRESS, help="default: info"
    )
    parser = argparse.ArgumentParser(
        prog="balancer",
        description="Client-side balancing of jobs across useapi.net Discord channels.",
        parents=[common],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(sub, common)
    _add_accounts(sub, common)
    _add_fake_server(sub, common)
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
        error("interrupted")
        return EXIT_INTERRUPTED
    return code
