"""`beat refresh`: re-encode users who have gone quiet, as of now.

An embedding is computed as of the moment it is written (ages count back from that time,
so it knows how long its user has been silent). The encoder workers write one when a
user's window changes, so a user who stops acting keeps an embedding as of their last
event, which says nothing of the silence since. Run this job on a schedule (daily, say):
it reads the newest window of every user from the compacted ``beat.windows``, and
re-encodes and writes, as of now, those whose newest event is older than ``idle``.
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


def latest_windows(settings: Settings) -> dict[str, Window]:
    """The newest window of every user in beat.windows."""
    codec = AvroCodec("user_window", settings.windows_topic, settings.schema_registry_url)
    admin = AdminClient(client_config(settings))
    partitions = admin.list_topics(settings.windows_topic, timeout=10).topics[settings.windows_topic].partitions
    windows: dict[str, Window] = {}
    for partition in partitions:
        for latest in read_compacted(settings, settings.windows_topic, partition):
            for key, value in latest.items():
                if value is None:  # a tombstone, or a stream worker's seal
                    windows.pop(key.decode(errors="replace"), None)
                else:
                    window = Window.from_record(codec.decode(value))
                    windows[window.user_id] = window
    return windows


def refresh_idle(settings: Settings, worker: EncoderWorker, idle_ms: int) -> RefreshSummary:
    """Re-encode, as of now, every user whose newest event is more than idle_ms old."""
    began = time.monotonic()
    windows = latest_windows(settings)
    cutoff_ms = int(time.time() * 1000) - idle_ms
    idle = [w for w in windows.values() if len(w) and int(w.event_time[-1]) < cutoff_ms]
    for start in range(0, len(idle), settings.max_batch):
        chunk = idle[start : start + settings.max_batch]
        as_of = np.full(len(chunk), int(time.time() * 1000))
        rows = worker.encode([w.event_window() for w in chunk], [w.user_id for w in chunk], as_of)
        worker.write_online(rows)
        worker.publish(rows)
    worker.producer.flush()
    summary = RefreshSummary(len(windows), len(idle), time.monotonic() - began)
    log.info("refresh: %s", summary)
    return summary
