"""
How ``balancer demo`` draws itself: a live per-channel view with rich, or plain
lines for logs and CI, and the closing report in either form.

rich is imported only inside the ``rich_*`` functions, so this module (and the
plain output) works without the ``cli`` extra.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Self

from .model import ChannelRow, RunResult, Snapshot, percentile

if TYPE_CHECKING:
    from rich.console import RenderableType

__all__ = [
    "Presenter",
    "plain_report",
    "plain_status",
    "rich_live_view",
    "rich_report",
]

_STATE_STYLE = {"active": "green", "cooling": "cyan", "draining": "magenta", "removed": "dim"}


# -- plain -------------------------------------------------------------------


def plain_status(snap: Snapshot) -> str:
    """One status line: totals, then each channel's in-flight/maxJobs (c: cooling)."""
    rate = snap.done / snap.elapsed if snap.elapsed > 0 else 0.0
    channels = " ".join(
        f"{row.channel}={row.in_flight}/{row.max_jobs}{'c' if row.state == 'cooling' else ''}"
        for row in snap.rows
    )
    return (
        f"[{snap.elapsed:5.1f}s] done={snap.done} rate={rate:.1f}/s "
        f"in_flight={snap.in_flight}/{snap.capacity} waiting={snap.waiting} | {channels}"
    )


def _summary(result: RunResult) -> list[str]:
    snap = result.final
    ok = sum(row.ok for row in snap.rows)
    failed = sum(row.failed for row in snap.rows)
    throttled = sum(row.throttled for row in snap.rows)
    rate = snap.done / result.elapsed if result.elapsed > 0 else 0.0
    waits = result.waits
    seed = "random" if result.seed is None else str(result.seed)
    p50, p90, p99 = (percentile(waits, q) for q in (50, 90, 99))
    drain = max(0.0, result.elapsed - snap.duration)
    return [
        (
            f"setup:      {len(snap.rows)} channels (capacity {snap.capacity}), "
            f"{snap.workers} workers, seed {seed}"
        ),
        f"backend:    {result.mode}",
        f"run:        {snap.duration:g} s of new jobs + {drain:.1f} s to finish those in flight",
        (
            f"jobs done:  {snap.done} ({ok} ok, {failed} failed, {throttled} answered 429, "
            "each cooling its channel)"
        ),
        f"throughput: {rate:.1f} jobs/s ({rate / max(snap.capacity, 1):.2f} per slot)",
        (
            f"wait for a slot: p50 {p50:.3f} s, p90 {p90:.3f} s, p99 {p99:.3f} s, "
            f"max {max(waits, default=0.0):.3f} s; {snap.timeouts} timeouts"
        ),
    ]


def _share(row: ChannelRow, total: int) -> float:
    return 100 * row.done / total if total else 0.0


def _verdict(result: RunResult) -> tuple[bool, str]:
    bad = result.violations
    where = "fleet-wide, in Redis" if result.final.processes > 1 else "by the jobs themselves"
    if bad:
        worst = ", ".join(f"{row.channel} peak {row.peak} > maxJobs {row.max_jobs}" for row in bad)
        return False, f"LIMIT EXCEEDED: {worst}"
    if result.leaked:
        return False, f"{result.leaked} slot(s) still held after every job ended"
    return True, (
        "limits held: no channel ever ran more jobs than its maxJobs\n"
        f"  (peak counted {where}, not by the balancer); no slot leaked"
    )


def plain_report(result: RunResult) -> str:
    """The closing report as plain text."""
    snap = result.final
    lines = ["", "== balancer demo: report ==", *_summary(result), ""]
    lines.append(f"{'channel':<12} {'maxJobs':>7} {'peak':>5} {'held':>5} {'jobs':>6} {'share':>6}")
    for row in snap.rows:
        held = "yes" if row.peak <= row.max_jobs else "NO"
        lines.append(
            f"{row.channel:<12} {row.max_jobs:>7} {row.peak:>5} {held:>5} {row.done:>6} "
            f"{_share(row, snap.done):>5.1f}%"
        )
    ok, verdict = _verdict(result)
    lines += ["", ("OK: " if ok else "FAIL: ") + verdict]
    return "\n".join(lines)


# -- rich --------------------------------------------------------------------


def _slots(row: ChannelRow) -> RenderableType:
    from rich.text import Text

    cooling = row.state != "active"
    full = row.in_flight >= row.max_jobs
    used_style = "dim cyan" if cooling else ("yellow" if full else "green")
    text = Text()
    text.append("██" * min(row.in_flight, row.max_jobs), style=used_style)
    text.append("██" * max(0, row.in_flight - row.max_jobs), style="bold red")
    text.append("░░" * max(0, row.max_jobs - row.in_flight), style="grey50")
    text.append(f" {row.in_flight}/{row.max_jobs}")
    return text


