"""Counters, gauges and histograms that keep their values in the worker's own memory.

prometheus_client's Counter, Gauge and Histogram keep their values wherever the process-
wide PROMETHEUS_MULTIPROC_DIR says, chosen when prometheus_client is imported, and Feast
sets that variable when it is imported (feast/metrics.py). Then every metric of the process
lives in memory-mapped files keyed by name and labels: two workers in one process (tests,
``beat refresh`` beside an encoder) add into each other's series, a new worker starts from
an old one's counts, and a series cannot be removed. These keep plain numbers and give them
to prometheus_client's registry and exposition through its custom-collector API (its
``*MetricFamily`` classes), whatever mode it is in.

One writer per series is assumed (the worker's thread; librdkafka's statistics callback
runs there too); the status server's thread only reads.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Callable, Sequence
from itertools import accumulate
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

S = TypeVar("S")


class Count:
    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class Level:
    def __init__(self) -> None:
        self.value = 0.0

    def set(self, value: float) -> None:
        self.value = value


class Distribution:
    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds  # upper bounds, inclusive, the last +Inf
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class _Series(Generic[S]):
    """A metric's series, one per set of label values, registered with registry."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str],
        registry: CollectorRegistry, new: Callable[[], S],
    ) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, list(labelnames)
        self._new = new
        self._series: dict[tuple[str, ...], S] = {}
        self._lock = threading.Lock()  # the series dict, against a scrape iterating it
        registry.register(self)

    def labels(self, *values: object) -> S:
        """The series of these label values (the only one when the metric has no labels)."""
        key = tuple(map(str, values))
        series = self._series.get(key)
        if series is None:
            with self._lock:
                series = self._series.setdefault(key, self._new())
        return series

    def remove(self, *values: object) -> None:
        with self._lock:
            self._series.pop(tuple(map(str, values)), None)

    def items(self) -> list[tuple[list[str], S]]:
        with self._lock:
            return [(list(key), series) for key, series in self._series.items()]



class _Scalars(_Series[S]):
    """Series of one number each: counters and gauges."""

    family: type[CounterMetricFamily | GaugeMetricFamily]

    def collect(self) -> list[Metric]:
        family = self.family(self.name, self.documentation, labels=self.labelnames)
        for values, series in self.items():
            family.add_metric(values, series.value)
        return [family]


class Counter(_Scalars[Count]):
    family = CounterMetricFamily

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *,
                 registry: CollectorRegistry) -> None:  # fmt: skip
        super().__init__(name, documentation, labelnames, registry, Count)


class Gauge(_Scalars[Level]):
    family = GaugeMetricFamily

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *,
                 registry: CollectorRegistry) -> None:  # fmt: skip
        super().__init__(name, documentation, labelnames, registry, Level)


class Histogram(_Series[Distribution]):
    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *,
                 buckets: Sequence[float], registry: CollectorRegistry) -> None:  # fmt: skip
        bounds = (*sorted(map(float, buckets)), float("inf"))
        super().__init__(name, documentation, labelnames, registry, lambda: Distribution(bounds))

    def collect(self) -> list[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, series in self.items():
            cumulative = accumulate(list(series.counts))  # a copy: the worker may observe
            buckets = [(floatToGoString(b), n) for b, n in zip(series.bounds, cumulative)]
            family.add_metric(values, buckets, series.sum)
        return [family]
