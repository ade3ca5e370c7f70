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

With EventLimits, an event over a limit is rejected with the limit's setting, and no
message costs more than the limits allow: a value over max_event_bytes is not read at all,
and the walk stops reading a map once its entries pass max_attributes, so the passes over
a batch's attribute entries are at most about max_attributes however the maps are made.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np

# pyarrow imports pandas the first time it converts a numpy array (pa.array in _strings):
# 0.25-0.35 s that the events of a stream worker's first batch waited (their windows came
# 0.47 s after them, later ones 0.12 s). Imported with this module, it is start-up time.
import pandas  # noqa: F401
import pyarrow as pa
import pyarrow.compute as pc

from stream.avro_binary import read_long, read_varints, unzigzag
from stream.codec import AvroCodec, DecodeError
from stream.config import EventLimits

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
            self.user_id.take(arrow_index), self.event_id.take(arrow_index),
            self.action.take(arrow_index), self.property.take(arrow_index), self.event_time[index],
            self.value[index], self.row[index], self.rejected,
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
    decodes whatever the fast path does not take. limits: None accepts any size.
    """

    def __init__(self, codec: AvroCodec, limits: EventLimits | None = None) -> None:
        if schema_layout(codec.schema) != LAYOUT:
            raise ValueError(
                f"schema {codec.schema['name']} is not the layout stream/event_columns.py decodes "
                f"({schema_layout(codec.schema)} != {LAYOUT}): "
                "update LAYOUT and EventDecoder._walk with the schema"
            )
        self.codec = codec
        self.limits = limits
        # Payloads written with exactly this schema take the fast path; a registry that does
        # not hold it yet gives none (a reader never registers): empty, all go the codec's way.
        self.header = np.frombuffer(codec.framing.reader_header() or b"", np.uint8)

    def decode(self, values: Sequence[bytes | None]) -> EventColumns:
        """Columns of every decodable value within the limits; the others in ``rejected``
        with the reason."""
        try:
            payloads, sizes = values, np.fromiter(map(len, values), np.int64, len(values))
        except TypeError:  # a None (a tombstone): rare, so only then a pass to replace it
            payloads = [v or b"" for v in values]
            sizes = np.fromiter(map(len, payloads), np.int64, len(payloads))
        limits = self.limits
        too_big = np.flatnonzero(sizes > limits.max_event_bytes) if limits else np.empty(0, int)
        if len(too_big):  # rare: such values are not even copied into the buffer
            skipped = set(too_big.tolist())
            payloads = [b"" if i in skipped else value for i, value in enumerate(payloads)]
        n = len(payloads)
        kept_sizes = sizes.copy()
        kept_sizes[too_big] = 0
        ends = np.cumsum(kept_sizes)  # [n]
        starts = ends - kept_sizes
        if n and ends[-1] > _MAX_BATCH_BYTES:
            raise ValueError(
                f"a batch of {ends[-1]:,} bytes is over 2 GiB: decode fewer messages at a time"
            )
        buffer = pa.py_buffer(b"".join([*payloads, _PAD]))
        data = np.frombuffer(buffer, np.uint8)

        fast = self._has_header(data, starts, ends)
        rows = np.flatnonzero(fast)
        max_attributes = limits.max_attributes if limits else None
        body = starts[rows] + len(self.header)
        walked, ok, attributes = _walk(data, buffer, body, ends[rows], max_attributes)
        slow = np.sort(np.concatenate([np.setdiff1d(np.flatnonzero(~fast), too_big), rows[~ok]]))
        fast_columns = walked.take(np.flatnonzero(ok)) if not ok.all() else walked
        fast_columns.row = rows[fast_columns.row]
        slow_decoded = self._decode_each(payloads, slow)
        columns, attributes = self._merge(fast_columns, attributes[:, ok], slow_decoded)
        if limits:
            limit = limits.max_event_bytes
            columns.rejected += [
                (i, f"an event of {size:,} bytes is over BEAT_MAX_EVENT_BYTES={limit:,}")
                for i, size in zip(too_big.tolist(), sizes[too_big].tolist())
            ]
            columns = _within_limits(columns, attributes, limits)
        columns.bytes = int(sizes.sum())
        return columns

    def _has_header(self, data: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """bool [n]: the payload starts with this codec's own header (framing + schema)."""
        width = len(self.header)
        if not width:
            return np.zeros(len(starts), bool)
        head = data[starts[:, None] + np.arange(width)]  # [n, width]; _PAD keeps the last in bounds
        return (ends - starts >= width) & (head == self.header).all(axis=1)

    def _decode_each(
        self, payloads: list[bytes], rows: np.ndarray
    ) -> tuple[list[int], list[dict], list[tuple[int, str]]]:
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
    def _merge(
        fast: EventColumns,
        fast_attributes: np.ndarray,
        slow: tuple[list[int], list[dict], list[tuple[int, str]]],
    ) -> tuple[EventColumns, np.ndarray]:
        """Fast and slow columns in input order, with their attribute (count, bytes) [2, n]."""
        rows, records, rejected = slow
        fast.rejected = rejected
        if not records:
            return fast, fast_attributes
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
        attributes = np.concatenate([fast_attributes, _record_attributes(records)], axis=1)
        order = np.argsort(both.row, kind="stable")
        return both.take(order), attributes[:, order]


