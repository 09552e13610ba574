"""
``balancer accounts``: fetch the account map and print it, credentials masked.

The token comes from ``--token-file``, else from the ``USEAPI_TOKEN`` value
that :mod:`balancer.cli.main` read (this module reads no environment).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from ..accounts import MASK
from ..errors import AccountMapError, AuthError, ConfigNotFoundError, SourceError
from ..sources import UseapiAccountSource
from .console import EXIT_AUTH, EXIT_NOT_FOUND, EXIT_OK, EXIT_SOURCE, EXIT_USAGE, error, has_rich

if TYPE_CHECKING:
    from ..accounts import ParsedAccounts

__all__ = ["fetch_accounts", "print_json", "print_table", "read_token", "run_accounts"]


def read_token(token_file: str | None, env_token: str) -> str | None:
    """The API token from ``token_file``, else ``env_token``; None (said on stderr) if none."""
    if token_file is None:
        token = env_token.strip()
        if not token:
            error("no API token: set USEAPI_TOKEN or pass --token-file FILE")
        return token or None
    try:
        token = Path(token_file).read_text().strip()
    except OSError as exc:
        error(f"cannot read --token-file {token_file}: {exc.strerror}")
        return None
    if not token:
        error(f"--token-file {token_file} is empty")
    return token or None


def run_accounts(args: argparse.Namespace, *, env_token: str) -> int:
    """The ``accounts`` command: fetch once, print, and map each failure to its exit code."""
    token = read_token(args.token_file, env_token)
    if token is None:
        return EXIT_USAGE
    try:
        source = UseapiAccountSource(
            token, base_url=args.base_url, schema=args.schema, timeout=args.timeout
        )
    except (TypeError, ValueError) as exc:
        error(str(exc))
        return EXIT_USAGE
    try:
        parsed = anyio.run(fetch_accounts, source)
    except AuthError as exc:
        error(f"{exc}: check USEAPI_TOKEN (or --token-file) and --base-url")
        return EXIT_AUTH
    except ConfigNotFoundError:
        error(
            f"no account is configured at {args.base_url} yet (HTTP 404, schema "
            f"{args.schema}); add one through useapi.net first"
        )
        return EXIT_NOT_FOUND
    except (SourceError, AccountMapError) as exc:
        error(f"could not fetch the account map from {args.base_url}: {exc}")
        return EXIT_SOURCE
    if args.json:
        print_json(parsed, args.schema)
    else:
        print_table(parsed, args.schema, args.base_url, rich=has_rich())
    return EXIT_OK


async def fetch_accounts(source: UseapiAccountSource) -> ParsedAccounts:
    """One fetch, closing the source's HTTP client afterwards."""
    async with source:
        return await source.fetch()


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _rows(parsed: ParsedAccounts) -> list[dict[str, Any]]:
    """One row per channel, sorted; the credential is never read, only masked."""
    return [
        {
            "channel": account.channel,
            "server": account.server,
            "max_jobs": account.max_jobs,
            "discord": MASK,
        }
        for account in sorted(parsed.accounts.values(), key=lambda a: a.channel)
    ]


def print_json(parsed: ParsedAccounts, schema: str) -> None:
    """The map as JSON on stdout, for scripts: channels, capacity, rejected entries."""
    payload = {
        "schema": schema,
        "channels": _rows(parsed),
        "capacity": sum(a.max_jobs for a in parsed.accounts.values()),
        "rejected": [{"key": r.key, "reason": r.reason} for r in parsed.rejected],
    }
    _out(json.dumps(payload, indent=2))


def print_table(parsed: ParsedAccounts, schema: str, base_url: str, *, rich: bool) -> None:
    """The map as a table on stdout (rich's, or plain text), then its rejected entries."""
    rows = _rows(parsed)
    key = "channel" if schema == "v1" else "email"
    secret = "discord token" if schema == "v1" else "jwt token"
    capacity = sum(row["max_jobs"] for row in rows)
    footer = f"{len(rows)} channel(s), total capacity {capacity} (maxJobs summed) at {base_url}"
    if rich:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"useapi accounts ({schema})", title_justify="left")
        for header in (key, "server", "maxJobs", secret):
            table.add_column(header, justify="right" if header == "maxJobs" else "left")
        for row in rows:
            table.add_row(row["channel"], row["server"] or "-", str(row["max_jobs"]), MASK)
        console = Console(highlight=False)
        console.print(table)
        console.print(footer)
    else:
        width = max([len(key), *(len(row["channel"]) for row in rows)])
        _out(f"{key:<{width}}  {'server':<20}  {'maxJobs':>7}  {secret}")
        for row in rows:
            server = row["server"] or "-"
            _out(f"{row['channel']:<{width}}  {server:<20}  {row['max_jobs']:>7}  {MASK}")
        _out(footer)
    for rejected in parsed.rejected:
        _out(f"rejected entry {rejected.key!r}: {rejected.reason}")
