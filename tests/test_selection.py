from __future__ import annotations

import random
import time
from collections import Counter

import pytest

from balancer.selection import ChannelIndex, FreeIndex, SlotIndex, make_index


class Chan:
    """A stand-in for the memory backend's channel: an identity and its load."""

    def __init__(self, name: str, max_jobs: int = 4, in_flight: int = 0) -> None:
        self.name = name
        self.max_jobs = max_jobs
        self.in_flight = in_flight
        self.index_pos = -1
        self.index_slots: list[int] | None = None

    def __repr__(self) -> str:
        return f"Chan({self.name!r}, {self.in_flight}/{self.max_jobs})"


def chi_square(counts: Counter[str], expected: dict[str, float]) -> float:
    return sum((counts[key] - e) ** 2 / e for key, e in expected.items())


def picks(index: FreeIndex, rng: random.Random, n: int) -> Counter[str]:
    counts: Counter[str] = Counter()
    for _ in range(n):
        item = index.pick(rng)
        assert isinstance(item, Chan)
        counts[item.name] += 1
    return counts


def assert_channel_index_consistent(index: ChannelIndex, expected: set[int]) -> None:
    """The index holds exactly the expected channels, each once."""
    items = index._items
    assert len(index) == len(items) == len(expected)
    assert Counter(id(item) for item in items) == dict.fromkeys(expected, 1)


def assert_slot_index_consistent(index: SlotIndex, free: dict[int, int]) -> None:
    """The index holds exactly one token per free slot."""
    tokens = index._tokens
    assert len(index) == len(tokens) == sum(free.values())
    counts = Counter(id(item) for item in tokens)
    assert dict(counts) == {key: n for key, n in free.items() if n > 0}


class TestChannelIndex:
    def test_empty_picks_none(self):
        """An empty index picks nothing."""
        assert ChannelIndex().pick(random.Random(0)) is None
        assert len(ChannelIndex(p2c=True)) == 0

    def test_update_positive_adds_once(self):
        """A channel with free slots is held exactly once however often it is updated."""
        index = ChannelIndex()
        a = Chan("a")
        for free in (1, 3, 2, 4):
            index.update(a, free)
        assert len(index) == 1
        assert index.pick(random.Random(0)) is a

    def test_update_zero_removes_and_is_idempotent(self):
        """Updating to zero free slots removes the channel; doing it again changes nothing."""
        index = ChannelIndex()
        a, b = Chan("a"), Chan("b")
        index.update(a, 1)
        index.update(b, 1)
        index.update(a, 0)
        index.update(a, 0)
        index.update(Chan("never-added"), 0)
        assert_channel_index_consistent(index, {id(b)})
        rng = random.Random(1)
        assert all(index.pick(rng) is b for _ in range(50))

    def test_remove_middle_keeps_positions(self):
        """Removing any element (first, middle, last) keeps the position map exact."""
        items = [Chan(str(i)) for i in range(6)]
        index = ChannelIndex()
        for item in items:
            index.update(item, 1)
        present = {id(item) for item in items}
        for victim in (items[2], items[0], items[5], items[3]):
            index.update(victim, 0)
            present.discard(id(victim))
            assert_channel_index_consistent(index, present)

    def test_pick_only_returns_present_channels(self):
        """A pick never returns a channel whose last update had no free slot."""
        rng = random.Random(2)
        items = [Chan(str(i)) for i in range(20)]
        index = ChannelIndex()
        for item in items:
            index.update(item, rng.randrange(0, 3))
        present = {id(item) for item in index._items}
        for _ in range(500):
            picked = index.pick(rng)
            assert picked is not None and id(picked) in present

    def test_random_pick_is_uniform(self):
        """Uniform choice among present channels, whatever their free counts."""
        rng = random.Random(12345)
        index = ChannelIndex()
        items = [Chan(f"c{i}") for i in range(10)]
        for i, item in enumerate(items):
            index.update(item, i + 1)  # free counts differ; the pick must not care
        n = 20_000
        counts = picks(index, rng, n)
        expected = {item.name: n / len(items) for item in items}
        # 9 degrees of freedom: P(chi2 > 40) is about 5e-6.
        assert chi_square(counts, expected) < 40

    def test_same_seed_same_sequence(self):
        """Two pick sequences with the same seed are identical."""
        items = [Chan(f"c{i}") for i in range(7)]
        index = ChannelIndex()
        for item in items:
            index.update(item, 1)
        rng_a, rng_b = random.Random(99), random.Random(99)
        seq_a = [index.pick(rng_a) for _ in range(200)]
        seq_b = [index.pick(rng_b) for _ in range(200)]
        assert seq_a == seq_b
        assert len({id(item) for item in seq_a}) == len(items)

    def test_p2c_prefers_less_loaded(self):
        """With two candidates, p2c picks the less loaded about three times in four."""
        light = Chan("light", max_jobs=4, in_flight=0)
        heavy = Chan("heavy", max_jobs=4, in_flight=3)
        index = ChannelIndex(p2c=True)
        index.update(heavy, 1)
        index.update(light, 4)
        counts = picks(index, random.Random(7), 8_000)
        # Sampling with replacement: P(light) = 1 - (1/2)^2 = 0.75; random would give 0.5.
        assert 0.70 < counts["light"] / 8_000 < 0.80

    def test_p2c_compares_relative_load(self):
        """p2c compares in_flight / max_jobs, not raw in_flight."""
        big = Chan("big", max_jobs=10, in_flight=4)  # 40 % loaded
        small = Chan("small", max_jobs=2, in_flight=1)  # 50 % loaded
        index = ChannelIndex(p2c=True)
        index.update(big, 6)
        index.update(small, 1)
        counts = picks(index, random.Random(8), 8_000)
        assert counts["big"] > counts["small"] * 2

    def test_p2c_single_candidate(self):
        """p2c with one candidate returns it."""
        index = ChannelIndex(p2c=True)
        only = Chan("only", in_flight=3)
        index.update(only, 1)
        assert index.pick(random.Random(0)) is only

    def test_many_updates_keep_invariants(self):
        """100,000 random updates over 10,000 channels leave the index exact, quickly."""
        rng = random.Random(2024)
        items = [Chan(str(i)) for i in range(10_000)]
        index = ChannelIndex()
        free: dict[int, int] = {}
        started = time.perf_counter()
        for _ in range(100_000):
            item = items[rng.randrange(len(items))]
            n = rng.choice((0, 0, 1, 2))
            index.update(item, n)
            free[id(item)] = n
        elapsed = time.perf_counter() - started
        assert_channel_index_consistent(index, {key for key, n in free.items() if n > 0})
        # O(1) per update: well under a second here; a scan per update would take minutes.
        assert elapsed < 10


