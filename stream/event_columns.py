"""Decode a batch of beat.events values into columns, all records at once.

fastavro decodes one record per call into a dict: about 3 µs an event before anything
else happens. Here the batch is joined into one byte buffer and the behavior_event schema
is walked field by field for every record together: each step reads, for all records,
the field at their cursor (numpy gathers over the cursor positions) and advances the
cursors. Strings never become Python objects: their (start, end) pairs index the buffer
and Arrow gathers them into StringArrays.

Anything the vectorized walk does not accept exactly (another framing or writer schema,
a corrupt body, invalid UTF-8...) goes to the codec's per-record decode: a record written
with another resolvable schema is decoded there, anything else is rejected with the
codec's own DecodeError message, the reason the stream worker writes to the dead-letter
topic. So this module accepts exactly what ``AvroCodec.decode`` accepts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa

from stream.avro_binary import read_varints, unzigzag
from stream.codec import AvroCodec, DecodeError

# The writer layout the vectorized walk implements: behavior_event as shipped. A schema
# change must be mirrored in _walk, which __init__ checks against the codec's schema.
LAYOUT = (
    ("user_id", "string"),
    ("event_id", "string"),
    ("event_time", "long"),
    ("action", "string"),
    ("property", ("null", "string")),
    ("value", ("null", "double")),
    ("attributes", "map<string>"),
)
_PAD = bytes(16)  # after the last payload, so fixed-width reads past a cursor stay in bounds
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# event_time the codec can turn into a datetime (years 1..9999); others go to the codec.
_MIN_MS, _MAX_MS = -62_135_596_800_000, 253_402_300_799_999
_MAX_BATCH_BYTES = 2**31 - 1 - len(_PAD)  # Arrow string offsets are int32


@dataclass
class EventColumns:
    """Decoded events as columns, in input order; row[i] is the input index of event i."""

    user_id: pa.StringArray
    event_id: pa.StringArray
    action: pa.StringArray
    property: pa.StringArray  # null where the event has none
    event_time: np.ndarray  # int64 epoch ms
    value: np.ndarray  # float64, NaN where the event has none
    row: np.ndarray  # int64 index into the decoded batch
    rejected: list[tuple[int, str]] = field(default_factory=list)  # (input index, reason)
    bytes: int = 0  # of the input values, decoded or not

    def __len__(self) -> int:
        return len(self.row)

    def take(self, index: np.ndarray) -> EventColumns:
        """The events at index (ints into these columns); rejected is kept as is."""
        arrow_index = pa.array(index)
        return EventColumns(
            self.user_id.take(arrow_index), self.event_id.take(arrow_index), self.action.take(arrow_index),
            self.property.take(arrow_index), self.event_time[index], self.value[index], self.row[index],
            self.rejected,
        )  # fmt: skip


def schema_layout(schema: dict) -> tuple:
    def kind(t: object) -> object:
        if isinstance(t, list):
            return tuple(kind(b) for b in t)
        if isinstance(t, dict):
            return f"map<{kind(t['values'])}>" if t["type"] == "map" else kind(t["type"])
        return t

    return tuple((f["name"], kind(f["type"])) for f in schema["fields"])


class EventDecoder:
    """Vectorized decoder of one topic's behavior_event values, with codec fallback.

    codec must decode (at least) the six fields user_id, event_id, event_time, action,
    property and value: it provides the framing header the fast path expects and
    decodes whatever the fast path does not take.
    """

    def __init__(self, codec: AvroCodec) -> None:
        if schema_layout(codec.schema) != LAYOUT:
            raise ValueError(
                f"schema {codec.schema['name']} is not the layout stream/event_columns.py decodes "
                f"({schema_layout(codec.schema)} != {LAYOUT}): update LAYOUT and EventDecoder._walk with the schema"
            )
        self.codec = codec
        self.header = np.frombuffer(codec.framing.header(), np.uint8)

    def decode(self, values: Sequence[bytes | None]) -> EventColumns:
        """Columns of every decodable value; the others in ``rejected`` with the reason."""
        try:
            payloads, sizes = values, np.fromiter(map(len, values), np.int64, len(values))
        except TypeError:  # a None (a tombstone): rare, so only then a pass to replace it
            payloads = [v or b"" for v in values]
            sizes = np.fromiter(map(len, payloads), np.int64, len(payloads))
        n = len(payloads)
        ends = np.cumsum(sizes)  # [n]
        starts = ends - sizes
        if n and ends[-1] > _MAX_BATCH_BYTES:
            raise ValueError(f"a batch of {ends[-1]:,} bytes is over 2 GiB: decode fewer messages at a time")
        buffer = pa.py_buffer(b"".join([*payloads, _PAD]))
        data = np.frombuffer(buffer, np.uint8)

        fast = self._has_header(data, starts, ends)
        rows = np.flatnonzero(fast)
        walked, ok = _walk(data, buffer, starts[rows] + len(self.header), ends[rows])
        slow = np.sort(np.concatenate([np.flatnonzero(~fast), rows[~ok]]))
        fast_columns = walked.take(np.flatnonzero(ok)) if not ok.all() else walked
        fast_columns.row = rows[fast_columns.row]
        columns = self._merge(fast_columns, self._decode_each(payloads, slow))
        columns.bytes = int(ends[-1]) if n else 0
        return columns

    def _has_header(self, data: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """bool [n]: the payload starts with this codec's own header (framing + schema)."""
        width = len(self.header)
        head = data[starts[:, None] + np.arange(width)]  # [n, width]; _PAD keeps the last in bounds
        return (ends - starts >= width) & (head == self.header).all(axis=1)

    def _decode_each(self, payloads: list[bytes], rows: np.ndarray) -> tuple[list[int], list[dict], list[tuple[int, str]]]:
        """The codec's per-record decode of rows: (decoded rows, their records, rejected)."""
        decoded, records, rejected = [], [], []
        for i in rows.tolist():
            try:
                records.append(self.codec.decode(payloads[i]))
                decoded.append(i)
            # OverflowError: fastavro on an event_time beyond datetime's years 1..9999,
            # which AvroCodec.decode lets through; the record is as undecodable.
            except (DecodeError, OverflowError) as err:
                rejected.append((i, str(err)))
        return decoded, records, rejected

    @staticmethod
    def _merge(fast: EventColumns, slow: tuple[list[int], list[dict], list[tuple[int, str]]]) -> EventColumns:
        rows, records, rejected = slow
        fast.rejected = rejected
        if not records:
            return fast
        columns = _records_to_columns(records, np.array(rows, np.int64))
        both = EventColumns(
            *(pa.concat_arrays([a, b]) for a, b in zip(
                (fast.user_id, fast.event_id, fast.action, fast.property),
                (columns.user_id, columns.event_id, columns.action, columns.property))),
            np.concatenate([fast.event_time, columns.event_time]),
            np.concatenate([fast.value, columns.value]),
            np.concatenate([fast.row, columns.row]),
            rejected,
        )  # fmt: skip
        return both.take(np.argsort(both.row, kind="stable"))


