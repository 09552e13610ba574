"""
A ``/metrics`` endpoint: the balancer's statistics as Prometheus metrics.

Needs the prometheus extra (``pip install 'balancer[prometheus]'``). Serves
``/metrics`` on a loopback port, runs a few jobs, scrapes itself once, prints
the ``balancer_`` lines and exits. Runs against a fake useapi server unless
USEAPI_BASE_URL and USEAPI_TOKEN are set::

    python examples/metrics_endpoint.py
"""

from __future__ import annotations

import logging
import os
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import structlog
from prometheus_client import CollectorRegistry, start_http_server

from balancer import SyncBalancer, UseapiAccountSource
from balancer.metrics import BalancerCollector
from balancer.testing import FakeUseapi, make_accounts


@contextmanager
def account_source() -> Iterator[UseapiAccountSource]:
    """Your useapi endpoint when USEAPI_BASE_URL and USEAPI_TOKEN are set, else a fake one."""
    base_url, token = os.environ.get("USEAPI_BASE_URL"), os.environ.get("USEAPI_TOKEN")
    if base_url and token:
        yield UseapiAccountSource(token, base_url=base_url)
        return
    with FakeUseapi(make_accounts(2, max_jobs=[1, 3])) as fake:
        yield fake.source()


def main() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with account_source() as source, SyncBalancer(source, cooldown=5) as lb:
        # In production: REGISTRY.register(...) and start_http_server(9100).
        registry = CollectorRegistry()
        registry.register(BalancerCollector(lb))
        server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
        try:
            held = lb.acquire(timeout=5)  # one job still running at scrape time
            with lb.acquire(timeout=5) as lease:
                time.sleep(0.01)
                lease.outcome = "throttled"  # a 429: that channel cools down
            url = f"http://127.0.0.1:{server.server_port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as response:
                text = response.read().decode()
            lb.release(held)
        finally:
            server.shutdown()
            server.server_close()
            thread.join(5)
    print(f"scraped {url}:")
    for line in text.splitlines():
        if line.startswith("balancer_"):
            print(" ", line)


if __name__ == "__main__":
    main()