def _record_attributes(records: list[dict]) -> np.ndarray:
    """Attribute (count, bytes of keys and values) of fastavro records, int64 [2, n]."""
    maps = [r.get("attributes") or {} for r in records]
    sizes = [sum(len(k.encode()) + len(v.encode()) for k, v in m.items()) for m in maps]
    return np.array([[len(m) for m in maps], sizes], np.int64).reshape(2, len(records))


def _within_limits(
    columns: EventColumns, attributes: np.ndarray, limits: EventLimits
) -> EventColumns:
    """columns without the events over a limit, which are added to its rejected."""
    checks = [  # (size of each event, the limit's setting, what the size is)
        (_byte_lengths(columns.user_id), "max_id_bytes", "a user_id of {:,} bytes"),
        (_byte_lengths(columns.event_id), "max_id_bytes", "an event_id of {:,} bytes"),
        (_byte_lengths(columns.action), "max_action_bytes", "an action of {:,} bytes"),
        (_byte_lengths(columns.property), "max_property_bytes", "a property of {:,} bytes"),
        (attributes[0], "max_attributes", "{:,} attributes"),
        (attributes[1], "max_attribute_bytes", "attributes of {:,} bytes"),
    ]
    over = np.zeros(len(columns), bool)
    for size, setting, what in checks:
        limit = getattr(limits, setting)
        hit = np.flatnonzero((size > limit) & ~over)
        over[hit] = True
        columns.rejected += [
            (row, f"{what.format(s)} is over BEAT_{setting.upper()}={limit:,}")
            for row, s in zip(columns.row[hit].tolist(), size[hit].tolist())
        ]
    return columns.take(np.flatnonzero(~over)) if over.any() else columns


