"""The Avro codec: both framings round-trip every field and refuse unknown writers."""

from __future__ import annotations

import io
import struct
from datetime import datetime, timezone

import fastavro
import pytest

from stream.codec import AvroCodec, DecodeError, load_schema, registry_client

EVENT = {
    "user_id": "u42",
    "event_id": "e-1",
    "event_time": datetime(2026, 3, 4, 5, 6, 7, 891000, tzinfo=timezone.utc),
    "action": "card_payment",
    "property": "merchant:coffee",
    "value": 3.75,
    "attributes": {"channel": "app", "country": "NL"},
}
SPARSE_EVENT = {**EVENT, "event_id": "e-2", "property": None, "value": None, "attributes": {}}


@pytest.fixture(params=["single-object", "confluent"])
def codec(request: pytest.FixtureRequest) -> AvroCodec:
    # mock:// is confluent-kafka's in-process schema registry: there is no registry
    # server on these machines, and the client, ids and wire format are the real ones.
    registry = "mock://codec-test" if request.param == "confluent" else None
    return AvroCodec("behavior_event", "beat.events", registry)


@pytest.mark.parametrize("event", [EVENT, SPARSE_EVENT])
def test_round_trip_every_field(codec: AvroCodec, event: dict) -> None:
    assert codec.decode(codec.encode(event)) == event


def test_single_object_frame_is_c3_01_and_crc64_fingerprint() -> None:
    payload = AvroCodec("behavior_event", "beat.events").encode(EVENT)
    assert payload[:2] == b"\xc3\x01"
    # Same schema, same fingerprint; a different schema, a different one.
    other = AvroCodec("user_embedding", "beat.embeddings").encode(
        {"user_id": "u", "model_version": "v", "embedding": [0.5], "event_count": 1,
         "last_event_time": 0, "updated_at": 0})
    assert payload[2:10] == AvroCodec("behavior_event", "beat.events").encode(SPARSE_EVENT)[2:10]
    assert other[2:10] != payload[2:10]


def test_confluent_frame_carries_the_registered_schema_id() -> None:
    codec = AvroCodec("behavior_event", "beat.events", "mock://id-test")
    payload = codec.encode(EVENT)
    assert payload[0] == 0
    (schema_id,) = struct.unpack(">I", payload[1:5])
    registered = registry_client("mock://id-test").get_latest_version("beat.events-value")
    assert registered.schema_id == schema_id


def test_unknown_fingerprint_is_rejected() -> None:
    codec = AvroCodec("behavior_event", "beat.events")
    payload = bytearray(codec.encode(EVENT))
    payload[2:10] = struct.pack("<Q", 0x0123456789ABCDEF)
    with pytest.raises(DecodeError, match="unknown writer schema fingerprint 0123456789abcdef"):
        codec.decode(bytes(payload))


def test_unknown_schema_id_is_rejected() -> None:
    codec = AvroCodec("behavior_event", "beat.events", "mock://unknown-id-test")
    payload = b"\x00" + struct.pack(">I", 987654) + codec.encode(EVENT)[5:]
    with pytest.raises(DecodeError, match="unknown schema id 987654"):
        codec.decode(payload)


@pytest.mark.parametrize("payload, reason", [
    (b"", "empty message value"),
    (b"{\"user_id\": \"u1\"}", "not Avro single-object encoded"),
    (b"\xc3\x01", "not Avro single-object encoded"),
])
def test_garbage_is_rejected_with_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        AvroCodec("behavior_event", "beat.events").decode(payload)


def test_truncated_and_padded_bodies_are_rejected() -> None:
    codec = AvroCodec("behavior_event", "beat.events")
    payload = codec.encode(EVENT)
    with pytest.raises(DecodeError, match="does not match schema"):
        codec.decode(payload[:-12])
    with pytest.raises(DecodeError, match="trailing bytes"):
        codec.decode(payload + b"\x00\x00")


@pytest.mark.parametrize("event_time_ms", [
    253_402_300_800_000,  # 10000-01-01: past datetime's last year
    -62_135_596_800_001,  # a millisecond before 0001-01-01
    2**62,  # past what a C long holds in microseconds
])
def test_timestamp_outside_years_1_to_9999_is_rejected(
    codec: AvroCodec, event_time_ms: int
) -> None:
    # The same bytes as a real event, written with event_time as a plain long: a producer
    # (not this codec) can put any long there.
    schema = load_schema("behavior_event")
    fields = [{**f, "type": "long"} if f["name"] == "event_time" else f for f in schema["fields"]]
    body = io.BytesIO()
    fastavro.schemaless_writer(body, fastavro.parse_schema({**schema, "fields": fields}),
                               {**EVENT, "event_time": event_time_ms})
    with pytest.raises(DecodeError, match="does not match schema.*OverflowError"):
        codec.decode(codec.framing.header() + body.getvalue())
