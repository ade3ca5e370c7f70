"""Stream workers: keep every user's rolling window and emit the windows that changed.

One loop, one batch per flush interval; the loop, the clients, stopping, rebalances and
readiness are the worker runtime's (stream/runtime.py), and this module holds the rest:

    consume    every event of the interval from beat.events (confluent-kafka, batched)
    decode     all values at once into columns; bad ones go to the dead-letter topic
    merge      each user's new events into the stored window, all users at once (window.py)
    emit       one window message per changed user to beat.windows, and into the state store
    commit     after the windows are flushed and sealed (below), the batch's offsets

beat.windows is compacted and keyed by user_id, and a window message is the user's whole
state, so the topic is also the state's changelog: when a partition is assigned, its store
is rebuilt from the same partition of beat.windows (events and windows are co-partitioned:
a user's window goes to the partition number of the user's events). A worker killed at
any point restarts from the last commit; the replayed events merge into windows that may
already hold them, which changes nothing (merging is idempotent), so no event is lost or
counted twice.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from confluent_kafka import Consumer, Message, TopicPartition

from stream.broker import SEAL_KEY, PartitionReader, dead_letter, read_compacted
from stream.codec import AvroCodec
from stream.config import ConfigError, Settings
from stream.event_columns import EventColumns, EventDecoder
from stream.observability import StreamMetrics
from stream.partitioner import key_partitions
from stream.runtime import Batching, WorkerRuntime, stop_on_signals
from stream.state import PartitionStore, SymbolBound, open_store
from stream.window import (
    MAX_TIME_MS,
    SYMBOLS,
    NewEvents,
    Window,
    encode_window_body,
    event_id_hashes,
    merge_batch,
)

log = logging.getLogger(__name__)

@dataclass
class Rejected:
    """Messages of a batch that go to the dead-letter topic: index in the batch, reason."""

    index: list[int] = field(default_factory=list)
    reason: list[str] = field(default_factory=list)

    def add(self, index: np.ndarray, reason: str | Sequence[str]) -> None:
        self.index += index.tolist()
        self.reason += [reason] * len(index) if isinstance(reason, str) else list(reason)


def validate(
    events: EventColumns,
    keys: pa.BinaryArray,
    now_ms: int,
    future_tolerance_ms: int,
    rejected: Rejected,
) -> np.ndarray:
    """Indices (into events' rows) of the valid events; the others are added to rejected."""
    problems = [
        (pc.equal(events.user_id, ""), "missing user_id"),
        (pc.equal(events.event_id, ""), "missing event_id"),
        (pc.equal(events.action, ""), "missing action"),
    ]
    bad = np.zeros(len(events.row), bool)
    for mask, reason in problems:
        hit = np.asarray(mask.to_numpy(zero_copy_only=False), bool) & ~bad
        rejected.add(events.row[hit], reason)
        bad |= hit
    # A user's events must share a partition: the window state lives with the partition.
    row_keys = keys.take(pa.array(events.row))
    keyed = pc.fill_null(pc.equal(row_keys, events.user_id.cast(pa.binary())), False)
    wrong_key = ~np.asarray(keyed.to_numpy(zero_copy_only=False), bool) & ~bad
    rejected.add(
        events.row[wrong_key],
        [
            f"message key {None if key is None else key[:64]!r} "
            f"is not the event's user_id {user!r}; "
            "produce events keyed by user_id"
            for key, user in zip(
                row_keys.filter(pa.array(wrong_key)).to_pylist(),
                events.user_id.filter(pa.array(wrong_key)).to_pylist(),
            )
        ],
    )
    bad |= wrong_key
    ahead = events.event_time - now_ms
    future = (ahead > future_tolerance_ms) & ~bad
    rejected.add(
        events.row[future],
        [f"event_time is {s / 1000:.0f}s in the future" for s in ahead[future].tolist()],
    )
    bad |= future
    out_of_range = ((events.event_time < 0) | (events.event_time > MAX_TIME_MS)) & ~bad
    rejected.add(
        events.row[out_of_range], "event_time before 1970 or after year 10889 cannot be stored"
    )
    return np.flatnonzero(~(bad | out_of_range))


@dataclass
class WindowStats:
    counts: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        c = self.counts
        ratio = c["events"] / max(1, c["windows"])
        return (
            f"events={c['events']} windows={c['windows']} (coalescing {ratio:.1f}x) "
            f"batches={c['batches']} "
            f"duplicates={c['duplicates']} too_old={c['too_old']} dead_letters={c['dead_letters']} "
            f"repartitioned={c['repartitioned']}"
        )


class StreamWorker:
    """One stream worker process: a member of the stream consumer group. Its loop, stop,
    clients and readiness are the runtime's (stream/runtime.py); it keeps the windowing."""

    def __init__(self, settings: Settings, ready_file: Path | None = None) -> None:
        self.settings = settings
        self.ready_file = ready_file
        self.metrics = StreamMetrics()
        registry = settings.schema_registry
        event_codec = AvroCodec("behavior_event", settings.events_topic, registry)
        self.events = EventDecoder(event_codec, settings.event_limits)
        self.window_codec = AvroCodec(
            "user_window", settings.windows_topic, settings.schema_registry
        )
        self.window_header = self.window_codec.framing.header()
        self.runtime = WorkerRuntime(
            settings, self, name="stream worker", group=settings.stream_group,
            topics=[settings.events_topic, settings.repartition_topic],
            # Every event of one flush interval from the first one on (so a window waits
            # at most one interval), up to max_batch_events.
            batching=Batching(
                first_wait_s=0.5, fill_s=settings.flush_interval_ms / 1000,
                step=settings.max_batch_events, most=settings.max_batch_events,
            ),
            metrics=self.metrics,
            consumer_settings={
                # Partition p of the events and of the repartition topic go to the same
                # worker: both feed the windows of partition p.
                "partition.assignment.strategy": "range",
                "fetch.max.bytes": 64 << 20,
                "max.partition.fetch.bytes": 16 << 20,
                "queued.min.messages": 200_000,
                "fetch.queue.backoff.ms": 10,  # else a 1 s pause once the queue is full
            },
        )
        self.producer = self.runtime.producer
        self.stores: dict[int, PartitionStore] = {}
        self.symbol_bound = SymbolBound(settings.symbol_table_pairs)
        self.pending: list[Message] = []
        self.stats = WindowStats()
        self.partitions = 0  # of the input topics, known once run() starts

    @property
    def consumer(self) -> Consumer:
        return self.runtime.consumer

    def run(self) -> None:
        self.partitions = self._partition_count()
        self.runtime.run(ready_file=self.ready_file)

    def stop(self) -> None:
        self.runtime.stop()

    # -- what the runtime hands over ------------------------------------------------------

    def take(self, records: list[Message]) -> None:
        self.pending += records

    def process_taken(self) -> None:
        if self.pending:
            batch, self.pending = self.pending, []
            self.process(batch)

    def backlog(self) -> bool:
        return False  # process_taken processes all that was taken

    def between_batches(self) -> None:
        pass  # all of a batch's work is in process()

    def summary(self) -> str:
        return self.stats.summary()

    def release(self) -> None:
        for store in self.stores.values():
            store.close()

    # -- one batch ------------------------------------------------------------------------

    def process(self, messages: list[Message]) -> None:
        with self.runtime.stage("decode"):
            now_ms = int(time.time() * 1000)
            # Per message, only C calls through map(): no Python bytecode per event.
            keys = pa.array(list(map(Message.key, messages)), pa.binary())
            partitions = np.fromiter(map(Message.partition, messages), np.int64, len(messages))
            topics = pa.array(list(map(Message.topic, messages)), pa.string())
            moved_here = pc.equal(topics, self.settings.repartition_topic).to_numpy(
                zero_copy_only=False
            )
            events = self.events.decode(list(map(Message.value, messages)))
            rejected = Rejected()
            rejected.add(
                np.array([i for i, _ in events.rejected], np.int64), [r for _, r in events.rejected]
            )
            valid = validate(events, keys, now_ms, self.settings.future_tolerance_ms, rejected)
            valid, elsewhere, home = self._route(
                events.row[valid], valid, keys, partitions, moved_here
            )
        with self.runtime.stage("merge"):
            windows = self._merge(events.take(valid), partitions)
        with self.runtime.stage("emit"):
            self._dead_letter(messages, rejected)
            self._repartition(messages, elsewhere, home)
            self._emit(windows, now_ms)
        self._free_symbols()
        with self.runtime.stage("commit"):
            self._commit(messages, partitions, moved_here)
        self.stats.counts["events"] += len(messages)
        self.stats.counts["batches"] += 1
        self._count_events(len(messages), int(moved_here.sum()))

    def _count_events(self, messages: int, moved_here: int) -> None:
        events = self.metrics.events
        events.labels(self.settings.events_topic).inc(messages - moved_here)
        events.labels(self.settings.repartition_topic).inc(moved_here)
        self.metrics.batch_messages.observe(messages)

    def _route(
        self, rows: np.ndarray, valid: np.ndarray, keys: pa.BinaryArray, partitions: np.ndarray,
        moved_here: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Split the valid events (valid: indices into the events; rows: their messages)
        into those on their key's partition and those elsewhere, produced with another
        partitioner: (valid ones here, messages elsewhere, their key's partitions). Events
        from the repartition topic are on theirs by construction."""
        if not self.partitions:  # process() without run(): tests
            self.partitions = self._partition_count()
        home = key_partitions(keys.take(pa.array(rows)), self.partitions)
        elsewhere = (home != partitions[rows]) & ~moved_here[rows]
        if not elsewhere.any():
            return valid, np.empty(0, np.int64), home[:0]
        return valid[~elsewhere], rows[elsewhere], home[elsewhere]

    def _repartition(
        self, messages: list[Message], elsewhere: np.ndarray, home: np.ndarray
    ) -> None:
        """Send events to their key's partition of the repartition topic; they are windowed
        when the worker of that partition reads them (this batch commits them only once
        they are flushed, with the windows)."""
        for index, partition in zip(elsewhere.tolist(), home.tolist()):
            message = messages[index]
            self.producer.produce(
                self.settings.repartition_topic,
                message.value(),
                message.key(),
                partition=partition,
                headers=message.headers(),
            )
        self.stats.counts["repartitioned"] += len(elsewhere)

    def _partition_count(self) -> int:
        """The partitions of the events topic, which the repartition and windows topics
        must share (a user's window lives at the partition number of the user's key)."""
        settings = self.settings
        names = (settings.events_topic, settings.repartition_topic, settings.windows_topic)
        metadata = self.consumer.list_topics(timeout=settings.broker_timeout_ms / 1000).topics
        counts = {name: len(metadata[name].partitions) if name in metadata else 0 for name in names}
        if len(set(counts.values())) != 1 or 0 in counts.values():
            raise ConfigError(
                f"topics {counts} (partitions) must exist with the same partition count: "
                "create the "
                "missing ones with `beat topics`, or the repartition topic with as many partitions "
                "as the events topic (BEAT_REPARTITION_TOPIC)"
            )
        return counts[settings.events_topic]

    def _merge(self, events: EventColumns, partitions: np.ndarray) -> list[tuple[int, Window]]:
        """Merged windows of the users of events (the batch's valid ones), with each one's
        partition; partitions holds the partition of every message of the batch."""
        if not len(events):
            return []
        users = pc.dictionary_encode(events.user_id)
        user_ids = users.dictionary.to_pylist()
        user_code = users.indices.to_numpy().astype(np.int64)
        user_partition = np.empty(len(user_ids), np.int64)
        user_partition[user_code] = partitions[events.row]
        keys = [u.encode() for u in user_ids]
        stored: list[Window | None] = [None] * len(keys)
        for partition in np.unique(user_partition).tolist():
            members = np.flatnonzero(user_partition == partition).tolist()
            for i, window in zip(
                members, self.stores[partition].get_many([keys[i] for i in members])
            ):
                stored[i] = window
        new = NewEvents(
            user_code,
            events.event_time,
            event_id_hashes(events.event_id),
            events.action,
            events.property,
            events.value,
        )
        merged, counts = merge_batch(
            stored, user_ids, new, self.settings.max_events, self.settings.window_ms
        )
        self.stats.counts["duplicates"] += counts.duplicates
        self.stats.counts["too_old"] += counts.too_old
        return list(zip(user_partition.tolist(), merged))

    def _emit(self, windows: list[tuple[int, Window]], now_ms: int) -> None:
        """Send every merged window (even an unchanged one: after a crash, the replayed
        events' windows may never have reached beat.windows), store it, and seal."""
        topic = self.settings.windows_topic
        by_partition: dict[int, tuple[list[bytes], list[Window]]] = {}
        for partition, window in windows:
            key = window.user_id.encode()
            value = self.window_header + encode_window_body(window, now_ms)
            self.producer.produce(topic, value, key, partition=partition)
            keys, merged = by_partition.setdefault(partition, ([], []))
            keys.append(key)
            merged.append(window)
        for partition, (keys, merged) in by_partition.items():
            self.stores[partition].put_many(keys, merged)
        self.stats.counts["windows"] += len(windows)
        self.metrics.windows.inc(len(windows))
        self.seal(set(by_partition))

    def _free_symbols(self) -> None:
        """Free the symbol pairs no window uses once the table passes its bound. Here every
        window is in a store: the batch's merged ones have just been put there."""
        started = time.perf_counter()
        freed = self.symbol_bound.enforce(self.stores.values())
        if freed is not None:
            log.info(
                "stream worker: freed %d symbol pairs no window uses in %.0f ms; %d kept, "
                "next reclaim above %d", freed, (time.perf_counter() - started) * 1000,
                len(SYMBOLS), self.symbol_bound.bound,
            )

    def seal(self, partitions: set[int]) -> None:
        """Put the batch's windows below the partitions' high watermark, on Tansu too, before
        its offsets can be committed: a tombstone of SEAL_KEY in a record batch of its own
        after the windows are flushed (why: stream/broker.py)."""
        self.runtime.flush()
        for partition in partitions:
            self.producer.produce(
                self.settings.windows_topic,
                None,
                SEAL_KEY,
                partition=partition,
            )
        self.runtime.flush()

    def _dead_letter(self, messages: list[Message], rejected: Rejected) -> None:
        for index, reason in zip(rejected.index, rejected.reason):
            message = messages[index]
            source = (message.topic(), message.partition(), message.offset())
            letter = dead_letter(
                message.key(), message.value(), reason, source, self.settings.max_message_bytes
            )
            self.producer.produce(
                self.settings.dead_letter_topic, letter.value, letter.key, headers=letter.headers,
            )
        self.stats.counts["dead_letters"] += len(rejected.index)
        self.metrics.dead_lettered(rejected.reason)

    def _commit(
        self, messages: list[Message], partitions: np.ndarray, moved_here: np.ndarray
    ) -> None:
        """Commit past the last message of each topic partition in the batch (once every
        message the batch produced is delivered)."""
        topic_partition = partitions + moved_here * (1 << 32)  # one code per topic partition
        found, from_end = np.unique(topic_partition[::-1], return_index=True)
        last = len(partitions) - 1 - from_end  # index of each one's last message
        self.runtime.commit([
            TopicPartition(messages[i].topic(), messages[i].partition(), messages[i].offset() + 1)
            for i in last.tolist()
        ])

    # -- partitions come and go ---------------------------------------------------------------

    def on_assign(self, partitions: list[TopicPartition]) -> None:
        new = sorted({tp.partition for tp in partitions} - set(self.stores))  # both input topics
        if not new:
            return
        # One reader for them all: a new consumer takes about half a second to fetch its first
        # record on Tansu (PartitionReader), so a reader per partition made a worker's start
        # slower by that for each partition it was given.
        with PartitionReader(self.settings) as reader:
            for partition in new:
                self.stores[partition] = self.restore(partition, reader)

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        # Finish and commit what was taken from the partitions before they move.
        self.process_taken()
        self._drop(partitions)

    def on_lost(self, partitions: list[TopicPartition]) -> None:
        # The group has moved on: the partitions' uncommitted events are another worker's.
        lost = {tp.partition for tp in partitions}
        self.pending = [m for m in self.pending if m.partition() not in lost]
        self._drop(partitions)

    def _drop(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            store = self.stores.pop(tp.partition, None)
            if store is not None:
                store.close()

    def restore(self, partition: int, reader: PartitionReader) -> PartitionStore:
        """A store holding the latest window of every user of the partition, read from
        beat.windows to its end."""
        settings = self.settings
        store = open_store(
            settings.state_store, settings.data_dir, settings.stream_group, partition
        )
        for latest in read_compacted(settings, settings.windows_topic, partition, reader=reader):
            for key in [k for k, v in latest.items() if v is None]:  # tombstones and seals
                store.delete(key)
                del latest[key]
            store.put_many(
                list(latest),
                [Window.from_record(self.window_codec.decode(v)) for v in latest.values()],
            )
        log.info("stream worker: restored %d windows of partition %d", len(store), partition)
        return store


def run_worker(settings: Settings, ready_file: Path | None = None) -> None:
    """Run a stream worker until SIGINT/SIGTERM, which finish the batch in hand, commit it
    and leave the group."""
    worker = StreamWorker(settings, ready_file)
    stop_on_signals(worker.stop)
    worker.run()
