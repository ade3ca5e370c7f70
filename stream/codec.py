"""Avro codecs for the values of every beatstream topic.

Two framings, chosen by whether a schema registry is configured:

* Confluent wire format: ``0x00`` + 4-byte big-endian schema id + Avro body. The id comes
  from the registry (subject ``<topic>-value``) and readers resolve unknown ids there.
* Avro single-object encoding: ``C3 01`` + 8-byte little-endian CRC-64-AVRO fingerprint
  of the writer schema's canonical form + Avro body. Readers accept the fingerprints
  of the schema versions this package ships: ``schemas/<name>.avsc`` and the earlier
  versions kept as ``schemas/previous/<name>.<n>.avsc`` (so a changelog written before an
  upgrade still restores).

A payload that cannot be decoded raises ``DecodeError`` whose message is the reason
that goes into the dead-letter header.
"""

from __future__ import annotations

import io
import json
import struct
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
SINGLE_OBJECT_MAGIC = b"\xc3\x01"
SINGLE_OBJECT_FINGERPRINT = struct.Struct("<Q")  # CRC-64-AVRO, little-endian
CONFLUENT_MAGIC = b"\x00"
CONFLUENT_SCHEMA_ID = struct.Struct(">I")


class DecodeError(ValueError):
    """The payload is not a valid message of the expected schema."""


@cache
def load_schema(name: str) -> dict[str, Any]:
    """The parsed schema ``schemas/<name>.avsc``."""
    with open(SCHEMA_DIR / f"{name}.avsc") as f:
        return fastavro.parse_schema(json.load(f))


def _write_body(schema: dict, record: dict) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema, record)
    return buf.getvalue()


def _read_body(schema: dict, body: bytes, reader_schema: dict | None = None) -> dict:
    buf = io.BytesIO(body)
    try:
        record = fastavro.schemaless_reader(buf, schema, reader_schema)
    # OverflowError: a timestamp outside years 1-9999 (or past a C long) in a logical type
    except (EOFError, ValueError, TypeError, UnicodeDecodeError, IndexError, OverflowError,
            struct.error) as err:
        raise DecodeError(f"Avro body does not match schema {schema['name']}: {err!r}") from None
    if buf.tell() != len(body):
        raise DecodeError(f"{len(body) - buf.tell()} trailing bytes after the Avro body")
    return record


class Framing(Protocol):
    def header(self) -> bytes: ...
    def writer_schema(self, payload: bytes) -> tuple[dict, int]: ...


def _read_frame(
    payload: bytes, magic: bytes, number: struct.Struct, expected: str
) -> tuple[int, int]:
    """(the number after magic: the schema's fingerprint or id, where the Avro body starts);
    DecodeError saying what was expected when the payload does not start that way."""
    body_start = len(magic) + number.size
    if payload[: len(magic)] != magic or len(payload) < body_start:
        raise DecodeError(f"{expected}; first bytes {payload[:4].hex() or 'empty'}")
    return number.unpack_from(payload, len(magic))[0], body_start


def previous_schemas(name: str) -> list[dict[str, Any]]:
    """The earlier versions of schemas/<name>.avsc that this package still reads."""
    paths = sorted((SCHEMA_DIR / "previous").glob(f"{name}.*.avsc"))
    return [fastavro.parse_schema(json.loads(path.read_text())) for path in paths]


def _fingerprint(schema: dict) -> int:
    return int(fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"), 16)


@dataclass
class SingleObjectFraming:
    """Avro single-object encoding; the known writer schemas are those shipped here."""

    schema: dict
    previous: list[dict] = field(default_factory=list)  # older writer schemas still read

    def __post_init__(self) -> None:
        self._fingerprint = _fingerprint(self.schema)
        self._known = {_fingerprint(old): old for old in self.previous}
        self._known[self._fingerprint] = self.schema

    def header(self) -> bytes:
        return SINGLE_OBJECT_MAGIC + SINGLE_OBJECT_FINGERPRINT.pack(self._fingerprint)

    def writer_schema(self, payload: bytes) -> tuple[dict, int]:
        fp, start = _read_frame(
            payload,
            SINGLE_OBJECT_MAGIC,
            SINGLE_OBJECT_FINGERPRINT,
            "not Avro single-object encoded (expected C3 01 + 8-byte fingerprint)",
        )
        if fp not in self._known:
            raise DecodeError(f"unknown writer schema fingerprint {fp:016x}")
        return self._known[fp], start


@cache
def registry_client(url: str) -> "SchemaRegistryClient":  # noqa: F821
    """One client per registry and process, so every codec shares its schema cache.

    ``mock://<name>`` is confluent-kafka's in-process registry, for tests.
    """
    from confluent_kafka.schema_registry import SchemaRegistryClient

    return SchemaRegistryClient.new_client({"url": url})


class ConfluentFraming:
    """Confluent wire format backed by a schema registry."""

    def __init__(self, schema: dict, registry_url: str, subject: str) -> None:
        from confluent_kafka.schema_registry import Schema

        self._client = registry_client(registry_url)
        canonical = to_parsing_canonical_form(schema)
        self._id = self._client.register_schema(subject, Schema(canonical, "AVRO"))
        self._by_id: dict[int, dict] = {self._id: schema}

    def header(self) -> bytes:
        return CONFLUENT_MAGIC + CONFLUENT_SCHEMA_ID.pack(self._id)

    def writer_schema(self, payload: bytes) -> tuple[dict, int]:
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        schema_id, start = _read_frame(
            payload,
            CONFLUENT_MAGIC,
            CONFLUENT_SCHEMA_ID,
            "not in Confluent wire format (expected 00 + 4-byte schema id)",
        )
        if schema_id not in self._by_id:
            try:
                registered = self._client.get_schema(schema_id)
            except SchemaRegistryError as err:
                raise DecodeError(f"unknown schema id {schema_id}: {err.error_message}") from None
            self._by_id[schema_id] = fastavro.parse_schema(json.loads(registered.schema_str))
        return self._by_id[schema_id], start


class AvroCodec:
    """Encodes and decodes one topic's values with one framing.

    Decoding resolves the writer schema named in the frame against this codec's
    (reader) schema, so producers may lag behind compatible schema evolutions.
    """

    def __init__(self, schema_name: str, topic: str, registry_url: str | None = None,
                 fields: tuple[str, ...] | None = None) -> None:
        self.schema = load_schema(schema_name)
        self.framing: Framing = (
            ConfluentFraming(self.schema, registry_url, f"{topic}-value")
            if registry_url
            else SingleObjectFraming(self.schema, previous_schemas(schema_name))
        )
        self._header = self.framing.header()
        # With fields, decode() returns only those and skips the rest of each body.
        self._reader = _projection(self.schema, fields) if fields else self.schema

    def encode(self, record: dict) -> bytes:
        return self._header + _write_body(self.schema, record)

    def decode(self, payload: bytes | None) -> dict:
        if not payload:
            raise DecodeError("empty message value")
        writer, start = self.framing.writer_schema(payload)
        reader = None if writer is self._reader else self._reader
        return _read_body(writer, payload[start:], reader)


def _projection(schema: dict, fields: tuple[str, ...]) -> dict:
    unknown = set(fields) - {f["name"] for f in schema["fields"]}
    if unknown:
        raise ValueError(f"{schema['name']} has no fields {sorted(unknown)}")
    return fastavro.parse_schema(
        {**schema, "fields": [f for f in schema["fields"] if f["name"] in fields]}
    )
