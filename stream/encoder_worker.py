"""Encoder workers: re-encode every updated user with BEAT and publish the embeddings.

A consumer-group member on ``beat.windows``. It reads what the broker has (waiting up to
``max_wait_ms`` for the first message when it has nothing else to do, and taking up to
``read_ahead`` messages) into its pending users (``Pending``): only each user's newest
window is kept, so a backlog costs work per user, not per message. Each step encodes the
``max_batch`` users pending longest, writes them to the Feast online store, publishes them
to ``beat.embeddings`` (as of the time stream/as_of.py gives) and commits each partition
up to its oldest window still pending; then it reads again. Under overload a change thus
waits one turn through the pending users, T = U / R (U users pending, R users encoded per
second), where encoding a whole backlog before reading again made a change that came
just after a read wait the rest of that pass and all of the next one, up to 2T.
The worker runtime (stream/runtime.py) takes the batches, runs the loop, stops and
commits; this module holds the stages: decode, encode, write, publish. On a GPU the
windows of the next step (the users pending longest) are decoded in a background thread
while this step encodes (DecodeAhead), as BeatEncoder stages its next micro-batch.

Model versions (stream/model_versions.py): a worker serves BEAT_MODEL_DIR into the view
``user_embedding``, or a published version into that version's own view with that
version's consumer group. One that follows the current version checks, after each batch is
committed (or given up), whether another version has become current; if so it loads it,
leaves the old version's group and joins the new one's, which carries on from the offsets
the new version's backfill committed. A batch is thus encoded, written and committed by
one version only, and a view only ever holds rows of its own version.

Nothing is lost (at-least-once): the batch's offsets are committed only after every row is
in the online store and every message (embeddings and dead letters) is delivered. A
failing online store is retried with backoff, the batch in hand, nothing committed, and
the worker logs what waits; once the store answers, the worker carries on where it was
and catches up. A failed delivery stops the worker without committing (a restart reads
the batch again), with exit code 3 like the stream worker's; so does a SIGTERM that the
broker does not let finish within BEAT_STOP_GRACE_MS (a frozen broker). Every write is
idempotent: the same window gives the same row, and Redis keeps a row only when its
timestamp is newer.
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice, repeat
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from confluent_kafka import Consumer, Message, TopicPartition
from safetensors import SafetensorError

from model import BeatEncoder, EventWindow
from stream.as_of import AsOfClock
from stream.avro_binary import binary_array, strings, varints, write_long, write_string, zigzag
from stream.broker import check_reachable, dead_letter_headers
from stream.codec import AvroCodec, DecodeError
from stream.config import ConfigError, Settings, check_model_fits
from stream.feast_sink import EmbeddingRows, FeatureSink
from stream.model_versions import ModelVersions, version_group, view_name
from stream.observability import EncoderMetrics
from stream.runtime import Batching, WorkerRuntime, stop_on_signals
from stream.window import record_event_window

log = logging.getLogger(__name__)


@dataclass
class EncoderStats:
    """Totals since start; freshness since the last summary."""

    users: int = 0
    batches: int = 0
    dead_letters: int = 0
    freshness_ms: list[float] = field(default_factory=list)

    def summary(self) -> str:
        p50, p99 = np.percentile(self.freshness_ms, [50, 99]) if self.freshness_ms else (0.0, 0.0)
        self.freshness_ms.clear()
        return (
            f"users={self.users} batches={self.batches} dead_letters={self.dead_letters} "
            f"freshness p50={p50:.0f}ms p99={p99:.0f}ms"
        )


@dataclass
class Batch:
    """Window messages taken together: the newest per user, and where each partition ends."""

    latest: dict[bytes, Message] = field(default_factory=dict)  # user key -> newest window
    ends: dict[int, int] = field(default_factory=dict)  # partition -> offset past its last
    messages: int = 0
    windows: int = 0  # messages but seals and deletions

    def add(self, records: list[Message]) -> None:
        """Add records (no errors nor end-of-partition reports: records_in's)."""
        self.messages += len(records)
        partitions = np.fromiter(map(Message.partition, records), np.int64, len(records))
        offsets = np.fromiter(map(Message.offset, records), np.int64, len(records))
        for partition in np.unique(partitions).tolist():
            end = int(offsets[partitions == partition].max()) + 1
            self.ends[partition] = max(self.ends.get(partition, 0), end)
        windows = [m for m in records if m.value() is not None]  # seals are tombstones
        self.windows += len(windows)
        self.latest.update(zip(map(Message.key, windows), windows))


class Pending:
    """Users whose newest window is not encoded yet, in the order they became pending
    (oldest first), and where each partition's reading has come to.

    A user's entry is its newest window message and the offset of its oldest one not yet
    encoded: a partition is committable up to the oldest such offset of its pending users
    (everything before it is encoded or superseded by a window encoded since), or to its
    end when none is pending. Within a partition, users become pending in offset order, so
    the first pending user met in the dict's order holds its partition's oldest offset."""

    def __init__(self) -> None:
        self.users: dict[bytes, tuple[Message, int]] = {}  # key -> (newest, oldest offset)
        self.ends: dict[int, int] = {}  # partition -> offset past the last message read
        self.messages = 0  # read since the last step, for the metrics
        self.windows = 0

    def __bool__(self) -> bool:
        return bool(self.users) or self.messages > 0

    def add(self, records: list[Message]) -> None:
        """Add records (no errors nor end-of-partition reports: records_in's)."""
        self.messages += len(records)
        for message in records:
            partition, offset = message.partition(), message.offset()
            self.ends[partition] = max(self.ends.get(partition, 0), offset + 1)
            if message.value() is None:  # seals are tombstones: an offset, not a window
                continue
            self.windows += 1
            held = self.users.get(message.key())
            self.users[message.key()] = (message, held[1] if held else offset)  # keeps its place

    def peek_oldest(self, count: int) -> list[Message]:
        """The newest windows of the count users pending longest: take_oldest's next batch,
        unless new windows arrive first."""
        return [newest for newest, _ in islice(self.users.values(), count)]

    def take_oldest(self, count: int) -> tuple[Batch, dict[bytes, tuple[Message, int]]]:
        """The count users pending longest, as a batch whose ends are the offsets committable
        once they are written; and their entries, for put_back if the step is given up."""
        taken = {key: self.users.pop(key) for key in list(islice(self.users, count))}
        batch = Batch({key: newest for key, (newest, _) in taken.items()}, self.committable(),
                      self.messages, self.windows)  # fmt: skip
        self.messages = self.windows = 0
        return batch, taken

    def committable(self) -> dict[int, int]:
        """Partition -> offset up to which everything read is encoded (or is a seal)."""
        oldest: dict[int, int] = {}
        for newest, offset in self.users.values():
            oldest.setdefault(newest.partition(), offset)
            if len(oldest) == len(self.ends):
                break
        return {p: oldest.get(p, end) for p, end in self.ends.items()}

    def put_back(self, taken: dict[bytes, tuple[Message, int]]) -> None:
        """Users of a step given up, pending first again (a newer window read meanwhile
        stays theirs); those of partitions no longer held are left out."""
        kept = {}
        for key, (newest, offset) in taken.items():
            if newest.partition() in self.ends:
                kept[key] = (self.users.pop(key, (newest,))[0], offset)
        self.users = {**kept, **self.users}

    def drop(self, partitions: set[int]) -> None:
        """Forget partitions moved to another member: it reads them from the commit."""
        self.users = {key: entry for key, entry in self.users.items()
                      if entry[0].partition() not in partitions}  # fmt: skip
        for partition in partitions:
            self.ends.pop(partition, None)


Decoded = tuple[str, EventWindow] | str  # (user_id, window), or why it cannot be encoded


def decode_window(codec: AvroCodec, value: bytes | None) -> Decoded:
    """A window message's user and model input, or the reason it goes to the dead letters."""
    try:
        record = codec.decode(value)
        window = record_event_window(record)
    except (DecodeError, ValueError) as err:
        return str(err)
    if not len(window):
        return "window has no events"
    return record["user_id"], window


class DecodeAhead:
    """The next step's windows, decoded in a background thread while this step encodes.

    On a GPU the host would otherwise decode a step's windows (fastavro: about 0.1 ms a
    window here, as long as a GPU takes to encode one) while the GPU waits; the decode
    thread runs while the encoding thread waits on the GPU. On CPU both would share the
    cores, as BeatEncoder's staging thread did, measured slower: it is used on CUDA only.
    A window decoded ahead is kept under its message's (partition, offset) and used only
    if that very message is taken next; a dead letter is written when it is, so once.
    """

    def __init__(self, codec: AvroCodec) -> None:
        self.codec = codec
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="beat-decode")
        self.ahead: Future[dict[tuple[int, int], Decoded]] | None = None

    def start(self, messages: list[Message]) -> None:
        self.ahead = self.pool.submit(self._decode, messages)

    def take(self) -> dict[tuple[int, int], Decoded]:
        """What the last start() decoded, once it is done; empty without one."""
        ahead, self.ahead = self.ahead, None
        return ahead.result() if ahead else {}

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _decode(self, messages: list[Message]) -> dict[tuple[int, int], Decoded]:
        return {(m.partition(), m.offset()): decode_window(self.codec, m.value())
                for m in messages}  # fmt: skip


