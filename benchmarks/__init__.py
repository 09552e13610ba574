"""
Side-by-side benchmarks of ``balancer`` against the baselines users would
otherwise reach for (issue 5): ``asyncio.Semaphore``, ``anyio.CapacityLimiter``,
a naive dict-of-counters balancer, and on Redis a bare ``EVALSHA`` floor and
``py-redis-semaphore``.

Run ``python -m benchmarks`` (``--quick`` for a smoke run); see
``benchmarks/README.md``. Every figure is a ratio to a baseline measured in the
same process run, with interleaved rounds and medians, because the machines
these run on are shared and noisy.
"""
