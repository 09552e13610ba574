"""
Who gets a slot and when: the waiters, the grants and the release path.

:mod:`.base` is the interface the balancer drives; :mod:`.immediate` serves a
backend that never suspends (memory) with an in-place hand-off, :mod:`.remote`
a backend reached by round trips (Redis) with one dispatcher; :mod:`.waiters`
is the FIFO queue both use.
"""
