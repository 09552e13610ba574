"""
Indexes of free capacity that pick a channel in O(1).

A balancer with 100,000 channels must not scan them to take one slot. Each
index below keeps exactly the candidates of its selection rule in a list that
supports O(1) insert, O(1) removal (swap with the last element) and O(1)
uniform choice:

* :class:`ChannelIndex` holds each channel with at least one free slot once.
  A uniform pick is the ``"random"`` rule (useapi's own balancer); two uniform
  picks compared by load are ``"p2c"``.
* :class:`SlotIndex` holds one token per free slot, so a uniform pick among
  tokens chooses a channel with probability proportional to its free slots:
  the ``"weighted"`` rule. A channel's update costs O(its max_jobs).

Both are driven by :meth:`FreeIndex.update` with the channel's new free count,
called by the memory backend whenever ``in_flight``, ``max_jobs`` or the
channel's state changes.
"""

from __future__ import annotations

import random
from typing import Protocol

__all__ = ["ChannelIndex", "FreeIndex", "Loaded", "SlotIndex", "make_index"]


class Loaded(Protocol):
    """
    What an index needs of a channel: its load, and two slots the index owns
    (keeping positions on the item spares a hash lookup per operation, which
    matters once 100,000 channels no longer fit in the CPU cache).
    """

    in_flight: int
    max_jobs: int
    #: position in a ChannelIndex, -1 when absent
    index_pos: int
    #: positions of its tokens in a SlotIndex, ``None`` when absent
    index_slots: list[int] | None


class FreeIndex(Protocol):
    """Candidates of one selection rule."""

    def update(self, item: Loaded, free: int) -> None:
        """Record that ``item`` now has ``free`` free slots (0 removes it)."""
        ...

    def pick(self, rng: random.Random) -> Loaded | None:
        """Choose a candidate, or ``None`` when there is none."""
        ...

    def __len__(self) -> int: ...


class ChannelIndex:
    """Channels with a free slot, each once; uniform or power-of-two choice."""

    # Invariants: ``item.index_pos == i`` iff ``_items[i] is item``, else -1;
    # an item is present iff its last update had ``free > 0``.

    __slots__ = ("_items", "_p2c")

    def __init__(self, *, p2c: bool = False) -> None:
        self._items: list[Loaded] = []
        self._p2c = p2c

    def __len__(self) -> int:
        return len(self._items)

    def update(self, item: Loaded, free: int) -> None:
        pos = item.index_pos
        if free > 0:
            if pos < 0:
                item.index_pos = len(self._items)
                self._items.append(item)
        elif pos >= 0:
            item.index_pos = -1
            last = self._items.pop()
            if last is not item:
                self._items[pos] = last
                last.index_pos = pos

    def pick(self, rng: random.Random) -> Loaded | None:
        items = self._items
        n = len(items)
        if n == 0:
            return None
        # NOTE: int(random() * n) is several times cheaper than randrange(n)
        # and as uniform for any n this index can hold.
        first = items[int(rng.random() * n)]
        if not self._p2c or n == 1:
            return first
        second = items[int(rng.random() * n)]
        # Compare in_flight/max_jobs without division: a/b < c/d  <=>  a*d < c*b.
        if second.in_flight * first.max_jobs < first.in_flight * second.max_jobs:
            return second
        return first


class SlotIndex:
    """One token per free slot; a uniform token pick is weighted by free slots."""

    # Invariants: ``_tokens`` holds item ``x`` exactly ``free(x)`` times and
    # ``x.index_slots`` lists the positions of those tokens (``None``: none).

    __slots__ = ("_tokens",)

    def __init__(self) -> None:
        self._tokens: list[Loaded] = []

    def __len__(self) -> int:
        return len(self._tokens)

    def update(self, item: Loaded, free: int) -> None:
        where = item.index_slots
        have = 0 if where is None else len(where)
        if free > have:
            if where is None:
                where = item.index_slots = []
            for _ in range(free - have):
                where.append(len(self._tokens))
                self._tokens.append(item)
        elif free < have:
            assert where is not None
            for _ in range(have - free):
                self._remove_token(where.pop())
            if not where:
                item.index_slots = None

    def _remove_token(self, pos: int) -> None:
        last_pos = len(self._tokens) - 1
        last = self._tokens.pop()
        if pos != last_pos:
            self._tokens[pos] = last
            moved = last.index_slots
            assert moved is not None
            moved[moved.index(last_pos)] = pos

    def pick(self, rng: random.Random) -> Loaded | None:
        tokens = self._tokens
        if not tokens:
            return None
        return tokens[int(rng.random() * len(tokens))]


def make_index(selection: str) -> FreeIndex:
    """Return the index that implements ``selection``."""
    if selection == "weighted":
        return SlotIndex()
    return ChannelIndex(p2c=selection == "p2c")
