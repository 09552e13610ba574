"""
PNG plots of the sweeps, when matplotlib (the ``bench`` extra) is installed.

Every series in :attr:`Report.series <benchmarks.report.Report.series>` is
named ``"<figure>/<panel>"`` (e.g. ``"channels/asyncio"``); each figure becomes
one PNG with one panel per event loop, log-log axes, one line per
implementation. The y values are already ratios to a floor measured in the
same run, never absolute times.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

__all__ = ["available", "render"]


def available() -> str | None:
    """``None`` when plots can be drawn, else why not."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]'): plots skipped"
    return None


#: First match wins: (substring of the label, style).
_STYLES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("py-redis-semaphore", {"color": "tab:purple", "marker": "D"}),
    ("naive", {"color": "tab:red", "marker": "s"}),
    ("CapacityLimiter", {"color": "tab:green", "marker": "^"}),
    ("floor", {"color": "tab:gray", "marker": "v", "linestyle": "--"}),
    ("Semaphore", {"color": "tab:gray", "marker": "v", "linestyle": "--"}),
    ("balancer", {"color": "tab:blue", "marker": "o", "linewidth": 2.2}),
)


def _style(label: str) -> dict[str, Any]:
    for part, style in _STYLES:
        if part in label:
            return style
    return {"marker": "x"}


def render(series: dict[str, Any], out: Path) -> list[str]:
    """Draw every figure; return the file names written into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures: dict[str, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
    for name, data in series.items():
        figure, _, panel = name.partition("/")
        figures[figure].append((panel, data))
    written: list[str] = []
    for figure, panels in figures.items():
        fig, axes = plt.subplots(
            1, len(panels), figsize=(6.4 * len(panels), 4.8), squeeze=False, sharey=True
        )
        for ax, (_panel, data) in zip(axes[0], panels, strict=True):
            for label, ys in data["lines"].items():
                ax.plot(data["x"], ys, label=label, **_style(label))
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(data["xlabel"])
            ax.set_title(data["title"], fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        axes[0][0].set_ylabel(panels[0][1]["ylabel"], fontsize=9)
        fig.tight_layout()
        filename = f"{figure}.png"
        fig.savefig(out / filename, dpi=110)
        plt.close(fig)
        written.append(filename)
    return written
