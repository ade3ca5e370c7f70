"""Encoder workers: re-encode every updated user with BEAT and publish the embeddings.

A consumer-group member on ``beat.windows``. Each micro-batch is up to ``max_batch``
messages or ``max_wait_ms``; only the latest window per user is encoded. Embeddings go
to the Feast online store and to ``beat.embeddings``; the batch's offsets are committed
only after both writes (at-least-once; the writes are idempotent per user and time).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from confluent_kafka import Consumer, Message, Producer

from model import BeatEncoder, EventWindow
from stream.broker import consumer_config, dead_letter_headers, producer_config, records_in
from stream.codec import AvroCodec, DecodeError
from stream.config import ConfigError, Settings, check_model_fits
from stream.feast_sink import EmbeddingRows, FeatureSink, utc_now
from stream.window import Window

log = logging.getLogger(__name__)


@dataclass
class EncoderStats:
    """Totals since start; freshness and stage times since the last summary."""

    users: int = 0
    batches: int = 0
    dead_letters: int = 0
    freshness_ms: list[float] = field(default_factory=list)
    stage_s: Counter = field(default_factory=Counter)
    interval_batches: int = 0

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.stage_s[name] += time.perf_counter() - start

    def summary(self) -> str:
        p50, p99 = np.percentile(self.freshness_ms, [50, 99]) if self.freshness_ms else (0.0, 0.0)
        per_batch = " ".join(f"{k}={v * 1000 / max(1, self.interval_batches):.0f}" for k, v in self.stage_s.items())
        self.freshness_ms.clear()
        self.stage_s.clear()
        self.interval_batches = 0
        return (
            f"users={self.users} batches={self.batches} dead_letters={self.dead_letters} "
            f"freshness p50={p50:.0f}ms p99={p99:.0f}ms; ms per batch: {per_batch}"
        )


class EncoderWorker:
    def __init__(self, settings: Settings, encoder: BeatEncoder, sink: FeatureSink) -> None:
        self.settings = settings
        self.encoder = encoder
        self.sink = sink
        self.window_codec = AvroCodec("user_window", settings.windows_topic, settings.schema_registry_url)
        self.embedding_codec = AvroCodec("user_embedding", settings.embeddings_topic, settings.schema_registry_url)
        self.consumer = Consumer(consumer_config(settings, settings.encoder_group))
        self.producer = Producer(producer_config(settings))
        self.stats = EncoderStats()
        self.stopping = threading.Event()

    def run(self, report_every_s: float = 10.0, ready_file: Path | None = None) -> None:
        """Encode until stop() (or SIGINT/SIGTERM when run from the CLI).

        ready_file is created once the worker has joined its group and holds partitions.
        """
        def on_assign(consumer: Consumer, partitions: list) -> None:
            if ready_file:
                ready_file.touch()

        self.consumer.subscribe([self.settings.windows_topic], on_assign=on_assign)
        next_report = time.monotonic() + report_every_s
        try:
            while not self.stopping.is_set():
                messages = self.consumer.consume(self.settings.max_batch, self.settings.max_wait_ms / 1000)
                if messages:
                    self.process(messages)
                if time.monotonic() >= next_report:
                    log.info("encoder worker: %s", self.stats.summary())
                    next_report += report_every_s
        finally:
            self.consumer.close()
            self.producer.flush(10)

    def stop(self) -> None:
        self.stopping.set()

    def process(self, messages: list[Message]) -> None:
        with self.stats.stage("decode"):
            windows = self._latest_windows(messages)
        if windows:
            self.encode_and_write(windows)
        with self.stats.stage("commit"):
            self.producer.flush()
            self.consumer.commit(asynchronous=False)
        self.stats.interval_batches += 1

    def _latest_windows(self, messages: list[Message]) -> dict[str, EventWindow]:
        """The newest window of each user (later offsets win), as model inputs."""
        latest: dict[bytes, Message] = {}
        for message in records_in(messages, skip_tombstones=True):  # seals are tombstones
            latest[message.key()] = message
        windows = {}
        for message in latest.values():
            try:
                window = Window.from_record(self.window_codec.decode(message.value()))
            except (DecodeError, ValueError) as err:
                self._dead_letter(message, str(err))
                continue
            if not len(window):
                self._dead_letter(message, "window has no events")
                continue
            windows[window.user_id] = window.event_window()
        return windows

    def encode_and_write(self, windows: dict[str, EventWindow]) -> None:
        """Encode the users' windows as of now; write the rows to Feast and beat.embeddings."""
        # Encoded as of now (the time the rows carry), so that the embedding knows how long each
        # user has been silent when it is written.
        now = utc_now()
        as_of_ms = int(now.timestamp() * 1000)  # = rows.updated_at_ms, what readers see
        with self.stats.stage("encode"):
            embeddings = self.encoder.encode(list(windows.values()), as_of_ms=as_of_ms)
        rows = EmbeddingRows(
            user_id=list(windows),
            embedding=embeddings,
            model_version=self.encoder.model_version,
            event_count=np.array([len(w) for w in windows.values()], np.int64),
            last_event_time_ms=np.array([w.event_time_ms[-1] for w in windows.values()], np.int64),
            updated_at=now,
        )
        with self.stats.stage("feast"):
            self.sink.write(rows)
        with self.stats.stage("publish"):
            self._publish(rows)
        self.stats.users += len(windows)
        self.stats.batches += 1
        written_ms = int(time.time() * 1000)  # event time -> both writes done
        self.stats.freshness_ms.extend((written_ms - rows.last_event_time_ms).tolist())

    def _publish(self, rows: EmbeddingRows) -> None:
        for i, user_id in enumerate(rows.user_id):
            value = self.embedding_codec.encode({
                "user_id": user_id,
                "model_version": rows.model_version,
                "embedding": rows.embedding[i].tolist(),
                "event_count": int(rows.event_count[i]),
                "last_event_time": int(rows.last_event_time_ms[i]),
                "updated_at": rows.updated_at_ms,
            })
            self.producer.produce(self.settings.embeddings_topic, key=user_id.encode(), value=value)

    def _dead_letter(self, message: Message, reason: str) -> None:
        self.stats.dead_letters += 1
        self.producer.produce(
            self.settings.dead_letter_topic, key=message.key(), value=message.value(),
            headers=dead_letter_headers(reason, message.topic(), message.partition(), message.offset()),
        )


def load_worker(settings: Settings) -> EncoderWorker:
    """An encoder worker with the model of BEAT_MODEL_DIR and the Feast sink."""
    if settings.model_dir is None:
        raise ConfigError("BEAT_MODEL_DIR: no model; set it or pass --model-dir (see `beat model init`)")
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    encoder = BeatEncoder.from_pretrained(settings.model_dir, device=settings.device, max_batch=settings.encode_batch)
    check_model_fits(settings, encoder.model.config)
    log.info("encoder: model %s on %s", encoder.model_version, settings.device)
    return EncoderWorker(settings, encoder, FeatureSink(settings))


def run_worker(settings: Settings, ready_file: Path | None = None) -> None:
    """Load the model and Feast, then encode until SIGINT/SIGTERM."""
    worker = load_worker(settings)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: worker.stop())
    worker.run(ready_file=ready_file)
