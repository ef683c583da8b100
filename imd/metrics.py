"""Prometheus collectors, declared next to the code they count, served per daemon.

A module that counts something declares its collector at its top with ``counter`` or
``histogram``: the collector belongs to no registry (not prometheus_client's global one), and
each daemon's admin endpoint registers every declared collector in its own
``CollectorRegistry`` (``registry``), beside the gauges it computes at scrape time.
Counting costs one increment or observe; nothing is computed per message beyond that.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.registry import Collector

DECLARED: list[Collector] = []


def counter(name: str, documentation: str, labels: tuple[str, ...] = ()) -> Counter:
    c = Counter(name, documentation, labels, registry=None)
    DECLARED.append(c)
    return c


def histogram(name: str, documentation: str, labels: tuple[str, ...] = (),
              buckets: tuple[float, ...] = Histogram.DEFAULT_BUCKETS) -> Histogram:
    h = Histogram(name, documentation, labels, registry=None, buckets=buckets)
    DECLARED.append(h)
    return h


def registry(*live: Collector) -> CollectorRegistry:
    """A registry of every declared collector plus ``live`` (scrape-time) collectors."""
    r = CollectorRegistry(auto_describe=True)
    for c in (*DECLARED, *live):
        r.register(c)
    return r


# Counted by every protocol adapter where a client connection (a webim ticket) opens.
CONNECTIONS = counter("imd_connections_total",
                      "Client connections opened (webim: tickets), per protocol", ("protocol",))
# Counted where each kind of error is noticed (the hub's refusals, Redis outages, ...).
ERRORS = counter("imd_errors_total", "Refusals and failures, by kind", ("kind",))
