"""Prometheus collectors, declared next to the code they count, served per daemon.

A module that counts something declares its collector at its top with ``counter`` or
``histogram``: the collector belongs to no registry (not prometheus_client's global one), and
each daemon's admin endpoint registers every declared collector in its own
``CollectorRegistry`` (``registry``), beside the gauges it computes at scrape time.

Counting is done in the reactor thread, for every message, so a count is a plain integer
addition: prometheus_client's own Counter and Histogram take a lock per update and walk the
buckets in Python, which cost several per cent of the daemon's time at full speed.  The
families are built from the plain numbers when /metrics is scraped.
"""

from __future__ import annotations

import itertools
from bisect import bisect_left
from typing import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

DECLARED: list[Collector] = []
DEFAULT_BUCKETS = (.005, .01, .025, .05, .075, .1, .25, .5, .75, 1.0, 2.5, 5.0, 7.5, 10.0)


class Count:
    """One labelled counter (only ever increased, in the reactor thread)."""

    __slots__ = ("value",)

    def __init__(self):
        self.value = 0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class Distribution:
    """One labelled histogram: a count per bucket (``le`` upper bounds) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.sum += amount


class _Family(Collector):
    """A metric family and its children, one per tuple of label values."""

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...], make):
        self.name, self.documentation, self.labelnames = name, documentation, labels
        self._make = make
        self._children: dict[tuple[str, ...], Count | Distribution] = {}
        DECLARED.append(self)

    def labels(self, *values: str):
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            if len(key) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}")
            child = self._children[key] = self._make()
        return child

    def describe(self) -> Iterator[Metric]:
        yield self._family()  # the name and type, for the registry's duplicate check

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for key, child in list(self._children.items()):
            self._add(family, key, child)
        yield family

    def _family(self) -> Metric:
        raise NotImplementedError

    def _add(self, family, key: tuple[str, ...], child) -> None:
        raise NotImplementedError


class CounterFamily(_Family):
    def __init__(self, name: str, documentation: str, labels: tuple[str, ...] = ()):
        super().__init__(name, documentation, labels, Count)

    def inc(self, amount: float = 1) -> None:
        self.labels().inc(amount)

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def _add(self, family: CounterMetricFamily, key: tuple[str, ...], child: Count) -> None:
        family.add_metric(key, child.value)


class HistogramFamily(_Family):
    def __init__(self, name: str, documentation: str, labels: tuple[str, ...] = (),
                 buckets: tuple[float, ...] = DEFAULT_BUCKETS):
        bounds = tuple(sorted(float(b) for b in buckets))
        super().__init__(name, documentation, labels, lambda: Distribution(bounds))
        # bucket bounds as prometheus_client writes them ("0.005", "1.0")
        self._les = [repr(b) for b in bounds] + ["+Inf"]

    def observe(self, amount: float) -> None:
        self.labels().observe(amount)

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def _add(self, family: HistogramMetricFamily, key: tuple[str, ...],
             child: Distribution) -> None:
        cumulative = itertools.accumulate(child.counts)
        family.add_metric(key, list(zip(self._les, cumulative)), child.sum)


def counter(name: str, documentation: str, labels: tuple[str, ...] = ()) -> CounterFamily:
    return CounterFamily(name, documentation, labels)


def histogram(name: str, documentation: str, labels: tuple[str, ...] = (),
              buckets: tuple[float, ...] = DEFAULT_BUCKETS) -> HistogramFamily:
    return HistogramFamily(name, documentation, labels, buckets)


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