def decode_events(values: Sequence[bytes | None], codec: AvroCodec) -> EventColumns:
    """One-off convenience; keep an EventDecoder for repeated batches."""
    return EventDecoder(codec).decode(values)


def _records_to_columns(records: list[dict], rows: np.ndarray) -> EventColumns:
    """Columns from fastavro records (the rare per-record path)."""
    def times(r: dict) -> int:
        t = r["event_time"]
        return (t - _EPOCH) // timedelta(milliseconds=1) if isinstance(t, datetime) else int(t)

    return EventColumns(
        pa.array([r["user_id"] for r in records], pa.string()),
        pa.array([r["event_id"] for r in records], pa.string()),
        pa.array([r["action"] for r in records], pa.string()),
        pa.array([r.get("property") for r in records], pa.string()),
        np.array([times(r) for r in records], np.int64),
        np.array([np.nan if r.get("value") is None else r["value"] for r in records], np.float64),
        rows,
    )


# ---------------------------------------------------------------------------------------
# The vectorized walk. Cursors are int64 positions in `data`; `ok` marks records still
# well-formed. A bad record's cursor is clamped to its own end, so later reads stay inside
# its payload (or the padding) and the spans of one field stay ordered across records.
# ---------------------------------------------------------------------------------------


_ALL = slice(None)  # rows: every record, indexed without a gather


def _subset(rows: np.ndarray | slice, index: np.ndarray) -> np.ndarray:
    """Record indices of rows[index]."""
    return index if rows is _ALL else rows[index]


