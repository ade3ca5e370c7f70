"""Replay beat.events into users' event histories: the sequences table of model/sequences.py.

One consumer without a group (nothing is committed) is assigned every partition at the
offset where the time range starts and reads large batches until each partition has
passed the range's end. Values are decoded a batch at a time by the vectorized decoder
(stream/event_columns.py), and the table is built with a few whole-column sorts.

The time range is log time (the Kafka message timestamps, which the producer sets when it
sends), because that is what the broker can seek by (``offsets_for_times``); event times
inside the events may be anything. Split by event time afterwards with
``model.sequences.split_at``.

Reaching the end: a partition is done at the consumer's end-of-partition report, which is
exact on Kafka and on Tansu alike; the ListOffsets watermark is not, on Tansu
(stream/broker.py). That watermark is only the fallback: a partition read up to it counts
as reached, and once all are, a consume that stays empty for ``idle_s`` ends the replay
even without end-of-partition reports.

Speed: librdkafka stops prefetching a partition once its queue holds
``queued.min.messages`` (default 100,000) and then backs off for
``fetch.queue.backoff.ms`` (default 1 s), which stalled every replay of more than 100k
events for a second. The count limit is raised so the bytes cap
(``queued.max.messages.kbytes``) governs, and the backoff is short. Per message, Python
touches only value, partition and offset, through ``map`` over the unbound methods (no
bytecode per message).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from confluent_kafka import Consumer, Message, TopicPartition

from model.sequences import SEQUENCE_SCHEMA
from stream.broker import client_config, records_in
from stream.codec import AvroCodec
from stream.config import Settings
from stream.event_columns import EventColumns, EventDecoder

_NO_END = np.iinfo(np.int64).max
# consume() returns before its timeout only with a full batch: the last, partial one
# costs this wait, however many events came before.
_POLL_S = 0.02


@dataclass
class ReplayConfig:
    start_ms: int | None = None  # log time; None: the oldest retained message
    end_ms: int | None = None  # exclusive; None: the end of the log when the replay starts
    batch_messages: int = 20_000
    idle_s: float = (
        0.5  # without end-of-partition reports: an empty consume this long after every watermark
    )
    progress: bool = True  # a rich progress bar on stderr


@dataclass
class ReplaySummary:
    messages: int = 0  # read in the range
    events: int = 0  # in the table, after removing duplicates
    duplicates: int = 0  # repeated (user_id, event_id): the first one read is kept
    # undecodable values or over a limit, skipped (the stream worker dead-letters them)
    dead_letters: int = 0
    dead_letter_examples: list[tuple[int, int, str]] = field(
        default_factory=list
    )  # (partition, offset, reason)
    users: int = 0
    bytes: int = 0  # of message values
    seconds: float = 0.0

    def __str__(self) -> str:
        rate = self.messages / self.seconds if self.seconds else 0.0
        lines = [
            f"replayed {self.messages:,} messages ({self.bytes / 1e6:,.1f} MB) "
            f"in {self.seconds:,.1f} s "
            f"({rate:,.0f} events/s): {self.events:,} events of {self.users:,} users, "
            f"{self.duplicates:,} duplicates removed, "
            f"{self.dead_letters:,} undecodable or over a limit skipped"
        ]
        lines += [
            f"  skipped partition {p} offset {o}: {reason}"
            for p, o, reason in self.dead_letter_examples
        ]
        return "\n".join(lines)


@dataclass
class _Partitions:
    """Per partition (index = partition number): where the replay starts and stops."""

    topic: str
    start: np.ndarray  # int64 first offset to read
    stop: np.ndarray  # int64 offset not to reach (exclusive); _NO_END: read to the end
    high: np.ndarray  # int64 high watermark when the replay started
    next: np.ndarray  # int64 offset after the last message read
    eof: np.ndarray  # int64 offset of the last end-of-partition report, -1 before any

    def reached(self) -> np.ndarray:
        """bool per partition: read up to its stop, or to its watermark when it has none."""
        return np.where(self.stop == _NO_END, self.next >= self.high, self.next >= self.stop)

    def done(self) -> np.ndarray:
        """bool per partition: every message in range read, as far as offsets and end reports
        tell."""
        return (self.next >= self.stop) | (self.eof >= np.minimum(self.stop, self.high))

    def total(self) -> int:
        """Messages to read, as far as the offsets tell (Tansu's last batch aside)."""
        return int(np.maximum(np.minimum(self.stop, self.high) - self.start, 0).sum())


def replay(
    settings: Settings, config: ReplayConfig | None = None
) -> tuple[pa.Table, ReplaySummary]:
    """The sequences table (model/sequences.py) of the events in beat.events, and a summary."""
    config = config or ReplayConfig()
    if (
        config.start_ms is not None
        and config.end_ms is not None
        and config.start_ms >= config.end_ms
    ):
        raise ValueError(
            f"replay needs start < end, got {config.start_ms} >= {config.end_ms} (epoch ms)"
        )
    codec = AvroCodec("behavior_event", settings.events_topic, settings.schema_registry)
    decoder = EventDecoder(codec, settings.event_limits)  # the stream workers' events, no others
    summary = ReplaySummary()
    began = time.monotonic()
    consumer = Consumer(replay_consumer_config(settings))
    try:
        partitions = _locate(consumer, settings.events_topic, config)
        consumer.assign(
            [TopicPartition(partitions.topic, p, int(o)) for p, o in enumerate(partitions.start)]
        )
        parts = []
        with progress_bar(config.progress, partitions.total(), "replay", "events") as advance:
            for columns in _read(consumer, partitions, decoder, config, summary):
                parts.append(columns)
                advance(summary.messages)
    finally:
        consumer.close()
    table, summary.duplicates = build_sequences(_concat(parts))
    summary.events, summary.users = (
        summary.messages - summary.dead_letters - summary.duplicates,
        table.num_rows,
    )
    summary.seconds = time.monotonic() - began
    return table, summary


def replay_consumer_config(settings: Settings) -> dict:
    """librdkafka settings of the replay's consumer: large fetches, deep prefetch."""
    return client_config(settings, **{
        # assign() only: the group never joins or commits
        "group.id": f"{settings.group_prefix}-replay-{uuid.uuid4().hex}",
        "enable.auto.commit": False,
        "enable.partition.eof": True,
        "fetch.wait.max.ms": max(settings.fetch_max_wait_ms, 100),
        "fetch.max.bytes": 64 << 20,
        "max.partition.fetch.bytes": 16 << 20,
        "queued.max.messages.kbytes": 64 << 10,  # the prefetch limit per partition: 64 MB
        "queued.min.messages": 10_000_000,  # librdkafka's maximum; not the limit (docstring)
        "fetch.queue.backoff.ms": 10,  # how soon to fetch again once a full queue has room
    })  # fmt: skip


def _locate(
    consumer: Consumer, topic: str, config: ReplayConfig, timeout_s: float = 10.0
) -> _Partitions:
    metadata = consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
    if metadata is None or metadata.error is not None or not metadata.partitions:
        raise RuntimeError(
            f"topic {topic} does not exist: check BEAT_EVENTS_TOPIC and KAFKA_BOOTSTRAP_SERVERS"
        )
    n = max(metadata.partitions) + 1
    low, high = np.zeros(n, np.int64), np.zeros(n, np.int64)
    for p in range(n):
        low[p], high[p] = consumer.get_watermark_offsets(
            TopicPartition(topic, p), timeout=timeout_s
        )

    def offsets_at(time_ms: int, missing: np.ndarray) -> np.ndarray:
        """First offset at or after time_ms per partition; `missing` where there is none."""
        found = consumer.offsets_for_times(
            [TopicPartition(topic, p, time_ms) for p in range(n)], timeout=timeout_s
        )
        offsets = np.array(
            [tp.offset for tp in sorted(found, key=lambda tp: tp.partition)], np.int64
        )
        return np.where(offsets < 0, missing, offsets)

    start = low if config.start_ms is None else np.maximum(offsets_at(config.start_ms, high), low)
    stop = (
        np.full(n, _NO_END)
        if config.end_ms is None
        else offsets_at(config.end_ms, np.full(n, _NO_END))
    )
    return _Partitions(topic, start, stop, high, next=start.copy(), eof=np.full(n, -1, np.int64))


def _read(consumer: Consumer, partitions: _Partitions, decoder: EventDecoder, config: ReplayConfig,
          summary: ReplaySummary) -> Iterator[EventColumns]:  # fmt: skip
    """Decoded batches until every partition is done, or reached and the log has gone quiet."""
    idle_since = None
    while not partitions.done().all():
        reached = partitions.reached().all()
        messages = consumer.consume(config.batch_messages, timeout=_POLL_S)
        ends: dict[int, int] = {}
        messages = records_in(messages, ends)
        for p, offset in ends.items():
            partitions.eof[p] = max(partitions.eof[p], offset)
        if not messages:
            idle_since = idle_since or time.monotonic()
            if reached and time.monotonic() - idle_since >= config.idle_s:
                return
            continue
        idle_since = None
        n = len(messages)
        partition = np.fromiter(map(Message.partition, messages), np.int64, n)
        offset = np.fromiter(map(Message.offset, messages), np.int64, n)
        np.maximum.at(partitions.next, partition, offset + 1)
        in_range = offset < partitions.stop[partition]
        if not in_range.all():
            keep = np.flatnonzero(in_range)
            messages, partition, offset = [messages[i] for i in keep], partition[keep], offset[keep]
            consumer.pause(
                [
                    TopicPartition(partitions.topic, int(p))
                    for p in np.flatnonzero(partitions.done())
                ]
            )
        columns = decoder.decode(list(map(Message.value, messages)))
        summary.messages += len(messages)
        summary.bytes += columns.bytes
        summary.dead_letters += len(columns.rejected)
        for row, reason in columns.rejected[: 5 - len(summary.dead_letter_examples)]:
            summary.dead_letter_examples.append((int(partition[row]), int(offset[row]), reason))
        yield columns


@contextmanager
def progress_bar(
    show: bool, total: int, label: str, unit: str
) -> Iterator[Callable[..., None]]:
    """A function(messages read so far, counted=that) that moves a rich progress bar on
    stderr, showing `counted` per second as the rate of `unit`."""
    if not show:
        yield lambda done, counted=None: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    began = time.monotonic()
    with Progress(
        TextColumn(label), BarColumn(), MofNCompleteColumn(),
        TextColumn(f"{{task.fields[rate]}} {unit}/s  ETA"),
        TimeRemainingColumn(),
    ) as bar:  # fmt: skip
        task = bar.add_task(label, total=total, rate="-")

        def advance(done: int, counted: int | None = None) -> None:
            counted = done if counted is None else counted
            rate = counted / max(time.monotonic() - began, 1e-9)
            bar.update(task, completed=done, total=max(total, done), rate=f"{rate:,.0f}")

        yield advance


def _concat(parts: list[EventColumns]) -> EventColumns:
    if not parts:
        empty = pa.array([], pa.string())
        return EventColumns(
            empty, empty, empty, empty, np.empty(0, np.int64), np.empty(0), np.empty(0, np.int64)
        )
    strings = {name: pa.concat_arrays([getattr(p, name) for p in parts])
               for name in ("user_id", "event_id", "action", "property")}  # fmt: skip
    numbers = {
        name: np.concatenate([getattr(p, name) for p in parts]) for name in ("event_time", "value")
    }
    return EventColumns(**strings, **numbers, row=np.arange(sum(map(len, parts))))


def build_sequences(events: EventColumns) -> tuple[pa.Table, int]:
    """(the sequences table, duplicates removed) from events in log order.

    Of the events sharing a (user_id, event_id), the first in log order is kept. The window
    keys events by (event_time, event-id hash) instead, having no event_id strings; README,
    "Duplicates have two rules, on purpose", says where the two differ. Three whole-column
    steps: rank users by id, a stable sort by (user, event_id) that marks repeats, a stable sort of
    the rest by (user, event_time), which leaves equal times in event_id order.
    """
    users = pc.unique(events.user_id)
    users = users.take(pc.sort_indices(users))
    user = pc.index_in(events.user_id, users).to_numpy()  # [events] rank of the user id
    by_id = pc.sort_indices(
        pa.table({"user": user, "event_id": events.event_id}),
        sort_keys=[("user", "ascending"), ("event_id", "ascending")],
    ).to_numpy()
    ids = events.event_id.take(by_id)
    repeat = np.zeros(len(by_id), bool)
    if len(by_id) > 1:
        repeat[1:] = (user[by_id][1:] == user[by_id][:-1]) & np.asarray(pc.equal(ids[1:], ids[:-1]))
    kept = by_id[~repeat]
    order = kept[np.lexsort((events.event_time[kept], user[kept]))]

    counts = np.bincount(user[order], minlength=len(users))  # [users]
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    value = events.value[order]
    flat = {
        "event_time": pa.array(events.event_time[order]),
        "action": events.action.take(order),
        "property": events.property.take(order),
        "value": pa.array(value, mask=np.isnan(value)),
    }
    columns = {
        "user_id": users,
        **{name: pa.ListArray.from_arrays(offsets, array) for name, array in flat.items()},
    }
    return pa.table(columns).cast(SEQUENCE_SCHEMA), int(repeat.sum())
