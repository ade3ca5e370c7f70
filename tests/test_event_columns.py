"""The vectorized event decoder agrees with the codec (fastavro) record by record: same
fields for every record it accepts, the same rejection reason for every other."""

from __future__ import annotations

import io
import json
import re
import struct
from datetime import UTC, datetime, timedelta

import fastavro
import numpy as np
import pytest

from stream import event_columns
from stream.codec import AvroCodec, DecodeError
from stream.event_columns import EventDecoder

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ALPHABET = ["a", "Z", "0", "_", " ", "é", "ß", "中", "😀", "\x00", "\u200b"]
MIN_MS, MAX_MS = -62_135_596_800_000, 253_402_300_799_999  # what a datetime can hold


def zigzag(n: int) -> bytes:
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while True:
        byte, z = z & 0x7F, z >> 7
        out.append(byte | (0x80 if z else 0))
        if not z:
            return bytes(out)


def avro_string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return zigzag(len(raw)) + raw


def body(event: dict, blocks: list[tuple[list[tuple[str, str]], bool]] | None = None) -> bytes:
    """An Avro body written by hand, so the attributes map can come in several blocks;
    a block (entries, sized) with sized=True has a negative count and its byte size."""
    out = [
        avro_string(event["user_id"]),
        avro_string(event["event_id"]),
        zigzag(event["event_time"]),
        avro_string(event["action"]),
    ]
    out.append(b"\x00" if event["property"] is None else b"\x02" + avro_string(event["property"]))
    out.append(b"\x00" if event["value"] is None else b"\x02" + struct.pack("<d", event["value"]))
    if blocks is None:
        blocks = [(list(event["attributes"].items()), False)] if event["attributes"] else []
    for entries, sized in blocks:
        if not entries:
            continue
        content = b"".join(avro_string(k) + avro_string(v) for k, v in entries)
        out.append(zigzag(-len(entries)) + zigzag(len(content)) if sized else zigzag(len(entries)))
        out.append(content)
    out.append(b"\x00")
    return b"".join(out)


def random_text(rng: np.random.Generator, max_len: int = 12) -> str:
    return "".join(rng.choice(ALPHABET, rng.integers(0, max_len + 1)))


def random_event(rng: np.random.Generator) -> dict:
    kind = rng.integers(4)
    time = [int(rng.integers(1_600_000_000_000, 1_800_000_000_000)), int(rng.integers(-64, 64)),
            int(rng.choice([MIN_MS, MAX_MS])), int(rng.integers(MIN_MS, MAX_MS))][kind]
    n_attributes = int(rng.choice([0, 0, 1, 2, 5, 70]))
    return {
        "user_id": random_text(rng), "event_id": random_text(rng, 40), "event_time": time,
        "action": random_text(rng, 200 if rng.random() < 0.05 else 12),
        "property": None if rng.random() < 0.3 else random_text(rng),
        "value": None
        if rng.random() < 0.3
        else float(rng.choice([0.0, -1.5, 1e300, rng.normal() * 1e4])),
        "attributes": {random_text(rng, 5) + str(i): random_text(rng) for i in range(n_attributes)},
    }  # fmt: skip


def random_blocks(
    rng: np.random.Generator, attributes: dict
) -> list[tuple[list[tuple[str, str]], bool]]:
    """The entries split into 1..4 blocks, some of them sized (negative counts)."""
    entries = list(attributes.items())
    bounds = [
        0,
        *sorted(rng.integers(0, len(entries) + 1, rng.integers(0, 4)).tolist()),
        len(entries),
    ]
    return [(entries[a:b], bool(rng.random() < 0.5)) for a, b in zip(bounds, bounds[1:])]


def same_reason(reason: str) -> str:
    return re.sub(r" at 0x[0-9a-f]+", "", reason)  # fastavro's messages name a BytesIO by address


def expected(codec: AvroCodec, payload: bytes | None) -> tuple:
    """What the codec makes of a payload: ("ok", fields) or ("rejected", reason)."""
    try:
        record = codec.decode(payload)
    except (DecodeError, OverflowError) as err:
        return "rejected", same_reason(str(err))
    time_ms = (record["event_time"] - EPOCH) // timedelta(milliseconds=1)
    return "ok", (
        record["user_id"],
        record["event_id"],
        time_ms,
        record["action"],
        record["property"],
        record["value"],
    )


def decoded(codec: AvroCodec, payloads: list[bytes | None]) -> list[tuple]:
    """The decoder's answer per input, in the shape of expected()."""
    out = EventDecoder(codec).decode(payloads)
    assert np.all(np.diff(out.row) > 0), "rows come back in input order"
    answers: list[tuple] = [("missing",)] * len(payloads)
    values = [None if np.isnan(v) else float(v) for v in out.value]
    for i, fields in enumerate(
        zip(
            out.user_id.to_pylist(),
            out.event_id.to_pylist(),
            out.event_time.tolist(),
            out.action.to_pylist(),
            out.property.to_pylist(),
            values,
        )
    ):
        answers[out.row[i]] = ("ok", fields)
    for row, reason in out.rejected:
        assert answers[row] == ("missing",), f"row {row} both decoded and rejected"
        answers[row] = ("rejected", same_reason(reason))
    return answers


def assert_agrees(codec: AvroCodec, payloads: list[bytes | None]) -> None:
    got = decoded(codec, payloads)
    for i, payload in enumerate(payloads):
        assert got[i] == expected(codec, payload), f"payload {i}: {payload!r}"


def fallbacks(codec: AvroCodec, payloads: list[bytes | None]) -> int:
    """How many payloads the decoder handed to the codec's per-record decode."""
    decoder = EventDecoder(codec)
    calls = []
    codec_decode = codec.decode
    decoder.codec = type(
        "Counting", (), {"decode": lambda self, p: calls.append(p) or codec_decode(p)}
    )()
    decoder.decode(payloads)
    return len(calls)