class TestSlotIndex:
    def test_empty_picks_none(self):
        """An empty slot index picks nothing."""
        assert SlotIndex().pick(random.Random(0)) is None

    def test_tokens_track_free_counts(self):
        """The index holds one token per free slot through raises and drops."""
        index = SlotIndex()
        a, b = Chan("a"), Chan("b")
        free = {id(a): 0, id(b): 0}
        for item, n in [(a, 3), (b, 2), (a, 1), (b, 5), (a, 0), (a, 4), (b, 0), (b, 0)]:
            index.update(item, n)
            free[id(item)] = n
            assert_slot_index_consistent(index, free)

    def test_weighted_pick_is_proportional(self):
        """A pick chooses a channel with probability proportional to its free slots."""
        rng = random.Random(4242)
        index = SlotIndex()
        weights = {"w1": 1, "w2": 2, "w3": 3, "w6": 6}
        for name, n in weights.items():
            index.update(Chan(name, max_jobs=10), n)
        n = 24_000
        counts = picks(index, rng, n)
        total = sum(weights.values())
        expected = {name: n * w / total for name, w in weights.items()}
        # 3 degrees of freedom: P(chi2 > 30) is about 1.4e-6.
        assert chi_square(counts, expected) < 30

    def test_many_updates_keep_invariants(self):
        """100,000 random updates over 2,000 channels leave the tokens exact."""
        rng = random.Random(77)
        items = [Chan(str(i), max_jobs=5) for i in range(2_000)]
        index = SlotIndex()
        free = {id(item): 0 for item in items}
        for _ in range(100_000):
            item = items[rng.randrange(len(items))]
            n = rng.randrange(0, 6)
            index.update(item, n)
            free[id(item)] = n
        assert_slot_index_consistent(index, free)


class TestMakeIndex:
    @pytest.mark.parametrize(
        ("selection", "kind", "p2c"),
        [
            ("random", ChannelIndex, False),
            ("p2c", ChannelIndex, True),
            ("weighted", SlotIndex, None),
        ],
    )
    def test_selection_maps_to_index(self, selection: str, kind: type, p2c: bool | None):
        """Each selection name builds the index that implements it."""
        index = make_index(selection)
        assert isinstance(index, kind)
        if p2c is not None:
            assert isinstance(index, ChannelIndex)
            assert index._p2c is p2c
