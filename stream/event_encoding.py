"""Encode a whole RecordBatch of events into beat.events values at once.

fastavro writes one record per call from a dict, and a dict per event (``to_pylist``,
datetimes) costs more than the write: about 50 µs an event in all. Here each piece of the
behavior_event body becomes a binary column with one element per event: the varints
(zig-zag longs, lengths, union indices) from numpy arrays, the strings as Arrow already
holds them, the doubles as their 8 little-endian bytes. Arrow's
``binary_join_element_wise`` then concatenates the columns row by row into the values.
The map of attributes is encoded per entry the same way and joined per event with
``binary_join`` over the map's offsets.

The values are byte for byte what ``AvroCodec.encode`` writes for the same events
(tests/test_event_encoding.py). One difference in what is accepted: a map row that holds
a key twice is written with both entries (Avro allows it; readers keep the last value),
where a dict would have kept one.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stream.codec import AvroCodec
from stream.event_columns import LAYOUT, schema_layout
from stream.event_contract import EVENT_SCHEMA

_MAX_VARINT = 10  # bytes of a 64-bit varint
_REQUIRED = ("user_id", "event_id", "action")  # strings that cannot be null
# EVENT_SCHEMA's types; nulls are checked here, with messages that say which field.
_TYPES = pa.schema([f.with_nullable(True) for f in EVENT_SCHEMA])


class EventEncoder:
    """Vectorized writer of one topic's behavior_event values (framing header + body)."""

    def __init__(self, codec: AvroCodec) -> None:
        if schema_layout(codec.schema) != LAYOUT:
            raise ValueError(
                f"schema {codec.schema['name']} is not the layout stream/event_encoding.py writes "
                f"({schema_layout(codec.schema)} != {LAYOUT}): update LAYOUT and EventEncoder.encode with the schema"
            )
        self.header = pa.scalar(codec.framing.header(), pa.binary())

    def encode(self, batch: pa.RecordBatch) -> pa.BinaryArray:
        """The value of every event of a batch in stream.event_contract.EVENT_SCHEMA layout [num_rows]."""
        batch = batch.select(_TYPES.names).cast(_TYPES)
        for name in _REQUIRED:
            if batch[name].null_count:
                raise ValueError(f"{batch[name].null_count} events have no {name}: every event needs one "
                                 "(schemas/behavior_event.avsc)")  # fmt: skip
        event_time = batch["event_time"].cast(pa.int64()).to_numpy()  # [n] epoch ms
        pieces = [
            self.header,
            *_string(batch["user_id"]),
            *_string(batch["event_id"]),
            _varints(_zigzag(event_time)),
            *_string(batch["action"]),
            *_optional_string(batch["property"]),
            *_optional_double(batch["value"]),
            *_string_map(batch["attributes"]),
        ]
        return pc.binary_join_element_wise(*pieces, b"")


def _zigzag(n: np.ndarray) -> np.ndarray:
    """int64 -> uint64 as Avro writes longs: small magnitudes, small numbers."""
    n = n.astype(np.int64)
    return ((n << 1) ^ (n >> 63)).view(np.uint64)


def _varints(z: np.ndarray, present: np.ndarray | None = None) -> pa.BinaryArray:
    """One element per value of z (uint64, zig-zag applied): its varint, 7 bits a byte,
    low first, the high bit set on all but the last. Empty where `present` is False."""
    n = len(z)
    size = np.ones(n, np.int64)
    for k in range(1, _MAX_VARINT):
        size += z >= np.uint64(1) << np.uint64(7 * k)
    if present is not None:
        size[~present] = 0
    width = int(size.max()) if n else 0
    k = np.arange(width)
    groups = (z[:, None] >> (7 * k).astype(np.uint64)) & np.uint64(0x7F)  # [n, width]
    groups |= np.where(k < size[:, None] - 1, np.uint64(0x80), np.uint64(0))
    data = groups.astype(np.uint8)[k < size[:, None]]  # the first size[i] bytes of each row
    return _binary(size, data)


def _binary(size: np.ndarray, data: np.ndarray) -> pa.BinaryArray:
    offsets = np.zeros(len(size) + 1, np.int32)
    np.cumsum(size, out=offsets[1:])
    return pa.Array.from_buffers(pa.binary(), len(size), [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def _lengths(text: pa.Array) -> np.ndarray:
    return pc.binary_length(text).fill_null(0).to_numpy().astype(np.int64)


def _string(text: pa.Array) -> list[pa.Array]:
    """An Avro string: its byte length, then its bytes."""
    return [_varints(_zigzag(_lengths(text))), text.cast(pa.binary())]


def _union_index(present: np.ndarray) -> pa.BinaryArray:
    """The branch of a ["null", X] union: 0 (null) or 1, one zig-zag byte."""
    return _binary(np.ones(len(present), np.int64), np.where(present, 2, 0).astype(np.uint8))


def _optional_string(text: pa.Array) -> list[pa.Array]:
    present = text.is_valid().to_numpy(zero_copy_only=False)
    length = _varints(_zigzag(_lengths(text)), present)
    return [_union_index(present), length, text.cast(pa.binary()).fill_null(b"")]


def _optional_double(number: pa.Array) -> list[pa.Array]:
    present = number.is_valid().to_numpy(zero_copy_only=False)
    raw = number.fill_null(0.0).to_numpy().astype("<f8").view(np.uint8).reshape(-1, 8)  # [n, 8]
    return [_union_index(present), _binary(np.where(present, 8, 0), raw[present].ravel())]


def _string_map(attributes: pa.MapArray) -> list[pa.Array]:
    """An Avro map<string> in one block: count, the entries (key, value), a zero count.
    An empty (or null) map is the zero count alone."""
    offsets = attributes.offsets.to_numpy()  # [n + 1], into the children of an unsliced array
    first, last = int(offsets[0]), int(offsets[-1])
    keys = attributes.keys.slice(first, last - first)
    items = attributes.items.slice(first, last - first)
    if items.null_count:
        raise ValueError(f"{items.null_count} attributes have a null value: map values must be strings")
    entries = pc.binary_join_element_wise(*_string(keys), *_string(items), b"")  # [entries]
    null = attributes.is_null().to_numpy(zero_copy_only=False)
    per_event = pa.ListArray.from_arrays(pa.array(offsets - first, pa.int32()), entries, mask=pa.array(null))
    joined = pc.binary_join(per_event, b"").fill_null(b"")  # [n] the entries of each event, back to back
    count = np.where(null, 0, np.diff(offsets))
    return [_varints(_zigzag(count), count > 0), joined, pa.scalar(b"\x00", pa.binary())]
