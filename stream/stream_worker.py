"""Stream workers: keep every user's rolling window and emit the windows that changed.

A faust-streaming app. It reads ``beat.events`` in batches of up to one flush interval
(``take_events``), merges each user's new events into the window kept in a faust Table
(memory or RocksDB, with a changelog topic for recovery), and sends each changed user's
window once per batch to ``beat.windows``. Events that cannot be decoded or validated go
to the dead-letter topic with the reason in the ``dlq.reason`` header.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import faust
from faust.streams import _current_event

from stream.broker import dead_letter_headers
from stream.codec import AvroCodec, DecodeError
from stream.config import Settings
from stream.faust_transport import broker_url
from stream.window import Window, merge

log = logging.getLogger(__name__)

STATE_TABLE = "user-windows"
MAX_BATCH_EVENTS = 50_000
# Key of the tombstones that seal each batch's changelog writes (see seal_changelog).
# No user has an empty user_id (validate() rejects it), so it never names a window.
CHANGELOG_SEAL_KEY = b""


class InvalidEvent(ValueError):
    """A decoded event breaks the contract of schemas/behavior_event.avsc."""


def validate(event: dict, key: bytes | None, now_ms: int, future_tolerance_ms: int) -> dict:
    """The event with event_time as epoch ms; raises InvalidEvent with the reason."""
    for required in ("user_id", "event_id", "action"):
        if not event[required]:
            raise InvalidEvent(f"missing {required}")
    # A user's events must share a partition: the window state lives with the partition.
    if key is None or key.decode("utf-8", "replace") != event["user_id"]:
        raise InvalidEvent(
            f"message key {None if key is None else key[:64]!r} is not the event's user_id "
            f"{event['user_id']!r}; produce events keyed by user_id"
        )
    event_ms = round(event["event_time"].timestamp() * 1000)
    if event_ms > now_ms + future_tolerance_ms:
        raise InvalidEvent(f"event_time is {(event_ms - now_ms) / 1000:.0f}s in the future")
    return {**event, "event_time": event_ms}


def write_as_part_of(event: faust.EventT) -> None:
    """Make the table writes that follow in this task go to ``event``'s partition.

    A faust table writes its changelog (and, with RocksDB, its store) to the partition
    of the current event, and after take_events() the current event is the batch's last.
    Only the task's context variable is set: ``Stream._set_current_event`` would also
    overwrite ``stream.current_event``, which take_events()' background reader pairs
    with the next value it buffers; it then buffers an old event in place of the new one,
    which is never processed nor acked (a lost event, found by tests/test_recovery.py).
    """
    _current_event.set(weakref.ref(event))


async def seal_changelog(app: faust.App, table: faust.Table, partitions: set[int]) -> None:
    """Make the batch's changelog writes recoverable before its offsets can be committed.

    Tansu reports a partition's high watermark as the base offset of its last record
    batch + 1, and faust's recovery reads a changelog only up to the high watermark: it
    would miss every record but the first of the last batch, losing the newest window
    of those users although their events' offsets were committed. A tombstone of a key
    no user has, sent in a batch of its own after the writes are flushed, puts every
    real write below the watermark. On Kafka it costs one tiny record per partition and
    batch.
    """
    await flush_producer(app)
    for partition in partitions:
        await table.changelog_topic.send(key=CHANGELOG_SEAL_KEY, value=None, partition=partition)
    await flush_producer(app)


async def flush_producer(app: faust.App) -> None:
    """Send everything buffered, table changelog writes included.

    faust's ProducerBuffer.flush() returns as soon as no message left its buffer for
    0.1 s, which on a busy CPU happens with writes still in it; a seal sent then would
    precede them.
    """
    await app.producer.flush()
    while app.producer.buffer.size:
        await app.producer.flush()


@dataclass
class WindowStats:
    counts: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        c = self.counts
        ratio = c["events"] / max(1, c["windows"])
        return (
            f"events={c['events']} windows={c['windows']} (coalescing {ratio:.1f}x) "
            f"duplicates={c['duplicates']} too_old={c['too_old']} dead_letters={c['dead_letters']}"
        )


def create_app(settings: Settings) -> faust.App:
    """The faust app of the stream workers, configured from settings."""
    datadir = settings.data_dir / "stream-worker"
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.stream_group,
        broker=broker_url(settings.bootstrap_servers, settings.fetch_max_wait_ms),
        store=settings.state_store,
        datadir=str(datadir),
        web_enabled=False,
        topic_partitions=settings.partitions,
        topic_allow_declare=True,
        table_standby_replicas=0,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.session_timeout_ms / 1000,
        broker_heartbeat_interval=settings.session_timeout_ms / 10_000,
        broker_rebalance_timeout=2 * settings.session_timeout_ms / 1000,
    )
    raw = {"key_serializer": "raw", "value_serializer": "raw"}
    events_topic = app.topic(settings.events_topic, **raw)
    windows_topic = app.topic(settings.windows_topic, **raw)
    dead_letter_topic = app.topic(settings.dead_letter_topic, **raw)
    table = app.Table(STATE_TABLE, key_type=bytes, value_type=bytes, partitions=settings.partitions)
    event_codec = AvroCodec("behavior_event", settings.events_topic, settings.schema_registry_url)
    window_codec = AvroCodec("user_window", settings.windows_topic, settings.schema_registry_url)
    stats = WindowStats()

    async def valid_records(batch: list[faust.EventT], now_ms: int) -> dict[str, list[tuple[dict, faust.EventT]]]:
        """The batch's valid events grouped by user, in arrival order; the others are
        dead-lettered."""
        by_user: dict[str, list[tuple[dict, faust.EventT]]] = {}
        for event in batch:
            message = event.message
            try:
                record = validate(event_codec.decode(message.value), message.key, now_ms, settings.future_tolerance_ms)
            except (DecodeError, InvalidEvent) as err:
                stats.counts["dead_letters"] += 1
                await dead_letter_topic.send(
                    key=message.key, value=message.value,
                    headers=dead_letter_headers(str(err), message.topic, message.partition, message.offset),
                )
                continue
            by_user.setdefault(record["user_id"], []).append((record, event))
        return by_user

    def update_window(user_id: str, records: list[dict], now_ms: int) -> None:
        """Merge a user's new events into the stored window; store it and emit it.

        The window is emitted even when nothing changed (only duplicates): after a crash
        the events since the last commit are replayed, and the window message of their
        first processing may never have reached beat.windows.
        """
        key = user_id.encode()
        stored = table.get(key)
        window = Window.from_state(stored) if stored else Window.empty(user_id)
        window, counts = merge(window, Window.from_events(user_id, records), settings.max_events, settings.window_ms)
        table[key] = window.to_state()
        # Buffered, not awaited one by one: seal_changelog() flushes the producer.
        windows_topic.send_soon(key=key, value=window_codec.encode(window.to_record(now_ms)))
        stats.counts["windows"] += 1
        stats.counts["too_old"] += counts.too_old
        stats.counts["duplicates"] += counts.duplicates

    async def process(batch: list[faust.EventT]) -> None:
        now_ms = int(time.time() * 1000)
        by_user = await valid_records(batch, now_ms)
        stats.counts["events"] += len(batch)
        for user_id, records in by_user.items():
            write_as_part_of(records[-1][1])
            update_window(user_id, [record for record, _ in records], now_ms)
        await seal_changelog(app, table, {records[-1][1].message.partition for records in by_user.values()})

    @app.agent(events_topic)
    async def update_windows(stream: faust.StreamT) -> None:
        async for batch in stream.take_events(MAX_BATCH_EVENTS, within=settings.flush_interval_ms / 1000):
            processing = asyncio.ensure_future(process(batch))
            try:
                await asyncio.shield(processing)
            except asyncio.CancelledError:
                # A stopping worker cancels its agent, and take_events() then acks the
                # whole batch, which the final commit covers: finish and seal it first,
                # or the batch's events are lost to the worker taking over.
                await processing
                raise

    @app.timer(10.0)
    async def report() -> None:
        log.info("stream worker: %s", stats.summary())

    app.beat_stats = stats  # type: ignore[attr-defined]
    return app


def run_worker(settings: Settings, loglevel: str = "warn", ready_file: Path | None = None) -> None:
    """Run a stream worker until SIGINT/SIGTERM (faust handles both gracefully).

    ready_file is created once the worker holds partitions and has recovered its state.
    """
    app = create_app(settings)
    if ready_file:
        @app.on_rebalance_complete.connect
        async def _mark_ready(sender: faust.App, **kwargs: object) -> None:
            ready_file.touch()
    quiet_worker(app, loglevel).execute_from_commandline()


def quiet_worker(app: faust.App, loglevel: str) -> faust.Worker:
    """A faust Worker without its terminal spinner.

    At log levels of WARN and above the spinner sets the root logger to DEBUG, so every
    debug call of aiokafka and faust builds a log record: about 10 % of the worker's CPU.
    """
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    worker.spinner = None
    return worker
