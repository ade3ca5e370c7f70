"""Producing behavioral events to ``beat.events``: Avro values keyed by user_id."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator

import pyarrow as pa
from confluent_kafka import Producer

from stream.broker import producer_config
from stream.codec import AvroCodec
from stream.config import Settings
from stream.event_encoding import EventEncoder


class EventProducer:
    """Encodes events with the behavior_event schema and sends them keyed by user_id.

    wait_ready: return only once the producer can deliver. An idempotent producer's first
    delivery waits for its producer id, 0.5 s after it is made on Tansu; a paced run stamps
    its events with the time they are made, so without the wait its first ones start half
    a second late (the demo's first second of freshness, and with it a minute's p99)."""

    def __init__(self, settings: Settings, wait_ready: bool = False) -> None:
        self.topic = settings.events_topic
        self.codec = AvroCodec(
            "behavior_event", settings.events_topic, settings.schema_registry
        )
        self.encoder = EventEncoder(self.codec)
        # Delivery reports only for failures: a Python callback per delivered event
        # would cost about as much as producing it.
        readiness = {"statistics.interval.ms": 50, "stats_cb": self._on_stats} if wait_ready else {}
        self.ready = not wait_ready
        self.producer = Producer(producer_config(settings, **{
            "linger.ms": 20, "on_delivery": self._on_delivery,
            "delivery.report.only.error": True, **readiness}))  # fmt: skip
        self.sent = 0
        self.failed: list[str] = []  # delivery errors since the last flush
        deadline = time.monotonic() + settings.broker_timeout_ms / 1000
        while not self.ready and time.monotonic() < deadline:  # else the sends wait instead
            self.producer.poll(0.01)

    def _on_stats(self, stats: str) -> None:
        """librdkafka's statistics: ready once the idempotent producer has its id."""
        if not self.ready:
            self.ready = json.loads(stats).get("eos", {}).get("idemp_state") in ("Assigned", None)

    def send(self, events: Iterable[dict]) -> int:
        """Send events (dicts of the schema's fields); returns how many."""
        count = 0
        for event in events:
            self._produce(event["user_id"].encode(), self.codec.encode(event))
            count += 1
        self.producer.poll(0)
        self.sent += count
        return count

    def send_batch(self, batch: pa.RecordBatch) -> int:
        """Send a batch in stream.event_contract.EVENT_SCHEMA layout, encoded all at once."""
        values = self.encoder.encode(batch).to_pylist()
        keys = batch["user_id"].cast(pa.binary()).to_pylist()
        for key, value in zip(keys, values):
            self._produce(key, value)
        self.producer.poll(0)
        self.sent += len(values)
        return len(values)

    def _produce(self, key: bytes, value: bytes) -> None:
        while True:
            try:
                self.producer.produce(self.topic, key=key, value=value)
                return
            except BufferError:  # local queue full: let librdkafka drain it
                self.producer.poll(0.05)

    def _on_delivery(self, error: object, message: object) -> None:
        if error is not None:
            self.failed.append(str(error))

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until every event is delivered; raise if any was not."""
        left = self.producer.flush(timeout_s)
        if left:
            raise RuntimeError(f"{left} events not delivered to {self.topic} within {timeout_s}s")
        if self.failed:
            errors, self.failed = self.failed, []
            raise RuntimeError(f"{len(errors)} events were rejected by {self.topic}: {errors[:3]}")


def produce(
    settings: Settings,
    batches: Iterator[pa.RecordBatch],
    rate_per_s: float | None = None,
    duration_s: float | None = None,
    limit: int | None = None,
    on_progress: Callable[[int], None] | None = None,
    live: bool = False,
) -> int:
    """Send batches, paced to rate_per_s (None: as fast as possible), until the batches
    run out, duration_s passes or limit events are sent. Returns events sent.

    live: the batches are SyntheticEvents.live's, each stamped with one instant; each is
    sent when the wall clock reaches it. Paced by count instead, a batch went out when the
    events sent so far said so, and the Poisson counts made that drift from its stamp
    like a random walk (140 ms after 10 s at 500 events/s), which freshness then counted."""
    producer = EventProducer(settings, wait_ready=live or rate_per_s is not None)
    start = time.monotonic()
    try:
        for batch in batches:
            if limit is not None and producer.sent + batch.num_rows > limit:
                batch = batch.slice(0, limit - producer.sent)
            if live and batch.num_rows:
                stamped_s = batch["event_time"][0].value / 1000  # the batch's one instant
                time.sleep(max(stamped_s - time.time(), 0))
            producer.send_batch(batch)
            if on_progress:
                on_progress(producer.sent)
            if rate_per_s and not live:
                ahead = producer.sent / rate_per_s - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
            if (limit is not None and producer.sent >= limit) or (
                duration_s is not None and time.monotonic() - start >= duration_s
            ):
                break
    finally:
        producer.flush()
    return producer.sent
