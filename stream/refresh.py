"""`beat refresh`: re-encode users who have gone quiet, as of now.

An embedding is computed as of the moment it is written (ages count back from that time,
so it knows how long its user has been silent). The encoder workers write one when a
user's window changes, so a user who stops acting keeps an embedding as of their last
event, which says nothing of the silence since. Run this job on a schedule (daily, say):
it reads the newest window of every user from the compacted ``beat.windows``, partition by
partition, and re-encodes and writes, as of now, those whose newest event is older than
``idle``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
from confluent_kafka.admin import AdminClient

from stream.broker import client_config, read_compacted
from stream.codec import AvroCodec
from stream.config import Settings
from stream.encoder_worker import EncoderWorker
from stream.window import Window

log = logging.getLogger(__name__)


@dataclass
class RefreshSummary:
    users: int  # with a window in beat.windows
    refreshed: int  # idle ones, re-encoded as of now
    seconds: float


def partition_windows(settings: Settings, partition: int) -> dict[bytes, bytes]:
    """The newest window message of every user of one partition of beat.windows (raw)."""
    latest: dict[bytes, bytes] = {}
    for chunk in read_compacted(settings, settings.windows_topic, partition):
        for key, value in chunk.items():
            if value is None:  # a tombstone, or a stream worker's seal
                latest.pop(key, None)
            else:
                latest[key] = value
    return latest


def refresh_idle(settings: Settings, worker: EncoderWorker, idle_ms: int) -> RefreshSummary:
    """Re-encode, as of now, every user whose newest event is more than idle_ms old.

    Streams partition by partition (one partition's window messages in memory at a time)
    and decodes and encodes in steps of max_batch users, logging progress and the rate."""
    began = time.monotonic()
    codec = AvroCodec("user_window", settings.windows_topic, settings.schema_registry_url)
    topic = settings.windows_topic
    admin = AdminClient(client_config(settings))
    partitions = sorted(admin.list_topics(topic, timeout=10).topics[topic].partitions)
    cutoff_ms = int(time.time() * 1000) - idle_ms
    users = refreshed = 0
    for partition in partitions:
        values = list(partition_windows(settings, partition).values())
        users += len(values)
        step = settings.max_batch
        for start in range(0, len(values), step):
            windows = [Window.from_record(codec.decode(v)) for v in values[start : start + step]]
            idle = [w for w in windows if len(w) and int(w.event_time[-1]) < cutoff_ms]
            if idle:
                as_of = np.full(len(idle), int(time.time() * 1000))
                inputs = [w.event_window() for w in idle]
                rows = worker.encode(inputs, [w.user_id for w in idle], as_of)
                worker.write_online(rows)
                worker.publish(rows)
                refreshed += len(idle)
        worker.producer.flush()
        seconds = time.monotonic() - began
        log.info("refresh: partition %d done (%d of %d): %d users read, %d re-encoded, "
                 "%.0f users/s", partition, partitions.index(partition) + 1, len(partitions),
                 users, refreshed, users / max(seconds, 1e-9))
    summary = RefreshSummary(users, refreshed, time.monotonic() - began)
    log.info("refresh: %s", summary)
    return summary
