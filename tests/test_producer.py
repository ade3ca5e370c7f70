"""EventProducer against a real broker: batches arrive as the codec's values keyed by
user_id, and failed deliveries are reported at flush."""

from __future__ import annotations

import socket
from datetime import UTC, datetime

import pyarrow as pa
import pytest

import stream.producer
from stream.broker import producer_config
from stream.codec import AvroCodec
from stream.config import Settings, load_settings
from stream.producer import EventProducer
from stream.synthetic import SyntheticEvents

from conftest import read_topic


def batch(n: int) -> pa.RecordBatch:
    days = datetime(2024, 5, 1, tzinfo=UTC), datetime(2024, 5, 3, tzinfo=UTC)
    return next(SyntheticEvents(n_users=40, seed=3).history(*days)).slice(0, n)


def test_a_batch_arrives_as_the_codec_encodes_it_keyed_by_user(settings: Settings) -> None:
    events = batch(300)
    producer = EventProducer(settings)

    assert producer.send_batch(events) == 300
    producer.flush()
    del producer  # its connection would hold up the broker's shutdown

    codec = AvroCodec("behavior_event", settings.events_topic)
    expected = {
        (row["user_id"].encode(), codec.encode({**row, "attributes": dict(row["attributes"])}))
        for row in events.to_pylist()
    }
    received = [(m.key(), m.value()) for m in read_topic(settings, settings.events_topic)]
    assert len(received) == 300 and set(received) == expected


def test_undelivered_events_are_reported_at_flush(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    def quick_timeout(settings: Settings, **extra: object) -> dict:
        return producer_config(settings, **extra, **{"message.timeout.ms": 300})

    monkeypatch.setattr(stream.producer, "producer_config", quick_timeout)
    producer = EventProducer(load_settings(bootstrap_servers=f"127.0.0.1:{port}"))
    producer.send_batch(batch(3))

    with pytest.raises(RuntimeError, match="3 events were rejected"):
        producer.flush(10)


def test_live_events_go_out_when_the_clock_reaches_their_stamp(settings: Settings) -> None:
    live = SyntheticEvents(n_users=200, seed=4).live(400)
    assert stream.producer.produce(settings, live, 400, duration_s=1.5, live=True) > 300

    codec = AvroCodec("behavior_event", settings.events_topic)
    sent_late_ms = []
    for message in read_topic(settings, settings.events_topic):
        stamped = codec.decode(message.value())["event_time"]
        sent_late_ms.append(message.timestamp()[1] - int(stamped.timestamp() * 1000))
    # Never before its stamp; paced by count, the Poisson counts ran some batches ahead of
    # their stamps and others behind, further and further.
    assert min(sent_late_ms) >= 0
    assert sorted(sent_late_ms)[len(sent_late_ms) // 2] < 50
