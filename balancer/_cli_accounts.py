"""``balancer accounts``: fetch the account map and print it, credentials masked."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

from .accounts import MASK

if TYPE_CHECKING:
    from .accounts import ParsedAccounts
    from .sources import UseapiAccountSource

__all__ = ["fetch_accounts", "print_json", "print_table"]


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
