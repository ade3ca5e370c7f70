"""The vectorized encoder writes, for every event, the bytes AvroCodec.encode (fastavro) writes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pytest

from stream.codec import AvroCodec
from stream.event_contract import EVENT_SCHEMA
from stream.event_encoding import EventEncoder

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ALPHABET = ["a", "Z", "0", "_", " ", "é", "ß", "中", "😀", "\x00", "\u200b"]
# Varint lengths change at 2**(7k): times and strings around those edges, and the extremes.
TIMES_MS = [0, -1, 1, 63, 64, -64, -65, 8191, 8192, 2**20, -(2**35), 1_700_000_000_000,
            1_700_000_000_001, -62_135_596_800_000, 253_402_300_799_999]  # fmt: skip
VALUES = [None, 0.0, -0.0, 1.5, -1e300, float("inf"), float("-inf"), float("nan"), 5e-324]


def random_text(rng: np.random.Generator, max_len: int) -> str:
    return "".join(rng.choice(ALPHABET, rng.integers(0, max_len + 1)))


def random_events(rng: np.random.Generator, n: int) -> list[dict]:
    return [
        {
            "user_id": random_text(rng, 200),  # lengths past 127 bytes: two-byte varints
            "event_id": random_text(rng, 12),
            "event_time": EPOCH + timedelta(milliseconds=int(rng.choice(TIMES_MS))),
            "action": random_text(rng, 8),
            "property": None if rng.random() < 0.3 else random_text(rng, 10),
            "value": VALUES[rng.integers(len(VALUES))],
            "attributes": {
                f"k{j}{random_text(rng, 3)}": random_text(rng, 40)
                for j in range(rng.integers(0, 4))
            },
        }
        for _ in range(n)
    ]


def as_batch(events: list[dict]) -> pa.RecordBatch:
    rows = [{**e, "attributes": list(e["attributes"].items())} for e in events]
    return pa.RecordBatch.from_pylist(rows, schema=EVENT_SCHEMA)


@pytest.mark.parametrize("registry", [None, "mock://encoding"])
def test_every_value_is_what_fastavro_writes(registry: str | None) -> None:
    codec = AvroCodec("behavior_event", "beat.events", registry)
    events = random_events(np.random.default_rng(7), 600)

    values = EventEncoder(codec).encode(as_batch(events)).to_pylist()

    assert values == [codec.encode(e) for e in events]


def test_a_sliced_batch_and_null_or_empty_maps() -> None:
    codec = AvroCodec("behavior_event", "beat.events")
    events = random_events(np.random.default_rng(8), 50)
    batch = as_batch(events)
    attributes = pa.array(
        [None if i % 3 == 0 else list(e["attributes"].items()) for i, e in enumerate(events)],
        EVENT_SCHEMA.field("attributes").type,
    )
    batch = batch.set_column(6, EVENT_SCHEMA.field("attributes"), attributes).slice(5, 30)

    values = EventEncoder(codec).encode(batch).to_pylist()

    expected = [codec.encode({**e, "attributes": {} if i % 3 == 0 else e["attributes"]})
                for i, e in enumerate(events)][5:35]  # fmt: skip
    assert values == expected
    assert len(EventEncoder(codec).encode(batch.slice(0, 0))) == 0


def test_events_without_a_required_field_are_refused() -> None:
    events = random_events(np.random.default_rng(9), 3)
    batch = as_batch(events)
    batch = batch.set_column(1, pa.field("event_id", pa.string()), pa.array(["a", None, "c"]))

    with pytest.raises(ValueError, match="1 events have no event_id"):
        EventEncoder(AvroCodec("behavior_event", "beat.events")).encode(batch)
