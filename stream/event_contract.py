"""The event contract: the Arrow layout of behavioral events that every part of beatstream
uses (producers, readers, codecs, the window, replay), the time units, and the 64-bit
hashing that event ids and content hashes are made of.

Everything here works on whole columns (numpy / pyarrow), never on one Python object per
event. Nothing here talks to Kafka.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa

EVENT_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("event_id", pa.string(), nullable=False),
        pa.field("event_time", pa.timestamp("ms", tz="UTC"), nullable=False),
        pa.field("action", pa.string(), nullable=False),
        pa.field("property", pa.string()),  # category, merchant, page type...
        pa.field("value", pa.float64()),  # amount, for money actions
        pa.field("attributes", pa.map_(pa.string(), pa.string()), nullable=False),  # may be empty
    ]
)
REQUIRED_FIELDS = ("user_id", "event_time", "action")

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

U64 = np.uint64


def mix64(x: np.ndarray | np.integer | int) -> np.ndarray:
    """splitmix64's finalizer: a bijection on uint64 that scrambles every bit, so distinct
    counters give distinct, random-looking ids and content hashes spread evenly."""
    x = np.array(x, dtype=U64, copy=True)
    x ^= x >> U64(30)
    x *= U64(0xBF58476D1CE4E5B9)
    x ^= x >> U64(27)
    x *= U64(0x94D049BB133111EB)
    x ^= x >> U64(31)
    return x


def key64(*parts: int) -> np.uint64:
    """A 64-bit key from integers (seed, stream, day...)."""
    h = np.uint64(0x9E3779B97F4A7C15)
    for part in parts:
        h = np.uint64(mix64(h ^ np.uint64(part & 0xFFFFFFFFFFFFFFFF)))
    return h


_HEX_PAIRS = np.array([f"{i:02x}".encode() for i in range(256)], dtype="S2")


def hex_ids(words: np.ndarray) -> pa.StringArray:
    """32-hex-digit ids (uuid-like) from one uint64 per event: the word itself (unique when
    the words are) followed by a scrambled copy, built straight into an Arrow buffer."""
    pair = np.stack([words, mix64(words ^ U64(0x5851F42D4C957F2D))], axis=1).astype(">u8")
    text = _HEX_PAIRS[pair.view(np.uint8)].tobytes()
    offsets = np.arange(0, 32 * (len(words) + 1), 32, dtype=np.int32)
    return pa.StringArray.from_buffers(len(words), pa.py_buffer(offsets), pa.py_buffer(text))


def hash_strings(array: pa.Array) -> np.ndarray:
    """A uint64 content hash per string, computed on Arrow's byte buffer: each byte is mixed
    with its position in the string and the per-string sums are read off a cumulative sum."""
    array = array.cast(pa.string())
    n = len(array)
    _, offsets_buffer, data_buffer = array.buffers()
    offsets = np.frombuffer(offsets_buffer, np.int32, n + 1, array.offset * 4).astype(np.int64)
    data = np.frombuffer(data_buffer, np.uint8) if data_buffer else np.empty(0, np.uint8)
    data = data[offsets[0] : offsets[-1]].astype(U64)
    offsets -= offsets[0]
    lengths = np.diff(offsets)
    position = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
    mixed = mix64(data | (position.astype(U64) << U64(8)))
    summed = np.concatenate([[U64(0)], np.cumsum(mixed, dtype=U64)])
    hashed = mix64((summed[offsets[1:]] - summed[offsets[:-1]]) ^ lengths.astype(U64))
    hashed[np.asarray(array.is_null())] = U64(0x2545F4914F6CDD1D)
    return hashed


def epoch_ms(moment: datetime) -> int:
    """Unix milliseconds; a naive datetime is taken as UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // timedelta(milliseconds=1)


def string_map(rows: np.ndarray, keys: pa.Array, values: pa.Array, n: int) -> pa.MapArray:
    """A map<string,string> column of n rows from (row, key, value) entries in any order."""
    order = np.argsort(rows, kind="stable")
    offsets = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))]).astype(np.int32)
    return pa.MapArray.from_arrays(pa.array(offsets), keys.take(order), values.take(order))
