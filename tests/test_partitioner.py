"""Producers with different partitioners: every user still gets one window with all of
their events, kept at the partition murmur2 gives their key (stream/partitioner.py)."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from stream.broker import client_config
from stream.codec import AvroCodec
from stream.config import Settings
from stream.partitioner import key_partitions
from stream.producer import EventProducer
from stream.window import Window

from conftest import read_topic, stream_worker
from reference_windows import expected_windows, traffic, window_columns


def test_key_partitions_match_librdkafkas_murmur2(settings: Settings) -> None:
    rng = np.random.default_rng(0)
    keys = [bytes(rng.integers(0, 256, rng.integers(1, 40), dtype=np.uint8)) for _ in range(1_000)]
    keys += [f"u{i:06d}".encode() for i in range(1_000)]
    topic = f"partitions-{uuid.uuid4().hex[:8]}"
    admin = AdminClient(client_config(settings))
    admin.create_topics([NewTopic(topic, 7, 1)])[topic].result(15)
    delivered: dict[int, int] = {}
    producer = Producer(client_config(settings, partitioner="murmur2_random"))
    for i, key in enumerate(keys):
        report = lambda err, message, i=i: delivered.__setitem__(i, message.partition())  # noqa: E731
        producer.produce(topic, b"", key, on_delivery=report)
    assert producer.flush(30) == 0
    ours = key_partitions(pa.array(keys, pa.binary()), 7)
    assert [delivered[i] for i in range(len(keys))] == ours.tolist()


def test_a_crc32_and_a_murmur2_producer_give_one_window_per_user(
    settings: Settings, tmp_path: Path
) -> None:
    events = traffic(1_500, seed=5)
    codec = AvroCodec("behavior_event", settings.events_topic)
    ours = EventProducer(settings)  # murmur2, as beatstream's producers
    crc32 = Producer(
        client_config(settings, partitioner="consistent_random")
    )  # librdkafka's default
    landed: dict[str, set[int]] = {}
    for i, event in enumerate(events):
        if i % 2:
            report = lambda err, m: landed.setdefault(m.key().decode(), set()).add(m.partition())  # noqa: E731
            crc32.produce(settings.events_topic, codec.encode(event), event["user_id"].encode(),
                          on_delivery=report)  # fmt: skip
        else:
            ours.send([event])
    assert crc32.flush(30) == 0
    ours.flush()
    users = sorted(landed)
    home = dict(
        zip(users, key_partitions(pa.array(users).cast(pa.binary()), settings.partitions).tolist())
    )
    assert sum(landed[u] != {home[u]} for u in users) >= 10, (
        "the partitioners must disagree on many users"
    )

    expected = {user: window_columns(w) for user, w in expected_windows(events).items()}
    window_codec = AvroCodec("user_window", settings.windows_topic)
    latest: dict[str, dict] = {}
    where: dict[str, set[int]] = {}

    def exact(messages: list) -> bool:
        latest.clear()
        for message in messages:
            if message.value() is not None:
                window = Window.from_record(window_codec.decode(message.value()))
                latest[window.user_id] = window.columns()
                where.setdefault(window.user_id, set()).add(message.partition())
        return latest == expected

    with stream_worker(settings, tmp_path / "stream.log"):
        try:
            read_topic(settings, settings.windows_topic, until=exact, timeout_s=90)
        except AssertionError:
            pass
    wrong = sorted(u for u in expected if latest.get(u) != expected[u])
    assert not wrong, f"{len(wrong)} of {len(expected)} users' windows differ, e.g. {wrong[:5]}"
    assert where == {user: {home[user]} for user in expected}
