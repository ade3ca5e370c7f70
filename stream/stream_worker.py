"""Stream workers: keep every user's rolling window and emit the windows that changed.

A faust-streaming app. It reads ``beat.events`` in batches of up to one flush interval
(``take_events``), merges each user's new events into the window kept in a faust Table
(memory or RocksDB, with a changelog topic for recovery), and sends each changed user's
window once per batch to ``beat.windows``. Events that cannot be decoded or validated go
to the dead-letter topic with the reason in the ``dlq.reason`` header.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import faust

from stream.broker import dead_letter_headers
from stream.codec import AvroCodec, DecodeError
from stream.config import Settings
from stream.faust_transport import broker_url
from stream.window import Window, merge

log = logging.getLogger(__name__)

STATE_TABLE = "user-windows"
MAX_BATCH_EVENTS = 50_000


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


def create_app(settings: Settings, future_tolerance_ms: int = 3_600_000) -> faust.App:
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

    @app.agent(events_topic)
    async def update_windows(stream: faust.StreamT) -> None:
        async for batch in stream.take_events(MAX_BATCH_EVENTS, within=settings.flush_interval_ms / 1000):
            now_ms = int(time.time() * 1000)
            by_user: dict[str, list[dict]] = {}
            last_event: dict[str, faust.EventT] = {}
            for event in batch:
                message = event.message
                try:
                    record = validate(event_codec.decode(message.value), message.key, now_ms, future_tolerance_ms)
                except (DecodeError, InvalidEvent) as err:
                    stats.counts["dead_letters"] += 1
                    await dead_letter_topic.send(
                        key=message.key, value=message.value,
                        headers=dead_letter_headers(str(err), message.topic, message.partition, message.offset),
                    )
                    continue
                by_user.setdefault(record["user_id"], []).append(record)
                last_event[record["user_id"]] = event
            stats.counts["events"] += len(batch)

            for user_id, records in by_user.items():
                key = user_id.encode()
                stored = table.get(key)
                window = Window.from_state(stored) if stored else Window.empty(user_id)
                window, counts = merge(window, Window.from_events(user_id, records), settings.max_events, settings.window_ms)
                # The table writes its changelog to the partition of the current event;
                # after take_events() that is the user's own newest event.
                stream._set_current_event(last_event[user_id])
                table[key] = window.to_state()
                await windows_topic.send(key=key, value=window_codec.encode(window.to_record(now_ms)))
                stats.counts["windows"] += 1
                stats.counts["too_old"] += counts.too_old
                stats.counts["duplicates"] += counts.duplicates

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
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    worker.execute_from_commandline()
