"""Avro codecs for the values of every beatstream topic.

Two framings, chosen by whether a schema registry is configured:

* Confluent wire format: ``0x00`` + 4-byte big-endian schema id + Avro body, as Confluent's
  own ``AvroSerializer`` writes it. A writer registers the full ``.avsc`` text (logical types,
  defaults and docs kept) under ``<topic>-value`` when auto-register is on, or only looks its
  id up; a reader never registers: it fetches each writer schema by its id.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import urlsplit

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

from stream.config import ConfigError, SchemaRegistry

if TYPE_CHECKING:
    from confluent_kafka.schema_registry import Schema, SchemaRegistryClient

T = TypeVar("T")

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
SINGLE_OBJECT_MAGIC = b"\xc3\x01"
SINGLE_OBJECT_FINGERPRINT = struct.Struct("<Q")  # CRC-64-AVRO, little-endian
CONFLUENT_MAGIC = b"\x00"
CONFLUENT_SCHEMA_ID = struct.Struct(">I")


class DecodeError(ValueError):
    """The payload is not a valid message of the expected schema."""


@cache
def schema_text(name: str) -> str:
    """``schemas/<name>.avsc`` as written: what a registry is given. Stripped, as Confluent's
    AvroSerializer strips the text it registers: the same file registered either way is
    the same text (the registry's mock, and its lookup, compare texts)."""
    return (SCHEMA_DIR / f"{name}.avsc").read_text().strip()


@cache
def load_schema(name: str) -> dict[str, Any]:
    """The parsed schema ``schemas/<name>.avsc``."""
    return fastavro.parse_schema(json.loads(schema_text(name)))


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
    def header(self) -> bytes:
        """What a writer puts before each Avro body."""
    def reader_header(self) -> bytes | None:
        """The header of payloads written with exactly this schema, without registering it
        (None: not known yet); readers take a fast path for them."""
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

    def reader_header(self) -> bytes:
        return self.header()

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


def registry_client(url: str, user_info: str | None = None) -> SchemaRegistryClient:
    """One client per registry (and credentials) and process, so every codec shares its
    schema cache. user_info: basic auth, "user:password".

    ``mock://<name>`` is confluent-kafka's in-process registry, for tests.
    """
    return _registry_client(url, user_info)  # one cache key however it is called


@cache
def _registry_client(url: str, user_info: str | None) -> SchemaRegistryClient:
    from confluent_kafka.schema_registry import SchemaRegistryClient

    auth = {"basic.auth.user.info": user_info} if user_info else {}
    return SchemaRegistryClient.new_client({"url": url, **auth})


def _shown(url: str) -> str:
    """url without credentials (https://user:password@host is accepted by the client)."""
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


class ConfluentFraming:
    """Confluent wire format backed by a schema registry, as Confluent's serializers use it."""

    def __init__(self, schema: dict, text: str, registry: SchemaRegistry, subject: str) -> None:
        from confluent_kafka.schema_registry import Schema

        user_info = registry.user_info.get_secret_value() if registry.user_info else None
        self._client = registry_client(registry.url, user_info)
        self._registry = registry
        self._schema = Schema(text, "AVRO")  # the full text, as AvroSerializer registers it
        self._subject = subject
        self._parsed = schema
        self._header: bytes | None = None
        self._by_id: dict[int, dict] = {}

    def header(self) -> bytes:
        # Resolved on first use, so a codec that only reads never registers.
        if self._header is None:
            if self._registry.auto_register:
                self._known(self._call("register", self._client.register_schema))
            elif self.reader_header() is None:
                raise ConfigError(
                    f"schema {self._parsed['name']} is not registered under {self._subject} in "
                    f"the schema registry at {_shown(self._registry.url)}: register "
                    "schemas/*.avsc there, or set BEAT_SCHEMA_REGISTRY_AUTO_REGISTER=true"
                )
        return self._header

    def reader_header(self) -> bytes | None:
        if self._header is None:
            found = self._call("look up", self._client.lookup_schema, missing_ok=True)
            if found is not None:
                self._known(found.schema_id)
        return self._header

    def _known(self, schema_id: int) -> None:
        self._header = CONFLUENT_MAGIC + CONFLUENT_SCHEMA_ID.pack(schema_id)
        self._by_id[schema_id] = self._parsed

    def _call(self, what: str, method: Callable[[str, Schema], T],
              missing_ok: bool = False) -> T | None:
        """method(subject, schema); a registry error as ConfigError naming the settings."""
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        try:
            return method(self._subject, self._schema)
        except SchemaRegistryError as err:
            if missing_ok and err.http_status_code == 404:
                return None
            raise ConfigError(
                f"the schema registry at {_shown(self._registry.url)} refused to {what} "
                f"{self._parsed['name']} under {self._subject}: {err.error_message} (HTTP "
                f"{err.http_status_code}); check SCHEMA_REGISTRY_URL and "
                "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO"
            ) from None

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

    def __init__(self, schema_name: str, topic: str,
                 registry: SchemaRegistry | str | None = None,
                 fields: tuple[str, ...] | None = None) -> None:
        """registry: Settings.schema_registry, or a URL (no auth, auto-register); None:
        single-object encoding."""
        self.schema = load_schema(schema_name)
        if isinstance(registry, str):
            registry = SchemaRegistry(registry)
        self.framing: Framing = (
            ConfluentFraming(self.schema, schema_text(schema_name), registry, f"{topic}-value")
            if registry
            else SingleObjectFraming(self.schema, previous_schemas(schema_name))
        )
        # With fields, decode() returns only those and skips the rest of each body.
        self._reader = _projection(self.schema, fields) if fields else self.schema

    def encode(self, record: dict) -> bytes:
        return self.framing.header() + _write_body(self.schema, record)

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