def _byte_lengths(text: pa.Array) -> np.ndarray:
    return pc.binary_length(text).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)


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
_SCALAR_ROWS = 32  # maps still being read by this few records are finished record by record


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

    def string_map(
        self, rows: np.ndarray, max_entries: int | None
    ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Skips a map<string>: blocks of entries until a zero count; a negative count
        -n means n entries preceded by the block's byte size. Returns the entries of each
        record, int64 [records], and (rows, start, end) of its keys and values, in buffer
        order.

        Each pass reads a block count or one entry of every record still in its map. A
        record whose entries pass max_entries is not read further (its cursor moves to its
        end): it will be rejected for its count. Once only a few records are left (the
        widest maps of a batch), they are finished one at a time: a pass costs the same
        for one record as for thousands, a scalar walk only what the record holds.
        """
        entries = np.zeros(len(self.pos), np.int64)
        spans: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        # entries left in each record's current block; 0: a block count is next
        left = np.zeros(len(rows), np.int64)
        while len(rows) > _SCALAR_ROWS:
            head = left == 0
            done = np.zeros(len(rows), bool)
            if head.any():
                at = rows[head]
                count = self.long(at)
                self.long(at[count < 0])  # the byte size: fastavro reads the entries regardless
                count = np.abs(count)
                self.ok[at[count < 0]] = False  # -2**63 has no absolute value
                entries[at] += np.maximum(count, 0)
                if max_entries is not None:
                    over = entries[at] > max_entries
                    self.pos[at[over]] = self.end[at[over]]
                    count[over] = 0
                left[head] = count
                done[head] = count <= 0
            body = ~head & (left > 0)
            if body.any():
                at = rows[body]
                spans += [(at, *self.string(at)), (at, *self.string(at))]
                left[body] -= 1
            keep = ~done & self.ok[rows]
            rows, left = rows[keep], left[keep]
        for row, block_left in zip(rows.tolist(), left.tolist()):
            spans.append(self._finish_map(row, block_left, entries, max_entries))
        if not spans:
            return entries, (np.empty(0, np.int64),) * 3
        span_rows, start, end = (np.concatenate(parts) for parts in zip(*spans))
        order = np.argsort(start, kind="stable")  # disjoint spans, in buffer order for _strings
        return entries, (span_rows[order], start[order], end[order])

    def _finish_map(
        self, row: int, block_left: int, entries: np.ndarray, max_entries: int | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """string_map for one record, from its cursor with block_left entries left in the
        current block; returns (rows, start, end) of the strings read."""
        begin, end = int(self.pos[row]), int(self.end[row])
        raw = self.data[begin:end].tobytes()
        at, found = 0, []
        try:
            while True:
                if block_left == 0:
                    count, at = read_long(raw, at)
                    if count == 0:
                        break
                    if count < 0:
                        _, at = read_long(raw, at)  # the block's byte size
                    entries[row] += abs(count)
                    if max_entries is not None and entries[row] > max_entries:
                        at = len(raw)  # not read further: rejected for its count
                        break
                    block_left = abs(count)
                for _ in range(2):  # key, value
                    length, at = read_long(raw, at)
                    if length < 0 or at + length > len(raw):
                        raise ValueError("string beyond the record")
                    found.append(at)
                    at += length
                    found.append(at)
                block_left -= 1
        except ValueError:
            self.ok[row] = False
            at = len(raw)
        self.pos[row] = begin + at
        bounds = np.array(found, np.int64).reshape(-1, 2) + begin
        return np.full(len(bounds), row, np.int64), bounds[:, 0], bounds[:, 1]


def _walk(
    data: np.ndarray,
    buffer: pa.Buffer,
    pos: np.ndarray,
    end: np.ndarray,
    max_attributes: int | None,
) -> tuple[EventColumns, np.ndarray, np.ndarray]:
    """behavior_event bodies at [pos, end) of every record: (columns, ok [n], attribute
    (count, bytes of keys and values) [2, n]). Columns hold every record; those of records
    not ok are meaningless."""
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

    entries, entry_spans = c.string_map(np.flatnonzero(c.ok), max_attributes)
    entry_rows, entry_start, entry_end = entry_spans
    c.ok &= c.pos == end  # "trailing bytes" otherwise

    strings = [_strings(buffer, *span) for span in (user_id, event_id, action, property_span)]
    for text in strings:
        c.ok[_invalid_utf8(text)] = False
    c.ok[entry_rows[_invalid_utf8(_strings(buffer, entry_start, entry_end))]] = False
    attribute_bytes = np.bincount(entry_rows, entry_end - entry_start, minlength=n).astype(np.int64)
    user_id, event_id, action, property = (text.view(pa.string()) for text in strings)
    property = _with_nulls(property, has_property)
    columns = EventColumns(user_id, event_id, action, property, event_time, value, np.arange(n))
    return columns, c.ok, np.stack([entries, attribute_bytes])


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
        return np.concatenate(
            [_invalid_utf8(text.slice(0, half)), half + _invalid_utf8(text.slice(half))]
        )


def _with_nulls(text: pa.StringArray, valid: np.ndarray) -> pa.StringArray:
    bitmap = pa.py_buffer(np.packbits(valid, bitorder="little"))
    _, offsets, data = text.buffers()
    return pa.Array.from_buffers(
        pa.string(), len(text), [bitmap, offsets, data], offset=text.offset
    )