@dataclass
class Encoded:
    """Users to encode: their windows, and the partition each window came from."""

    user_id: list[str] = field(default_factory=list)
    window: list[EventWindow] = field(default_factory=list)
    partition: list[int] = field(default_factory=list)

    def select(self, keep: list[bool]) -> Encoded:
        columns = (self.user_id, self.window, self.partition)
        return Encoded(*([x for x, k in zip(column, keep) if k] for column in columns))


class EncoderWorker:
    """Encodes with one model into one feature view, reading beat.windows as group (default:
    BEAT_GROUP_PREFIX-encoders); with follow, moves to each version made current there.
    Its loop, stop, clients and readiness are the runtime's (stream/runtime.py); it keeps
    the decode, encode and write stages."""

    def __init__(
        self, settings: Settings, encoder: BeatEncoder, sink: FeatureSink,
        group: str | None = None, follow: ModelVersions | None = None,
    ) -> None:
        self.settings = settings
        self.encoder = encoder
        self.sink = sink
        self.follow = follow
        registry = settings.schema_registry
        self.window_codec = AvroCodec("user_window", settings.windows_topic, registry)
        embedding_codec = AvroCodec("user_embedding", settings.embeddings_topic, registry)
        self.embedding_header = embedding_codec.framing.header()
        self.metrics = EncoderMetrics()
        self.runtime = WorkerRuntime(
            settings, self, name="encoder worker", group=group or settings.encoder_group,
            topics=[settings.windows_topic],
            # What consume() gives within max_wait_ms and, while more is already fetched
            # (the worker is behind), more of it, up to read_ahead messages.
            batching=Batching(
                first_wait_s=settings.max_wait_ms / 1000, fill_s=0.0,
                step=settings.max_batch, most=settings.read_ahead,
            ),
            metrics=self.metrics,
        )
        self.producer = self.runtime.producer
        self.clock = AsOfClock(settings.replay_lag_ms)
        self.stats = EncoderStats()
        self.pending = Pending()  # users read, not encoded yet
        self.in_hand = Batch()  # the batch being processed, for the logs
        decode_ahead = settings.decode_ahead
        if decode_ahead is None:
            decode_ahead = encoder.device.type == "cuda"
        self.ahead = DecodeAhead(self.window_codec) if decode_ahead else None

    @property
    def consumer(self) -> Consumer:
        return self.runtime.consumer

    @property
    def group(self) -> str:
        return self.runtime.group

    def run(self, report_every_s: float = 10.0, ready_file: Path | None = None) -> None:
        """Encode until stop() (or SIGINT/SIGTERM when run from the CLI).

        ready_file is created once the worker has joined its group and holds partitions.
        """
        self.runtime.run(report_every_s, ready_file)

    def stop(self) -> None:
        self.runtime.stop()

    def close(self) -> None:
        """Leave the group, then wait for what is still queued (the dead letters of a batch
        given up): DeliveryError if the broker does not take it."""
        self.runtime.close()

    # -- what the runtime hands over ------------------------------------------------------

    def take(self, records: list[Message]) -> None:
        self.pending.add(records)  # keeps only each user's newest window

    def backlog(self) -> bool:
        return bool(self.pending.users)

    def process_taken(self) -> None:
        """One step: the users pending longest, encoded, written and committed."""
        if not self.pending:
            return
        batch, taken = self.pending.take_oldest(self.settings.max_batch)
        if not self.process(batch):
            self.pending.put_back(taken)

    def on_assign(self, partitions: list[TopicPartition]) -> None:
        pass  # the model is loaded before the worker joins: assigned partitions are ready

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        # Their uncommitted windows are read again by whoever gets them next.
        numbers = [tp.partition for tp in partitions]
        self.clock.forget(numbers)
        self.pending.drop(set(numbers))

    on_lost = on_revoke

    def between_batches(self) -> None:
        if self.follow:
            self._follow_current()

    def summary(self) -> str:
        return self.stats.summary()

    def release(self) -> None:
        if self.ahead:  # the online store's clients close with the process
            self.ahead.close()

    def _follow_current(self) -> None:
        """Between batches (the last one committed or given up, none in hand): serve the
        current version once it is another one. Its consumer group starts where its
        backfill stopped, so no window is left out of its view."""
        current = self.follow.current()
        if current is None or current == self.encoder.model_version:
            return
        encoder, sink = load_version(self.settings, self.follow, current)
        group = version_group(self.settings, current)
        log.info("encoder worker: model %s is current; leaving %s for %s", current,
                 self.encoder.model_version, group)
        self.encoder, self.sink = encoder, sink
        self.clock = AsOfClock(self.settings.replay_lag_ms)
        self.runtime.rejoin(group)

    def process(self, batch: Batch, upcoming: Batch | None = None) -> bool:
        """Encode, write and publish the batch's users, then commit its offsets. False:
        given up (stopping, or the partitions moved), nothing committed. upcoming: the
        batch that comes next (a backfill's), else the users pending longest."""
        self.in_hand = batch
        self.metrics.batch_messages.observe(batch.messages)
        self.metrics.window_messages.labels(self.encoder.model_version).inc(batch.windows)
        with self.runtime.stage("decode"):
            users = self.decode(batch)
        self.decode_next(upcoming)
        if not self.encode_and_write(users):
            return False
        with self.runtime.stage("commit"):
            self.runtime.flush()  # raises DeliveryError: then nothing is committed
            if not self.runtime.revoked:  # else the partitions' new owners read them again
                topic = self.settings.windows_topic
                self.runtime.commit([TopicPartition(topic, p, end)
                                     for p, end in sorted(batch.ends.items())])  # fmt: skip
        self.stats.batches += 1
        return True

    def encode_and_write(self, users: Encoded, as_of_now: bool = False) -> bool:
        """Encode the users, write them to the online store and publish them, in steps of
        max_batch, each as of the time the as-of clock gives (as_of_now: the wall clock).
        False: given up (stopping, or the partitions moved)."""
        step = self.settings.max_batch
        for start in range(0, len(users.user_id), step):
            part = slice(start, start + step)
            windows, partitions = users.window[part], np.array(users.partition[part], np.int64)
            newest = np.array([w.event_time_ms[-1] for w in windows], np.int64)
            now_ms = int(time.time() * 1000)
            as_of = (np.full(len(windows), now_ms) if as_of_now
                     else self.clock.as_of(partitions, newest, now_ms))
            rows = self.encode(windows, users.user_id[part], as_of)
            if not self.write_online(rows):
                return False
            with self.runtime.stage("publish"):
                self.publish(rows)
        return True

    def decode_next(self, upcoming: Batch | None = None) -> None:
        """With decode ahead, start decoding the next step's windows: upcoming's, else those
        of the users pending longest. Call it after decode() took the last ones."""
        if not self.ahead:
            return
        if upcoming is not None:
            self.ahead.start(list(upcoming.latest.values()))
        elif self.pending.users:
            self.ahead.start(self.pending.peek_oldest(self.settings.max_batch))

    def decode(self, batch: Batch) -> Encoded:
        """The batch's newest windows as model inputs (those decoded ahead as they were);
        bad ones go to the dead-letter topic."""
        ahead = self.ahead.take() if self.ahead else {}
        users = Encoded()
        for message in batch.latest.values():
            decoded = ahead.get((message.partition(), message.offset()))
            if decoded is None:
                decoded = decode_window(self.window_codec, message.value())
            if isinstance(decoded, str):
                self._dead_letter(message, decoded)
                continue
            users.user_id.append(decoded[0])
            users.window.append(decoded[1])
            users.partition.append(message.partition())
        return users

    def encode(
        self, windows: list[EventWindow], user_ids: list[str], as_of_ms: np.ndarray
    ) -> EmbeddingRows:
        """Embeddings of the (non-empty) windows, as of as_of_ms (one per window)."""
        with self.runtime.stage("encode"):
            embeddings = self.encoder.encode(windows, as_of_ms=as_of_ms)
        with self.runtime.stage("trim"):
            release_freed_heap()
        return EmbeddingRows(
            user_id=user_ids,
            embedding=embeddings,
            model_version=self.encoder.model_version,
            event_count=np.array([len(w) for w in windows], np.int64),
            last_event_time_ms=np.array([w.event_time_ms[-1] for w in windows], np.int64),
            as_of_ms=as_of_ms,
        )

    def write_online(self, rows: EmbeddingRows) -> bool:
        """Write the rows to the online store, retrying with backoff while it is unavailable.
        False: given up (the worker is stopping, or a rebalance took the partitions)."""
        delay, waiting_since = 0.1, None
        while True:
            try:
                with self.runtime.stage("feast"):
                    self.sink.write(rows)
                break
            except self.sink.unavailable as err:
                waiting_since = waiting_since or time.monotonic()
                log.warning(
                    "encoder worker: online store %s unavailable (%s); waiting %.0f s so far: "
                    "%d embeddings, %d window messages uncommitted (partitions %s); "
                    "retry in %.1f s",
                    self.sink.where, err, time.monotonic() - waiting_since, len(rows.user_id),
                    self.in_hand.messages, sorted(self.in_hand.ends), delay,
                )
                if self.runtime.pause(delay) or self.runtime.revoked:
                    return False
                delay = min(2 * delay, 5.0)
        if waiting_since is not None:
            log.warning("encoder worker: online store %s back after %.1f s; catching up",
                        self.sink.where, time.monotonic() - waiting_since)
        self.stats.users += len(rows.user_id)
        written_ms = int(time.time() * 1000)  # event time -> in the online store
        freshness_ms = (written_ms - rows.last_event_time_ms).tolist()
        self.stats.freshness_ms.extend(freshness_ms)
        self.metrics.written(rows.model_version, freshness_ms)
        return True

    def publish(self, rows: EmbeddingRows) -> None:
        """The rows to beat.embeddings, encoded all at once (see embedding_values)."""
        keys = pa.array(rows.user_id, pa.string()).cast(pa.binary()).to_pylist()
        values = embedding_values(self.embedding_header, rows)
        topic = self.settings.embeddings_topic
        # produce() per message is the client's C method, mapped: no Python per row.
        list(map(self.producer.produce, repeat(topic, len(keys)), values, keys))

    def _dead_letter(self, message: Message, reason: str) -> None:
        self.stats.dead_letters += 1
        self.metrics.dead_lettered([reason])
        self.producer.produce(
            self.settings.dead_letter_topic, key=message.key(), value=message.value(),
            headers=dead_letter_headers(
                reason, message.topic(), message.partition(), message.offset()
            ),
        )


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim; None under another C library (musl, macOS)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None


