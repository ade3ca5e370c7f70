"""What a worker shows: Prometheus metrics, /healthz and /readyz, on BEAT_METRICS_PORT.

Both workers use this module: WorkerMetrics holds what every worker reports (dead letters,
stage seconds, batch sizes, consumer lag, readiness), StreamMetrics and EncoderMetrics add
their own counters, and ``serving`` runs one small HTTP server for all three paths while
a worker's loop runs. Each worker owns a registry of its own rather than prometheus_client's
global one, and values of its own (stream/metric_series.py: not in the files Feast's import
points prometheus_client at): several workers in one process (tests, ``beat refresh``)
then keep apart.

Liveness: the runtime (stream/runtime.py) marks each sign of life of the worker's loop
(``beat``); ``/healthz`` fails once there has been none for BEAT_HEALTH_TIMEOUT_MS.

Consumer lag comes from librdkafka's statistics (every LAG_INTERVAL_MS): the high watermark
of the fetch responses, which is exact on Tansu too (stream/broker.py), against the
position; no request of its own reaches the broker, and the consumer is only ever called
from the worker's thread.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import Counter as Tally
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    ProcessCollector,
    generate_latest,
)

from stream.config import ConfigError, Settings
from stream.metric_series import Counter, Gauge, Histogram

log = logging.getLogger(__name__)

LAG_INTERVAL_MS = 5_000

# Dead-letter reasons are free text (they name values and settings); a label must take few
# values, so each reason is counted under the first kind whose pattern it matches.
REASON_KINDS = [
    (re.compile(r"over BEAT_MAX_"), "over_limit"),
    (re.compile(r"^missing (user_id|event_id|action)$"), "missing_field"),
    (re.compile(r"is not the event's user_id"), "wrong_key"),
    (re.compile(r"in the future$"), "future_time"),
    (re.compile(r"^event_time before 1970"), "time_out_of_range"),
    (re.compile(r"^window has no events$"), "empty_window"),
]
UNDECODABLE = "undecodable"  # every other reason is a codec's DecodeError (or bad UTF-8)

STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 10, 100, 1_000, 10_000, 100_000, 1_000_000)
# Live embeddings take well under a second; a replay's are months behind (+Inf).
FRESHNESS_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3_600)


def reason_kind(reason: str) -> str:
    """The label a dead letter's reason is counted under (REASON_KINDS)."""
    return next((kind for pattern, kind in REASON_KINDS if pattern.search(reason)), UNDECODABLE)


class WorkerMetrics:
    """What every worker reports, and whether it is ready: it holds partitions (their state
    restored, for a stream worker; an encoder has loaded its model before it joins)."""

    def __init__(self, ready_file: Path | None = None) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # memory, CPU, open files
        self.ready_file = ready_file
        self.partitions: set[int] = set()
        self.dead_letters = Counter(
            "beat_dead_letters", "Messages sent to the dead-letter topic, by kind of reason",
            ["reason"], registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "beat_stage_seconds", "Seconds of one run of a processing stage", ["stage"],
            buckets=STAGE_BUCKETS, registry=self.registry,
        )
        self.batch_messages = Histogram(
            "beat_batch_messages", "Messages taken into one batch", buckets=BATCH_BUCKETS,
            registry=self.registry,
        ).labels()
        self.consumer_lag = Gauge(
            "beat_consumer_lag", "Messages between the consumer's position and the high "
            "watermark, per assigned partition", ["topic", "partition"], registry=self.registry,
        )
        self._lag_series: set[tuple[str, str]] = set()
        self.last_sign_of_life = time.monotonic()

    # -- liveness -------------------------------------------------------------------------

    def beat(self) -> None:
        """A sign of life of the worker's loop (stream/runtime.py gives them)."""
        self.last_sign_of_life = time.monotonic()

    def silent_s(self) -> float:
        """Seconds since the last sign of life."""
        return time.monotonic() - self.last_sign_of_life

    # -- readiness ------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return bool(self.partitions)

    def partitions_assigned(self, partitions: Iterable[int]) -> None:
        """Call once the partitions are usable (a stream worker: their state restored)."""
        self.partitions |= set(partitions)
        if self.ready_file:
            self.ready_file.touch()

    def partitions_revoked(self, partitions: Iterable[int]) -> None:
        self.partitions -= set(partitions)

    # -- what the workers count -----------------------------------------------------------

    def dead_lettered(self, reasons: Iterable[str]) -> None:
        for kind, count in Tally(map(reason_kind, reasons)).items():
            self.dead_letters.labels(kind).inc(count)

    def observe_stage(self, name: str, seconds: float) -> None:
        """A run of a stage took seconds: a sign of life too."""
        self.stage_seconds.labels(name).observe(seconds)
        self.beat()

    # -- consumer lag ---------------------------------------------------------------------

    def consumer_settings(self, settings: Settings) -> dict[str, Any]:
        """librdkafka properties for a worker's consumer: statistics (for the lag) only when
        the metrics are served, as nobody would read them otherwise."""
        if not settings.metrics_port:
            return {}
        return {"statistics.interval.ms": LAG_INTERVAL_MS, "stats_cb": self.read_statistics}

    def read_statistics(self, statistics: str) -> None:
        """Set the lag of every assigned partition from librdkafka's statistics JSON, and
        drop the series of partitions no longer assigned."""
        seen = set()
        for topic, about in json.loads(statistics).get("topics", {}).items():
            for partition, p in about.get("partitions", {}).items():
                position = p["app_offset"] if p["app_offset"] >= 0 else p["committed_offset"]
                if partition == "-1" or not p.get("desired") or p["hi_offset"] < 0 or position < 0:
                    continue  # librdkafka's internal partition, or nothing known yet
                self.consumer_lag.labels(topic, partition).set(max(0, p["hi_offset"] - position))
                seen.add((topic, partition))
        for series in self._lag_series - seen:
            self.consumer_lag.remove(*series)
        self._lag_series = seen


