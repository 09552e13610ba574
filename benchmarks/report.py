"""
Results: the rows of the table, the series behind the plots, and their markdown.

A *target* row compares a measured ratio (or, for memory, bytes) with the
limit issue 5 sets and says PASS or MISS; an *info* row is context (the
physical floor, the naive balancer, the other event loop). A row that could
not be measured (no Redis backend yet, no redis-server) says ``n/a`` and why.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .harness import Ratio

__all__ = ["Report", "Row"]


@dataclass
class Row:
    """One line of the results table."""

    scenario: str
    loop: str
    target: str
    measured: str
    spread: str
    status: str  # "PASS" | "MISS" | "info" | "n/a"
    note: str = ""
    value: float | None = None
    limit: float | None = None
    section: str = "memory backend"


@dataclass
class Report:
    """Everything one run of the suite measured."""

    rows: list[Row] = field(default_factory=list)
    #: plot data: name -> {"x": [...], "lines": {label: [y, ...]}, ...}
    series: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    # -- adding rows ---------------------------------------------------------

    def target(
        self,
        scenario: str,
        loop: str,
        ratio: Ratio | None,
        limit: float,
        *,
        ok: bool = True,
        note: str = "",
        section: str = "memory backend",
    ) -> Row:
        """A ratio against its limit; ``ok=False`` fails it whatever the ratio (starvation)."""
        if ratio is None:
            return self.unavailable(scenario, loop, f"≤ {limit:g}×", note, section=section)
        passed = ok and ratio.median <= limit
        row = Row(
            scenario,
            loop,
            f"≤ {limit:g}×",
            str(ratio),
            ratio.spread,
            "PASS" if passed else "MISS",
            note,
            ratio.median,
            limit,
            section,
        )
        self.rows.append(row)
        return row

    def target_bytes(
        self, scenario: str, loop: str, value: float, limit: float, *, note: str = ""
    ) -> Row:
        row = Row(
            scenario,
            loop,
            f"≤ {_bytes(limit)}",
            _bytes(value),
            "",
            "PASS" if value <= limit else "MISS",
            note,
            value,
            limit,
        )
        self.rows.append(row)
        return row

    def info(
        self,
        scenario: str,
        loop: str,
        ratio: Ratio | None = None,
        *,
        measured: str | None = None,
        note: str = "",
        section: str = "memory backend",
    ) -> Row:
        row = Row(
            scenario,
            loop,
            "info",
            measured if measured is not None else (str(ratio) if ratio else "–"),
            ratio.spread if ratio is not None and measured is None else "",
            "info",
            note,
            ratio.median if ratio is not None else None,
            None,
            section,
        )
        self.rows.append(row)
        return row

    def unavailable(
        self, scenario: str, loop: str, target: str, reason: str, *, section: str = "redis"
    ) -> Row:
        row = Row(scenario, loop, target, "not available", "", "n/a", reason, section=section)
        self.rows.append(row)
        return row

    # -- output --------------------------------------------------------------

    def markdown(self, *, targets_only: bool = False) -> str:
        rows = [r for r in self.rows if not targets_only or r.target != "info"]
        lines = [
            "| scenario | loop | target | measured | IQR over rounds | status | notes |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        section = None
        for row in rows:
            if row.section != section:
                section = row.section
                lines.append(f"| **{section}** | | | | | | |")
            lines.append(
                f"| {row.scenario} | {row.loop} | {row.target} | {row.measured} "
                f"| {row.spread} | {_status(row.status)} | {row.note} |"
            )
        return "\n".join(lines)

    def summary(self) -> str:
        passed = sum(r.status == "PASS" for r in self.rows)
        missed = [r for r in self.rows if r.status == "MISS"]
        unavailable = sum(r.status == "n/a" for r in self.rows)
        text = f"{passed} PASS, {len(missed)} MISS, {unavailable} not available"
        if missed:
            text += " — missed: " + "; ".join(f"{r.scenario} ({r.loop})" for r in missed)
        return text

    def write(self, out: Path, *, plots: list[str], plot_note: str) -> None:
        out.mkdir(parents=True, exist_ok=True)
        parts = [
            "# balancer benchmarks",
            "",
            _describe_run(self.meta),
            "",
            (
                "Every figure is a ratio to a baseline measured in the same process run "
                "(interleaved rounds, median of per-round ratios; the IQR column is the "
                "interquartile range of those ratios), except memory, which is bytes "
                "(tracemalloc)."
            ),
            "",
            "## Targets (issue 5)",
            "",
            self.markdown(targets_only=True),
            "",
            f"**{self.summary()}**",
            "",
            "## Every row",
            "",
            self.markdown(),
            "",
        ]
        if plots:
            parts += ["## Plots", ""]
            parts += [f"![{name}]({name})" for name in plots]
            parts.append("")
        else:
            parts += [plot_note, ""]
        (out / "results.md").write_text("\n".join(parts))
        data = {
            "meta": self.meta,
            "rows": [asdict(row) for row in self.rows],
            "series": self.series,
        }
        (out / "results.json").write_text(json.dumps(data, indent=2, default=str))


def machine_meta() -> dict[str, Any]:
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "code": _code_version(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_at_start": load,
    }


def _code_version() -> str | None:
    """``<commit>`` of the measured code, ``+ uncommitted changes`` when balancer/ is dirty."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "balancer"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + (" + uncommitted changes in balancer/" if dirty else "")


def _describe_run(meta: dict[str, Any]) -> str:
    bits = [f"Python {meta.get('python')}", f"{meta.get('cpus')} CPUs"]
    if meta.get("code"):
        bits.insert(0, f"code {meta['code']}")
    if meta.get("load_at_start"):
        bits.append("load average at start " + "/".join(f"{x:.2f}" for x in meta["load_at_start"]))
    if meta.get("mode"):
        bits.append(f"mode: {meta['mode']}")
    if meta.get("duration_s") is not None:
        bits.append(f"run took {meta['duration_s']:.0f} s")
    if meta.get("when"):
        bits.append(str(meta["when"]))
    return "Run: " + ", ".join(bits) + "."


def _status(status: str) -> str:
    return {"PASS": "✅ PASS", "MISS": "❌ MISS"}.get(status, status)


def _bytes(value: float) -> str:
    if value >= 1024:
        return f"{value / 1024:.2f} KiB"
    return f"{value:.0f} B"