_MALLOC_TRIM = _malloc_trim()


def release_freed_heap() -> None:
    """Give the heap's free pages back to the OS (glibc; elsewhere a no-op).

    torch's CPU tensors come from malloc, in a new size for every batch shape, and are
    freed between allocations that live on; glibc returns only the top of its heap, so it
    kept the freed pages: a soak's encoder grew 1.4-2 MB a second with half of its 433 MB
    heap free (bench/soak.py; gdb's malloc_trim took 128-210 MB back at once). Trimming
    after each encode costs about 10 ms a batch against 400 ms of encoding (the `trim`
    stage of the worker's log).
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def embedding_values(header: bytes, rows: EmbeddingRows) -> list[bytes]:
    """The beat.embeddings value of every row (schemas/user_embedding.avsc), encoded column
    by column like the producer's events: byte for byte what AvroCodec.encode writes."""
    n, size = rows.embedding.shape
    floats = np.ascontiguousarray(rows.embedding, "<f4").view(np.uint8).ravel()
    pieces = [
        pa.scalar(header),
        *strings(pa.array(rows.user_id, pa.string())),
        pa.scalar(write_string(rows.model_version)),
        pa.scalar(write_long(size)),  # the embedding: one block of floats, then the end
        binary_array(np.full(n, 4 * size), floats),
        pa.scalar(b"\x00"),
        varints(zigzag(rows.event_count)),
        varints(zigzag(rows.last_event_time_ms)),
        varints(zigzag(rows.as_of_ms)),
    ]
    return pc.binary_join_element_wise(*pieces, b"").to_pylist()


