from __future__ import annotations

import random

from balancer.scheduler.waiters import Waiter, WaitQueue


def assert_empty(queue: WaitQueue) -> None:
    """Nothing is left behind: no waiter, no empty per-channel queue."""
    assert len(queue) == 0
    assert list(queue) == []
    assert queue.pinned_channels() == []
    assert not queue.ahead_of(None)
    assert not queue.ahead_of("a")
    assert queue.oldest(False, set()) is None
    assert queue.oldest_for("a") is None


class TestWaitQueue:
    def test_push_assigns_increasing_sequence(self):
        """Each waiter gets a larger sequence number than the one before, across queues."""
        queue = WaitQueue()
        waiters = [queue.push(channel) for channel in (None, "a", None, "b", "a")]
        assert [w.seq for w in waiters] == sorted(w.seq for w in waiters)
        assert len({w.seq for w in waiters}) == 5
        assert len(queue) == 5
        assert all(not w.done and w.lease is None and w.error is None for w in waiters)

    def test_oldest_is_fifo_across_pinned_and_unpinned(self):
        """Popping the oldest repeatedly yields arrival order whatever the pins."""
        queue = WaitQueue()
        rng = random.Random(3)
        pushed = [queue.push(rng.choice([None, "a", "b", "c"])) for _ in range(40)]
        served: list[Waiter] = []
        while (waiter := queue.oldest(False, set())) is not None:
            served.append(waiter)
            queue.remove(waiter)
        assert served == pushed
        assert_empty(queue)

    def test_oldest_for_picks_oldest_usable(self):
        """oldest_for(channel) is the oldest waiter that is unpinned or pinned to that channel."""
        queue = WaitQueue()
        pinned_b = queue.push("b")
        unpinned = queue.push(None)
        pinned_a = queue.push("a")
        assert queue.oldest_for("a") is unpinned
        assert queue.oldest_for("b") is pinned_b
        assert queue.oldest_for("zzz") is unpinned
        queue.remove(unpinned)
        assert queue.oldest_for("a") is pinned_a
        assert queue.oldest_for("zzz") is None

    def test_oldest_for_prefers_older_pinned(self):
        """A pinned waiter older than every unpinned one is chosen for its channel."""
        queue = WaitQueue()
        pinned = queue.push("a")
        queue.push(None)
        assert queue.oldest_for("a") is pinned

    def test_oldest_with_skips(self):
        """oldest() honours skip_unpinned and the set of skipped channels."""
        queue = WaitQueue()
        a1 = queue.push("a")
        u1 = queue.push(None)
        b1 = queue.push("b")
        a2 = queue.push("a")
        assert queue.oldest(False, set()) is a1
        assert queue.oldest(False, {"a"}) is u1
        assert queue.oldest(True, {"a"}) is b1
        assert queue.oldest(True, {"a", "b"}) is None
        assert queue.oldest(True, set()) is a1
        queue.remove(a1)
        assert queue.oldest(True, {"b"}) is a2

    def test_remove_is_idempotent(self):
        """Removing a waiter twice marks it done once and keeps the count right."""
        queue = WaitQueue()
        first = queue.push("a")
        second = queue.push(None)
        queue.remove(first)
        queue.remove(first)
        assert first.done
        assert len(queue) == 1
        assert list(queue) == [second]
        queue.remove(second)
        queue.remove(second)
        assert_empty(queue)

    def test_remove_leaves_no_empty_pinned_queue(self):
        """Removing the last waiter pinned to a channel drops that channel's queue."""
        queue = WaitQueue()
        waiters = [queue.push("a"), queue.push("a"), queue.push("b")]
        queue.remove(waiters[0])
        assert sorted(queue.pinned_channels()) == ["a", "b"]
        queue.remove(waiters[1])
        assert queue.pinned_channels() == ["b"]
        assert queue.pinned_to("a") == []
        queue.remove(waiters[2])
        assert_empty(queue)

    def test_ahead_of(self):
        """A newcomer is behind any unpinned waiter, and behind waiters pinned to its channel."""
        queue = WaitQueue()
        assert not queue.ahead_of(None)
        pinned = queue.push("a")
        assert queue.ahead_of("a")
        assert not queue.ahead_of("b")
        assert not queue.ahead_of(None)
        unpinned = queue.push(None)
        assert queue.ahead_of("b")
        assert queue.ahead_of(None)
        queue.remove(unpinned)
        queue.remove(pinned)
        assert_empty(queue)

    def test_pinned_to_in_arrival_order(self):
        """pinned_to lists a channel's waiters oldest first, and is a copy."""
        queue = WaitQueue()
        a1, _, a2 = queue.push("a"), queue.push(None), queue.push("a")
        listed = queue.pinned_to("a")
        assert listed == [a1, a2]
        listed.clear()
        assert queue.pinned_to("a") == [a1, a2]

    def test_iteration_survives_removal(self):
        """Iterating while removing each waiter visits every waiter once and empties the queue."""
        queue = WaitQueue()
        pushed = {queue.push(c) for c in (None, "a", None, "b", "a")}
        seen = set()
        for waiter in queue:
            seen.add(waiter)
            queue.remove(waiter)
        assert seen == pushed
        assert_empty(queue)

    def test_random_operations_match_model(self):
        """A seeded random mix of pushes and removals always agrees with a simple list model."""
        rng = random.Random(11)
        queue = WaitQueue()
        model: list[Waiter] = []
        channels = [None, "a", "b", "c"]
        for _ in range(2_000):
            if model and rng.random() < 0.45:
                victim = model.pop(rng.randrange(len(model)))
                queue.remove(victim)
            else:
                model.append(queue.push(rng.choice(channels)))
            assert len(queue) == len(model)
            for channel in ("a", "b", "c"):
                usable = [w for w in model if w.channel in (None, channel)]
                assert queue.oldest_for(channel) is (usable[0] if usable else None)
            assert queue.oldest(False, set()) is (model[0] if model else None)
            skip = {"a"}
            rest = [w for w in model if w.channel is not None and w.channel not in skip]
            assert queue.oldest(True, skip) is (rest[0] if rest else None)
        for waiter in model:
            queue.remove(waiter)
        assert_empty(queue)
