"""Producing behavioral events to ``beat.events``: Avro values keyed by user_id."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

import pyarrow as pa
from confluent_kafka import Producer

from stream.broker import producer_config
from stream.codec import AvroCodec
from stream.config import Settings
from stream.event_encoding import EventEncoder


class EventProducer:
    """Encodes events with the behavior_event schema and sends them keyed by user_id."""

    def __init__(self, settings: Settings) -> None:
        self.topic = settings.events_topic
        self.codec = AvroCodec(
            "behavior_event", settings.events_topic, settings.schema_registry
        )
        self.encoder = EventEncoder(self.codec)
        # Delivery reports only for failures: a Python callback per delivered event
        # would cost about as much as producing it.
        self.producer = Producer(producer_config(settings, **{
            "linger.ms": 20, "on_delivery": self._on_delivery,
            "delivery.report.only.error": True}))  # fmt: skip
        self.sent = 0
        self.failed: list[str] = []  # delivery errors since the last flush

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
) -> int:
    """Send batches, paced to rate_per_s (None: as fast as possible), until the batches
    run out, duration_s passes or limit events are sent. Returns events sent."""
    producer = EventProducer(settings)
    start = time.monotonic()
    try:
        for batch in batches:
            if limit is not None and producer.sent + batch.num_rows > limit:
                batch = batch.slice(0, limit - producer.sent)
            producer.send_batch(batch)
            if on_progress:
                on_progress(producer.sent)
            if rate_per_s:
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
