"""Send behavioral events to beatstream with nothing of beatstream's but its schema.

    python examples/producer.py --bootstrap-servers HOST:PORT [--topic beat.events] \\
        [--schema schemas/behavior_event.avsc] [-X security.protocol=SASL_SSL ...] < events.jsonl

Reads one JSON event per line (the fields of schemas/behavior_event.avsc):

    {"user_id": "u42", "event_id": "3f1c...", "event_time": "2026-11-30T09:15:00Z",
     "action": "purchase", "property": "books", "value": 12.5, "attributes": {"app": "ios"}}

``event_time`` is an ISO-8601 time (UTC when it names no zone) or epoch milliseconds;
``property``, ``value`` and ``attributes`` may be left out. Each event goes to the topic as
beatstream's stream workers read it (docs/producers.md):

* value: Avro single-object encoding, ``C3 01`` + the 8-byte little-endian CRC-64-AVRO
  fingerprint of the schema's canonical form + the Avro binary body. (Shops with a
  Confluent schema registry use Confluent's AvroSerializer instead, with the full
  ``.avsc`` text under the subject ``<topic>-value``; the workers then need
  SCHEMA_REGISTRY_URL too.)
* key: the event's ``user_id`` in UTF-8. A user's window lives with its key's partition, so
  an event whose key is not its user_id is dead-lettered.
* partitioner: ``murmur2_random``, the Java client's. Any partitioner works, but with
  another one (librdkafka's default is crc32) the workers first move the event to its
  key's murmur2 partition of ``beat.events.repartition``, one hop more.
* no headers are needed.

Only confluent-kafka, fastavro and the standard library: a producing team needs nothing
else. Exit codes: 0 all delivered, 1 some not delivered, 2 a line that does not fit the
schema (nothing after it is sent).
"""

from __future__ import annotations

import argparse
import io
import json
import struct
import sys
from datetime import datetime, timezone
from pathlib import Path

import fastavro
from confluent_kafka import KafkaError, Message, Producer
from fastavro.schema import fingerprint, to_parsing_canonical_form

DEFAULT_SCHEMA = Path(__file__).resolve().parent.parent / "schemas" / "behavior_event.avsc"
SINGLE_OBJECT_MAGIC = b"\xc3\x01"


class EventEncoder:
    """Avro single-object encoding of behavior_event records."""

    def __init__(self, schema_path: Path = DEFAULT_SCHEMA) -> None:
        self.schema = fastavro.parse_schema(json.loads(schema_path.read_text()))
        crc64 = int(fingerprint(to_parsing_canonical_form(self.schema), "CRC-64-AVRO"), 16)
        self.header = SINGLE_OBJECT_MAGIC + struct.pack("<Q", crc64)

    def encode(self, event: dict) -> bytes:
        """The message value of one event (a dict of the schema's fields)."""
        body = io.BytesIO()
        fastavro.schemaless_writer(body, self.schema, as_record(event))
        return self.header + body.getvalue()


def as_record(event: dict) -> dict:
    """The event with its optional fields filled in and event_time as a datetime."""
    return {"property": None, "value": None, "attributes": {}, **event,
            "event_time": event_time(event["event_time"])}


def event_time(value: str | int | datetime) -> datetime:
    """An ISO-8601 string (UTC when it names no zone), epoch milliseconds or a datetime."""
    if isinstance(value, int):
        return datetime.fromtimestamp(value / 1000, timezone.utc)
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def producer_config(bootstrap_servers: str, properties: dict[str, str]) -> dict:
    """librdkafka settings for events: properties (security, client.id...) may add to
    these or override them."""
    return {
        "bootstrap.servers": bootstrap_servers,
        "partitioner": "murmur2_random",  # the partition the workers keep the user's window at
        "enable.idempotence": True,  # retries neither duplicate nor reorder a user's events
        "compression.type": "zstd",
        "linger.ms": 20,
        **properties,
    }


class EventSender:
    """Sends encoded events keyed by user_id and remembers the ones not delivered."""

    def __init__(self, config: dict, topic: str, encoder: EventEncoder) -> None:
        self.topic, self.encoder = topic, encoder
        self.producer = Producer({**config, "on_delivery": self._delivered})
        self.failed: list[str] = []

    def send(self, event: dict) -> None:
        value = self.encoder.encode(event)
        while True:
            try:
                self.producer.produce(self.topic, value, event["user_id"].encode("utf-8"))
                break
            except BufferError:  # the local queue is full: let librdkafka send some
                self.producer.poll(0.1)
        self.producer.poll(0)

    def _delivered(self, error: KafkaError | None, message: Message) -> None:
        if error is not None:
            self.failed.append(f"{message.key()!r}: {error.str()}")

    def flush(self, timeout_s: float = 30.0) -> int:
        """Wait for every delivery; the number of events not delivered."""
        left = self.producer.flush(timeout_s)
        return left + len(self.failed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bootstrap-servers", required=True, help="Kafka cluster, host:port,...")
    parser.add_argument("--topic", default="beat.events")
    parser.add_argument("--schema", type=Path, default=DEFAULT_SCHEMA,
                        help="behavior_event.avsc (the copy shipped with beatstream)")
    parser.add_argument("-X", dest="properties", action="append", default=[],
                        metavar="NAME=VALUE", help="a librdkafka property (repeatable)")
    args = parser.parse_args(argv)
    properties = dict(p.split("=", 1) for p in args.properties)
    sender = EventSender(producer_config(args.bootstrap_servers, properties), args.topic,
                         EventEncoder(args.schema))
    sent = 0
    for number, line in enumerate(sys.stdin, 1):
        if not line.strip():
            continue
        try:
            sender.send(json.loads(line))
        except (KeyError, ValueError, TypeError, AttributeError) as err:
            # fastavro names the field that does not fit; stop, since later events of the
            # same user would otherwise overtake a fixed copy of this one
            print(f"line {number}: not a behavior_event ({err!r}); {sent} sent before it",
                  file=sys.stderr)
            sender.flush()
            return 2
        sent += 1
    failed = sender.flush()
    for failure in sender.failed[:5]:
        print(f"not delivered: {failure}", file=sys.stderr)
    print(f"{sent - failed} of {sent} events delivered to {args.topic}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