class _Cursors:
    """Read positions of all records; each method reads one field at the cursors of
    `rows` (indices of records, or _ALL) and moves them past it."""

    def __init__(self, data: np.ndarray, pos: np.ndarray, end: np.ndarray) -> None:
        self.data, self.pos, self.end = data, pos.copy(), end
        self.ok = np.ones(len(pos), bool)

    def skip(self, rows: np.ndarray | slice, size: np.ndarray) -> None:
        here, end = self.pos[rows], self.end[rows]
        new = here + size
        self.ok[rows] &= (size >= 0) & (new <= end)
        self.pos[rows] = np.clip(new, here, end)

    def long(self, rows: np.ndarray | slice) -> np.ndarray:
        """Avro longs, int64 [len(rows)]."""
        value, size, unterminated = read_varints(self.data, self.pos[rows])
        self.ok[_subset(rows, unterminated)] = False  # no last byte within 10: not a long
        self.skip(rows, size)
        return unzigzag(value)

    def string(self, rows: np.ndarray | slice) -> tuple[np.ndarray, np.ndarray]:
        """Length-prefixed bytes: their (start, end) in data [len(rows)] each."""
        length = self.long(rows)
        start = self.pos[rows].copy()  # a view when rows is _ALL
        self.skip(rows, length)
        return start, self.pos[rows].copy()

    def union(self, rows: np.ndarray | slice, branches: int) -> np.ndarray:
        index = self.long(rows)
        self.ok[rows] &= (index >= 0) & (index < branches)
        return index

    def double(self, rows: np.ndarray) -> np.ndarray:
        raw = self.data[self.pos[rows, None] + np.arange(8)]  # [len(rows), 8], little-endian
        self.skip(rows, np.full(len(rows), 8))
        return raw.view("<f8")[:, 0]

    def string_map(self, rows: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Skips a map<string>: blocks of entries until a zero count; a negative count
        -n means n entries preceded by the block's byte size. Returns (rows, start, end)
        of its keys and values, for the UTF-8 check."""
        spans = []
        while len(rows):  # rows about to read a block count
            count = self.long(rows)
            sized = count < 0
            self.long(rows[sized])  # the byte size: fastavro reads the entries regardless
            left = np.abs(count)
            self.ok[rows[left < 0]] = False  # -2**63 has no absolute value
            more = (left > 0) & self.ok[rows]
            rows, left = rows[more], left[more]
            in_block, block_left = rows, left
            while len(in_block):  # one entry of each unfinished block per pass
                spans += [(in_block, *self.string(in_block)), (in_block, *self.string(in_block))]
                block_left = block_left - 1
                going = (block_left > 0) & self.ok[in_block]
                in_block, block_left = in_block[going], block_left[going]
            rows = rows[self.ok[rows]]
        return spans


def _walk(data: np.ndarray, buffer: pa.Buffer, pos: np.ndarray, end: np.ndarray) -> tuple[EventColumns, np.ndarray]:
    """behavior_event bodies at [pos, end) of every record: (columns, ok [n]). Columns
    hold every record; those of records not ok are meaningless."""
    n = len(pos)
    c = _Cursors(data, pos, end)
    user_id = c.string(_ALL)
    event_id = c.string(_ALL)
    event_time = c.long(_ALL)
    c.ok &= (event_time >= _MIN_MS) & (event_time <= _MAX_MS)
    action = c.string(_ALL)

    has_property = c.union(_ALL, 2) == 1
    property_span = (c.pos.copy(), c.pos.copy())  # null: an empty span at the cursor
    present = np.flatnonzero(has_property & c.ok)
    property_span[0][present], property_span[1][present] = c.string(present)

    has_value = c.union(_ALL, 2) == 1
    value = np.full(n, np.nan)
    present = np.flatnonzero(has_value & c.ok)
    value[present] = c.double(present)

    attribute_spans = c.string_map(np.flatnonzero(c.ok))
    c.ok &= c.pos == end  # "trailing bytes" otherwise

    strings = [_strings(buffer, *span) for span in (user_id, event_id, action, property_span)]
    for text in strings:
        c.ok[_invalid_utf8(text)] = False
    for rows, start, stop in attribute_spans:
        c.ok[rows[_invalid_utf8(_strings(buffer, start, stop))]] = False
    user_id, event_id, action, property = (text.view(pa.string()) for text in strings)
    property = _with_nulls(property, has_property)
    return EventColumns(user_id, event_id, action, property, event_time, value, np.arange(n)), c.ok


def _strings(buffer: pa.Buffer, start: np.ndarray, end: np.ndarray) -> pa.BinaryArray:
    """The bytes at [start[i], end[i]) of buffer as one binary array, gathered by Arrow.

    The spans are ordered and disjoint, so [s0, e0, s1, e1, ...] are valid offsets of an
    array over the whole buffer whose even elements are the spans (the odd ones are the
    bytes between them); taking the even ones copies just the spans."""
    n = len(start)
    offsets = np.empty(2 * n + 1, np.int32)  # [2n + 1]
    offsets[0 : 2 * n : 2], offsets[1 : 2 * n : 2] = start, end
    offsets[2 * n] = end[-1] if n else 0
    spans = pa.Array.from_buffers(pa.binary(), 2 * n, [None, pa.py_buffer(offsets), buffer])
    return spans.take(pa.array(np.arange(0, 2 * n, 2)))


def _invalid_utf8(text: pa.BinaryArray) -> np.ndarray:
    """Indices of the elements that are not valid UTF-8: one validation of the whole
    array, bisected only when it fails."""
    try:
        text.cast(pa.string())
        return np.empty(0, np.int64)
    except pa.ArrowInvalid:
        if len(text) == 1:
            return np.zeros(1, np.int64)
        half = len(text) // 2
        return np.concatenate([_invalid_utf8(text.slice(0, half)), half + _invalid_utf8(text.slice(half))])


def _with_nulls(text: pa.StringArray, valid: np.ndarray) -> pa.StringArray:
    bitmap = pa.py_buffer(np.packbits(valid, bitorder="little"))
    _, offsets, data = text.buffers()
    return pa.Array.from_buffers(pa.string(), len(text), [bitmap, offsets, data], offset=text.offset)