class StreamMetrics(WorkerMetrics):
    def __init__(self, ready_file: Path | None = None) -> None:
        super().__init__(ready_file)
        self.events = Counter(
            "beat_events", "Event messages taken in, by input topic (events or repartition)",
            ["topic"], registry=self.registry,
        )
        self.windows = Counter(
            "beat_windows", "Window messages sent to the windows topic", registry=self.registry
        ).labels()


class EncoderMetrics(WorkerMetrics):
    def __init__(self, ready_file: Path | None = None) -> None:
        super().__init__(ready_file)
        self.window_messages = Counter(
            "beat_window_messages", "Window messages read (seals and deletions not counted)",
            ["model_version"], registry=self.registry,
        )
        self.users_encoded = Counter(
            "beat_users_encoded", "Users encoded and written to the online store",
            ["model_version"], registry=self.registry,
        )
        self.freshness = Histogram(
            "beat_freshness_seconds", "From a user's newest event time to its embedding "
            "written to the online store", ["model_version"], buckets=FRESHNESS_BUCKETS,
            registry=self.registry,
        )

    def written(self, model_version: str, freshness_ms: list[float]) -> None:
        """Users written to the online store, each given by its freshness."""
        self.users_encoded.labels(model_version).inc(len(freshness_ms))
        freshness = self.freshness.labels(model_version)
        for ms in freshness_ms:
            freshness.observe(ms / 1000)


class _StatusServer(ThreadingHTTPServer):
    daemon_threads = True  # a hung scrape must not keep the worker from exiting

    def __init__(self, port: int, metrics: WorkerMetrics, health_timeout_s: float) -> None:
        super().__init__(("", port), _StatusHandler)
        self.metrics = metrics
        self.health_timeout_s = health_timeout_s


class _StatusHandler(BaseHTTPRequestHandler):
    server: _StatusServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        metrics = self.server.metrics
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._answer(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
        elif path == "/healthz":  # served only while the worker's loop runs
            self._health()
        elif path == "/readyz":
            held = ",".join(map(str, sorted(metrics.partitions)))
            ready = metrics.ready
            self._answer(200 if ready else 503,
                         f"ready: partitions {held}\n".encode() if ready else b"no partitions\n")
        else:
            self._answer(404, b"/metrics, /healthz or /readyz\n")

    def _health(self) -> None:
        """200 while the loop shows signs of life; 503 once it has been silent for longer
        than BEAT_HEALTH_TIMEOUT_MS (stuck: a supervisor should restart the worker)."""
        silent_s, limit_s = self.server.metrics.silent_s(), self.server.health_timeout_s
        if silent_s <= limit_s:
            self._answer(200, b"ok\n")
        else:
            self._answer(503, f"stuck: no sign of life from the worker's loop for "
                              f"{silent_s:.0f}s (BEAT_HEALTH_TIMEOUT_MS={limit_s * 1000:.0f})\n"
                              .encode())  # fmt: skip

    def _answer(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass  # a scrape every few seconds is no news for the worker's log


@contextmanager
def serving(settings: Settings, metrics: WorkerMetrics) -> Iterator[None]:
    """Serve /metrics, /healthz and /readyz on BEAT_METRICS_PORT (0: nothing) for the block.
    ConfigError naming the setting when the port cannot be had."""
    if not settings.metrics_port:
        yield
        return
    try:
        server = _StatusServer(settings.metrics_port, metrics, settings.health_timeout_ms / 1000)
    except OSError as err:
        raise ConfigError(
            f"BEAT_METRICS_PORT={settings.metrics_port}: cannot serve metrics there ({err}); "
            "give each worker on a host a free port of its own, or 0 for none"
        ) from None
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()
    log.info("metrics, /healthz and /readyz on port %d", settings.metrics_port)
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
