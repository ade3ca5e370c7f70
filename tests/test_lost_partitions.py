"""A stream worker that loses partitions (its session expired: the group has moved on)
drops what it took from them: no window of theirs is emitted and no offset committed."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from confluent_kafka import Consumer, Message, Producer, TopicPartition

from stream.broker import client_config, producer_config
from stream.codec import AvroCodec
from stream.config import Settings
from stream.state import open_store
from stream.stream_worker import StreamWorker

from conftest import read_topic

NOW = datetime.now(UTC).replace(microsecond=0)


def send_events(settings: Settings, users_by_partition: dict[int, list[str]]) -> None:
    codec = AvroCodec("behavior_event", settings.events_topic)
    producer = Producer(producer_config(settings))
    for partition, users in users_by_partition.items():
        for n, user in enumerate(users):
            event = {"user_id": user, "event_id": f"{user}-{n}", "action": "login",
                     "event_time": NOW - timedelta(minutes=n), "property": None, "value": None,
                     "attributes": {}}  # fmt: skip
            producer.produce(settings.events_topic, codec.encode(event), user.encode(),
                             partition=partition)  # fmt: skip
    producer.flush(10)


def taken(settings: Settings, partitions: list[int], count: int) -> list[Message]:
    """The messages a worker would hold in its batch: the first `count` of the partitions."""
    reader = Consumer(client_config(settings, **{"group.id": f"reader-{uuid.uuid4().hex}"}))
    reader.assign([TopicPartition(settings.events_topic, p, 0) for p in partitions])
    messages: list[Message] = []
    while len(messages) < count:
        messages += [m for m in reader.consume(count, 1.0) if m.error() is None]
    reader.close()
    return messages


def test_lost_partitions_are_neither_emitted_nor_committed(settings: Settings) -> None:
    # users whose keys murmur2 puts on those partitions (events elsewhere would be moved)
    send_events(settings, {0: ["kept-e", "kept-l"], 1: ["lost-d", "lost-f", "lost-p"]})
    worker = StreamWorker(settings)
    for partition in (0, 1):  # as after an assignment of both
        worker.stores[partition] = open_store("memory", settings.data_dir, "g", partition)
    worker.pending = taken(settings, [0, 1], 5)

    worker.on_lost([TopicPartition(settings.events_topic, 1)])

    assert {m.partition() for m in worker.pending} == {0} and len(worker.pending) == 2
    assert set(worker.stores) == {0}
    worker.process(worker.pending)  # what the loop does next with the batch in hand
    windows = read_topic(settings, settings.windows_topic)
    assert {m.key() for m in windows if m.value() is not None} == {b"kept-e", b"kept-l"}
    committed = worker.consumer.committed(
        [TopicPartition(settings.events_topic, p) for p in (0, 1)], timeout=10
    )
    assert [tp.offset for tp in committed] == [2, -1001]  # partition 1: nothing committed
    worker.consumer.close()
