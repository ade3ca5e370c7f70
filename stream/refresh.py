"""`beat refresh` and the backfill of a new model version: re-encode users from beat.windows.

Both read the newest window of every user from the compacted ``beat.windows``, streaming
partition by partition, and hold no window longer than a step of ``max_batch`` users:

1. a first pass over a partition keeps only each key's last offset (a compacted topic keeps
   older windows until compaction runs, and Tansu never compacts), a few dozen bytes a user;
2. a second pass, to the same end, takes the window messages at those offsets, so every
   user is decoded and encoded once, whatever the topic's duplicates.

A rich progress bar shows the messages read and the users encoded per second.

``refresh_idle`` (run it on a schedule): an embedding is computed as of the moment it is
written (ages count back from that time, so it knows how long its user has been silent).
The encoder workers write one when a user's window changes, so a user who stops acting
keeps an embedding as of their last event, which says nothing of the silence since. Refresh
re-encodes and writes, as of now, those whose newest event is older than ``idle``.

``backfill`` (``beat model publish``): every user into the worker's view, as of the time an
encoder reading the topic from its start would use (stream/as_of.py), committing each step
for the worker's consumer group after it is written: the encoders of that version then
carry on from the window messages that came after the backfill's read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from confluent_kafka import Message, TopicPartition

from stream.broker import PartitionReader
from stream.config import Settings
from stream.encoder_worker import Batch, EncoderWorker
from stream.replay import progress_bar

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class RefreshSummary:
    users: int  # with a window in beat.windows
    refreshed: int  # re-encoded
    seconds: float

    @property
    def users_per_s(self) -> float:
        return self.refreshed / max(self.seconds, 1e-9)


def latest_windows(
    reader: PartitionReader, topic: str, partition: int, step: int
) -> Iterator[Batch]:
    """The newest window message of every user of one partition of beat.windows, in batches
    of about step users; each batch's ends is where the read has come to."""
    last: dict[bytes, int] = {}  # key -> offset of its newest record (a tombstone, maybe)
    end = 0
    for messages in reader.read(topic, partition):
        last.update(zip(map(Message.key, messages), map(Message.offset, messages)))
        end = messages[-1].offset() + 1
    batch = Batch()
    for messages in reader.read(topic, partition, end):
        newest = [m for m in messages if last[m.key()] == m.offset()]
        for start in range(0, len(newest), step):
            batch.add(newest[start : start + step])  # its ends: past its newest window
            if len(batch.latest) >= step:
                yield batch
                batch = Batch()
        batch.ends[partition] = messages[-1].offset() + 1  # past the older ones read, too
    if batch.ends:
        yield batch


def with_next(items: Iterable[T]) -> Iterator[tuple[T, T | None]]:
    """Each item (never None) with the one after it (None after the last): read one ahead."""
    iterator = iter(items)
    current = next(iterator, None)
    while current is not None:
        upcoming = next(iterator, None)
        yield current, upcoming
        current = upcoming


def reencode(
    settings: Settings, worker: EncoderWorker, label: str,
    handle: Callable[[Batch, Batch | None], object], progress: bool = True,
) -> RefreshSummary:
    """handle(batch, upcoming) every batch of newest windows, partition by partition, with a
    progress bar (upcoming: the partition's next batch, read ahead so that a worker that
    decodes ahead decodes it while this one encodes); the users re-encoded are those the
    worker wrote meanwhile."""
    began, written = time.monotonic(), worker.stats.users
    topic = settings.windows_topic
    partitions = sorted(worker.consumer.list_topics(topic, timeout=10).topics[topic].partitions)
    marks = {p: worker.consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
             for p in partitions}  # fmt: skip
    users, done = 0, 0  # done: messages of the partitions finished
    total = sum(h - lo for lo, h in marks.values())
    with PartitionReader(settings) as reader, progress_bar(progress, total, label, "users") as bar:
        for number, partition in enumerate(partitions, 1):
            read = 0
            batches = latest_windows(reader, topic, partition, settings.max_batch)
            for batch, upcoming in with_next(batches):
                users += len(batch.latest)
                handle(batch, upcoming)
                read = batch.ends[partition] - marks[partition][0]
                bar(done + read, worker.stats.users - written)
            done += read
            worker.producer.flush()  # raises DeliveryError: then the run failed
            log.info("%s: partition %d done (%d of %d): %d users read, %d re-encoded, %.0f users/s",
                     label, partition, number, len(partitions), users,
                     worker.stats.users - written, users / max(time.monotonic() - began, 1e-9))
    summary = RefreshSummary(users, worker.stats.users - written, time.monotonic() - began)
    log.info("%s: %s", label, summary)
    return summary


def refresh_idle(
    settings: Settings, worker: EncoderWorker, idle_ms: int, progress: bool = True
) -> RefreshSummary:
    """Re-encode, as of now, every user whose newest event is more than idle_ms old."""
    cutoff_ms = int(time.time() * 1000) - idle_ms

    def refresh(batch: Batch, upcoming: Batch | None) -> None:
        users = worker.decode(batch)
        worker.decode_next(upcoming)
        worker.encode_and_write(
            users.select([w.event_time_ms[-1] < cutoff_ms for w in users.window]), as_of_now=True
        )

    return reencode(settings, worker, "refresh", refresh, progress)


def backfill(settings: Settings, worker: EncoderWorker, progress: bool = True) -> RefreshSummary:
    """Every user's newest window into the worker's view, committed for its group."""
    return reencode(settings, worker, "backfill", worker.process, progress)
