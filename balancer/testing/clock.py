"""A monotonic clock that moves only when a test moves it."""

from __future__ import annotations

__all__ = ["FakeClock"]


class FakeClock:
    """
    A stand-in for :func:`time.monotonic`: calling it returns :attr:`now`, which
    changes only through :meth:`advance` (or by setting :attr:`now`).

    It starts well above zero, so "now minus a cooldown" is never negative::

        clock = FakeClock()
        backend = MemoryBackend()
        backend._clock = clock        # the memory backend's cooldowns now use it
        ...
        clock.advance(30)             # 30 s later, instantly
    """

    __slots__ = ("now",)

    def __init__(self, now: float = 1000.0) -> None:
        self.now = float(now)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds`` (never back)."""
        if seconds < 0:
            raise ValueError(f"a monotonic clock does not go back ({seconds} s)")
        self.now += seconds

    def __repr__(self) -> str:
        return f"FakeClock(now={self.now!r})"