def rich_live_view(snap: Snapshot, title: str) -> RenderableType:
    """The live per-channel view: a bar of slots per channel, and totals."""
    max_jobs = max((row.max_jobs for row in snap.rows), default=1)
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, title_justify="left", expand=False)
    table.add_column("channel")
    table.add_column("in flight", min_width=2 * max_jobs + 6)
    table.add_column("peak", justify="right")
    table.add_column("pinned", justify="right")
    table.add_column("done", justify="right")
    table.add_column("failed", justify="right")
    table.add_column("429", justify="right")
    table.add_column("state", min_width=8)
    for row in snap.rows:
        peak_style = "bold red" if row.peak > row.max_jobs else ""
        table.add_row(
            row.channel,
            _slots(row),
            Text(str(row.peak), style=peak_style),
            str(row.waiting),
            str(row.done),
            str(row.failed),
            str(row.throttled),
            Text(row.state, style=_STATE_STYLE.get(row.state, "")),
        )
    rate = snap.done / snap.elapsed if snap.elapsed > 0 else 0.0
    pinned = sum(row.waiting for row in snap.rows)
    progress = min(1.0, snap.elapsed / snap.duration) if snap.duration else 1.0
    bar = "━" * round(16 * progress) + "╺" + "━" * (16 - round(16 * progress))
    footer = Text.assemble(
        (f"{bar[:17]} ", "magenta"),
        f"{snap.elapsed:4.1f}/{snap.duration:g} s  ",
        ("done ", "dim"),
        f"{snap.done}  ",
        ("rate ", "dim"),
        f"{rate:.1f}/s  ",
        ("in flight ", "dim"),
        f"{snap.in_flight}/{snap.capacity}  ",
        ("waiting ", "dim"),
        f"{snap.waiting} ({pinned} pinned)",
    )
    return Group(table, footer)


def rich_report(result: RunResult) -> RenderableType:
    """The closing report, as rich renderables."""
    from rich.console import Group
    from rich.rule import Rule
    from rich.table import Table
    from rich.text import Text

    snap = result.final
    table = Table(expand=False, pad_edge=False, show_edge=False, box=None, padding=(0, 2))
    table.add_column("channel")
    table.add_column("maxJobs", justify="right")
    table.add_column("peak in flight", justify="right")
    table.add_column("held", justify="center")
    table.add_column("jobs", justify="right")
    table.add_column("share", justify="right")
    table.add_column("")
    for row in snap.rows:
        held = row.peak <= row.max_jobs
        share = _share(row, snap.done)
        table.add_row(
            row.channel,
            str(row.max_jobs),
            Text(str(row.peak), style="" if held else "bold red"),
            Text("✓", style="green") if held else Text("✗", style="bold red"),
            str(row.done),
            f"{share:.1f}%",
            Text("▇" * round(share / 2), style="blue"),
        )
    ok, verdict = _verdict(result)
    mark = Text("✓ ", style="bold green") if ok else Text("✗ ", style="bold red")
    summary = [Text(line) for line in _summary(result)]
    return Group(
        Rule("balancer demo · report", align="left"),
        *summary,
        Text(),
        table,
        Text(),
        Text.assemble(mark, (verdict, "green" if ok else "bold red")),
    )


# -- output ------------------------------------------------------------------


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


class Presenter:
    """
    Shows snapshots as they come and the report at the end: a rich live view
    that refreshes in place, or (``live=False``, or rich missing) a plain status
    line every ``plain_every`` seconds.
    """

    def __init__(self, *, live: bool, title: str, plain_every: float = 1.0) -> None:
        self.title = title
        self._plain_every = plain_every
        self._next_plain = 0.0
        self._live: Any = None
        self._console: Any = None
        if live:
            from rich.console import Console
            from rich.live import Live

            self._console = Console()
            self._live = Live(
                console=self._console, auto_refresh=False, transient=False, redirect_stderr=True
            )

    def __enter__(self) -> Self:
        if self._live is not None:
            self._live.start()
        else:
            _out(self.title)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._live is not None:
            self._live.stop()

    def update(self, snap: Snapshot, *, final: bool = False) -> None:
        if self._live is not None:
            self._live.update(rich_live_view(snap, self.title), refresh=True)
        elif final or snap.elapsed >= self._next_plain:
            self._next_plain = snap.elapsed + self._plain_every
            _out(plain_status(snap))

    def report(self, result: RunResult) -> None:
        if self._live is not None:
            self._live.stop()  # the last frame stays; the report goes below it
        if self._console is not None:
            self._console.print()
            self._console.print(rich_report(result))
        else:
            _out(plain_report(result))