@pytest.fixture(params=["single-object", "confluent"])
def codec(request: pytest.FixtureRequest) -> AvroCodec:
    registry = "mock://event-columns-test" if request.param == "confluent" else None
    return AvroCodec("behavior_event", "beat.events", registry)


@pytest.fixture(scope="module")
def events() -> list[dict]:
    rng = np.random.default_rng(7)
    return [random_event(rng) for _ in range(2_000)]


def test_random_records_match_fastavro(codec: AvroCodec, events: list[dict]) -> None:
    payloads = [
        codec.encode({**e, "event_time": EPOCH + timedelta(milliseconds=e["event_time"])})
        for e in events
    ]
    assert_agrees(codec, payloads)
    assert fallbacks(codec, payloads) == 0
    out = EventDecoder(codec).decode(payloads)
    assert out.property.null_count == sum(e["property"] is None for e in events)


@pytest.fixture(params=["vectorized", "scalar", "both"])
def map_walk(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Maps read in passes over all records, record by record, or (the default) in passes
    until few records are left."""
    rows = {"vectorized": 0, "scalar": 10**9}.get(request.param)
    if rows is not None:
        monkeypatch.setattr(event_columns, "_SCALAR_ROWS", rows)


@pytest.mark.usefixtures("map_walk")
def test_map_blocks_and_negative_block_counts(codec: AvroCodec, events: list[dict]) -> None:
    rng = np.random.default_rng(11)
    blocks = [random_blocks(rng, e["attributes"]) for e in events]
    assert sum(sum(len(entries) > 0 for entries, _ in b) > 1 for b in blocks) > 100
    payloads = [codec.framing.header() + body(e, b) for e, b in zip(events, blocks)]
    assert_agrees(codec, payloads)
    assert fallbacks(codec, payloads) == 0


def corruptions(rng: np.random.Generator, header: bytes, event: dict) -> list[bytes | None]:
    good = header + body(event)
    cut = int(rng.integers(0, len(good)))
    flip = bytearray(good)
    flip[int(rng.integers(0, len(good)))] ^= 1 << int(rng.integers(8))
    bad_utf8 = header + body({**event, "event_id": "x"}).replace(
        avro_string("x"), avro_string(b"\xff\xfe"), 1
    )
    bad_attribute = header + body({**event, "attributes": {}}, [([("k", "v")], False)]).replace(
        avro_string("k") + avro_string("v"), avro_string("k") + avro_string(b"\xc3"))
    return [
        None, b"", good[:cut], good + b"\x00", bytes(flip),
        bytes(rng.integers(0, 256, cut, dtype=np.uint8)),
        # an unknown fingerprint / schema id
        good[:2] + b"\x99" * (len(header) - 2) + good[len(header):],
        bad_utf8, bad_attribute,
        header + zigzag(-3) + good[len(header):],  # a negative string length
        header + good[len(header):].replace(b"\x00", b"\x06"),  # union branch 3 of 2
        header + b"\x80" * 11,  # a varint that never ends
    ]  # fmt: skip


@pytest.mark.usefixtures("map_walk")
def test_corrupt_inputs_are_rejected_with_the_codecs_reason(
    codec: AvroCodec, events: list[dict]
) -> None:
    rng = np.random.default_rng(3)
    header = codec.framing.header()
    payloads: list[bytes | None] = []
    for event in events[:400]:
        payloads += corruptions(rng, header, event) + [header + body(event)]
    assert_agrees(codec, payloads)
    out = EventDecoder(codec).decode(payloads)
    assert len(out.rejected) > len(payloads) // 2 and len(out) >= 400


def test_a_batch_of_only_rejects_and_an_empty_batch() -> None:
    codec = AvroCodec("behavior_event", "beat.events")
    out = EventDecoder(codec).decode([None, b"junk"])
    assert len(out) == 0 and [r for r, _ in out.rejected] == [0, 1]
    assert out.rejected[0][1] == "empty message value"
    assert len(EventDecoder(codec).decode([])) == 0


def test_other_writer_schema_falls_back_to_the_codec() -> None:
    """A producer on a newer (compatible) schema: another schema id, resolved by the
    codec through the registry, decoded per record between fast-path records."""
    registry = "mock://event-columns-evolution"
    codec = AvroCodec("behavior_event", "beat.events", registry)
    newer = {
        **codec.schema,
        "fields": [*codec.schema["fields"], {"name": "device", "type": "string", "default": ""}],
    }
    newer.pop("__fastavro_parsed", None), newer.pop("__named_schemas", None)
    from confluent_kafka.schema_registry import Schema

    from stream.codec import registry_client

    newer_id = registry_client(registry).register_schema(
        "beat.events-value", Schema(json.dumps(newer), "AVRO")
    )
    event = {"user_id": "u1", "event_id": "e1", "event_time": 1_700_000_000_000, "action": "login",
             "property": None, "value": 2.5, "attributes": {}, "device": "ios"}  # fmt: skip
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(newer), event)
    new_payload = b"\x00" + struct.pack(">I", newer_id) + buf.getvalue()
    old_payload = codec.framing.header() + body({**event, "event_id": "e0"})
    payloads = [old_payload, new_payload, old_payload]
    assert_agrees(codec, payloads)
    out = EventDecoder(codec).decode(payloads)
    assert out.event_id.to_pylist() == ["e0", "e1", "e0"] and out.row.tolist() == [0, 1, 2]


def test_a_different_schema_layout_is_refused() -> None:
    with pytest.raises(ValueError, match="update LAYOUT"):
        EventDecoder(AvroCodec("user_embedding", "beat.embeddings"))