def load_encoder(settings: Settings, directory: Path, named: str = "") -> BeatEncoder:
    """The model of a directory, checked against the settings (ConfigError if it does not
    load or does not fit); named: the setting or option that gave the directory."""
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    try:
        encoder = BeatEncoder.from_pretrained(
            directory, device=settings.device, max_batch=settings.encode_batch
        )
    except (ValueError, OSError, SafetensorError) as err:  # missing, partial or corrupt files
        raise ConfigError(
            f"{named}{directory} is not a usable model directory: {err}; point it at one from "
            "`beat pretrain` or `beat model init`"
        ) from None
    check_model_fits(settings, encoder.model.config, directory)
    return encoder


def load_version(
    settings: Settings, versions: ModelVersions, version: str
) -> tuple[BeatEncoder, FeatureSink]:
    """A published version's model and a sink into its feature view (registered by the
    publish: the worker only reads the registry)."""
    encoder = load_encoder(settings, versions.path(version))
    return encoder, FeatureSink(settings, view_name(version), deploy=False)


def load_worker(settings: Settings) -> EncoderWorker:
    """An encoder worker: BEAT_MODEL_DIR into user_embedding when set; else the pinned
    BEAT_MODEL_VERSION, or the current published version, followed from then on."""
    if settings.model_dir is not None:
        encoder = load_encoder(settings, settings.model_dir, "BEAT_MODEL_DIR=")
        log.info("encoder: model %s on %s", encoder.model_version, settings.device)
        return EncoderWorker(settings, encoder, FeatureSink(settings))
    versions = ModelVersions(settings)
    wanted = settings.model_version or versions.current()
    if wanted is None:
        raise ConfigError(
            "BEAT_MODEL_DIR: no model; set it or pass --model-dir (see `beat model init`), "
            "or publish one with `beat model publish DIR`"
        )
    try:
        version = versions.resolve(wanted)
    except ValueError as err:
        raise ConfigError(f"BEAT_MODEL_VERSION: {err}") from None
    encoder, sink = load_version(settings, versions, version)
    log.info("encoder: model %s on %s, %s", version, settings.device,
             "pinned" if settings.model_version else "following the current version")
    follow = None if settings.model_version else versions
    return EncoderWorker(settings, encoder, sink, version_group(settings, version), follow)


def run_worker(settings: Settings, ready_file: Path | None = None) -> None:
    """Load the model and Feast, then encode until SIGINT/SIGTERM."""
    worker = load_worker(settings)
    check_reachable(settings)  # BrokerError, said in a line by the CLI, rather than a hang
    stop_on_signals(worker.stop)
    worker.run(ready_file=ready_file)
