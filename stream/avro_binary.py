"""Avro's binary encoding, the pieces beatstream writes and reads without fastavro: longs
(zig-zag, then base-128 varints, low bits first), length-prefixed strings, the branch index
of a ["null", X] union, doubles, and arrays and maps written as one block and an empty one.

Two forms of each. Scalar functions build one value's bytes (window messages,
stream/window.py). Vectorized ones work on whole columns, one element per record: writing
(the producer's encoder, stream/event_encoding.py) and reading varints at many cursors at
once (the decoder's walk, stream/event_columns.py). What they write is byte for byte what
fastavro writes (tests/test_window.py, tests/test_event_encoding.py).
"""

from __future__ import annotations

import struct
from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

MAX_VARINT = 10  # bytes of a 64-bit varint
_DOUBLE = struct.Struct("<d")  # Avro doubles are little-endian IEEE 754

# ---------------------------------------------------------------------------------------
# Scalar: one value's bytes.
# ---------------------------------------------------------------------------------------


def unsigned_varint(n: int) -> bytes:
    """A non-negative int as a base-128 varint, low groups first: Avro's longs after zig-zag,
    and protobuf's varints as they are."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


@lru_cache(maxsize=64)  # a batch's emit time repeats in every window message of the batch
def _zigzag_varint(n: int) -> bytes:
    return unsigned_varint((n << 1) ^ (n >> 63))


# Lengths and counts are mostly small: looked up.
_SMALL_LONGS = [_zigzag_varint(n) for n in range(1 << 14)]


def write_long(n: int) -> bytes:
    return _SMALL_LONGS[n] if 0 <= n < len(_SMALL_LONGS) else _zigzag_varint(n)


def write_string(text: str) -> bytes:
    data = text.encode()
    return write_long(len(data)) + data


def write_optional_string(text: str | None) -> bytes:
    """A ["null", "string"] union."""
    return b"\x00" if text is None else b"\x02" + write_string(text)


def write_double(x: float) -> bytes:
    return _DOUBLE.pack(x)


def write_optional_long(n: int | None) -> bytes:
    """A ["null", "long"] union."""
    return b"\x00" if n is None else b"\x02" + write_long(n)


def write_array(items: list[bytes]) -> bytes:
    """Encoded items as an array: one block of them, then the empty block that ends it."""
    return write_long(len(items)) + b"".join(items) + b"\x00" if items else b"\x00"


# ---------------------------------------------------------------------------------------
# Vectorized writing: one binary element per record, for pc.binary_join_element_wise.
# ---------------------------------------------------------------------------------------


def zigzag(n: np.ndarray) -> np.ndarray:
    """int64 -> uint64 as Avro writes longs: small magnitudes, small numbers."""
    n = n.astype(np.int64)
    return ((n << 1) ^ (n >> 63)).view(np.uint64)


def varints(z: np.ndarray, present: np.ndarray | None = None) -> pa.BinaryArray:
    """One element per value of z (uint64, zig-zag applied): its varint, 7 bits a byte,
    low first, the high bit set on all but the last. Empty where `present` is False."""
    n = len(z)
    size = np.ones(n, np.int64)
    for k in range(1, MAX_VARINT):
        size += z >= np.uint64(1) << np.uint64(7 * k)
    if present is not None:
        size[~present] = 0
    width = int(size.max()) if n else 0
    k = np.arange(width)
    groups = (z[:, None] >> (7 * k).astype(np.uint64)) & np.uint64(0x7F)  # [n, width]
    groups |= np.where(k < size[:, None] - 1, np.uint64(0x80), np.uint64(0))
    data = groups.astype(np.uint8)[k < size[:, None]]  # the first size[i] bytes of each row
    return binary_array(size, data)


def binary_array(size: np.ndarray, data: np.ndarray) -> pa.BinaryArray:
    """A binary array of len(size) elements laid end to end in data."""
    offsets = np.zeros(len(size) + 1, np.int32)
    np.cumsum(size, out=offsets[1:])
    return pa.Array.from_buffers(
        pa.binary(), len(size), [None, pa.py_buffer(offsets), pa.py_buffer(data)]
    )


def end_to_end(values: pa.BinaryArray) -> bytes:
    """The values of a binary array back to back, as one bytes (its data buffer's slice)."""
    offsets = np.frombuffer(values.buffers()[1], np.int32, len(values) + 1, 4 * values.offset)
    return values.buffers()[2][int(offsets[0]) : int(offsets[-1])].to_pybytes()


def _lengths(text: pa.Array) -> np.ndarray:
    return pc.binary_length(text).fill_null(0).to_numpy().astype(np.int64)


def strings(text: pa.Array) -> list[pa.Array]:
    """Avro strings: each one's byte length, then its bytes."""
    return [varints(zigzag(_lengths(text))), text.cast(pa.binary())]


def union_indices(present: np.ndarray) -> pa.BinaryArray:
    """The branch of a ["null", X] union: 0 (null) or 1, one zig-zag byte."""
    return binary_array(np.ones(len(present), np.int64), np.where(present, 2, 0).astype(np.uint8))


def optional_strings(text: pa.Array) -> list[pa.Array]:
    """["null", "string"] unions; a null string is the branch index alone."""
    present = text.is_valid().to_numpy(zero_copy_only=False)
    length = varints(zigzag(_lengths(text)), present)
    return [union_indices(present), length, text.cast(pa.binary()).fill_null(b"")]


def optional_doubles(number: pa.Array) -> list[pa.Array]:
    """["null", "double"] unions: the branch index, then 8 little-endian bytes."""
    present = number.is_valid().to_numpy(zero_copy_only=False)
    raw = number.fill_null(0.0).to_numpy().astype("<f8").view(np.uint8).reshape(-1, 8)  # [n, 8]
    return [union_indices(present), binary_array(np.where(present, 8, 0), raw[present].ravel())]


def string_maps(attributes: pa.MapArray) -> list[pa.Array]:
    """Avro map<string>s in one block: count, the entries (key, value), a zero count.
    An empty (or null) map is the zero count alone."""
    offsets = attributes.offsets.to_numpy()  # [n + 1], into the children of an unsliced array
    first, last = int(offsets[0]), int(offsets[-1])
    keys = attributes.keys.slice(first, last - first)
    items = attributes.items.slice(first, last - first)
    if items.null_count:
        raise ValueError(
            f"{items.null_count} attributes have a null value: map values must be strings"
        )
    entries = pc.binary_join_element_wise(*strings(keys), *strings(items), b"")  # [entries]
    null = attributes.is_null().to_numpy(zero_copy_only=False)
    per_event = pa.ListArray.from_arrays(
        pa.array(offsets - first, pa.int32()), entries, mask=pa.array(null)
    )
    joined = pc.binary_join(per_event, b"").fill_null(b"")  # [n] each map's entries
    count = np.where(null, 0, np.diff(offsets))
    return [varints(zigzag(count), count > 0), joined, pa.scalar(b"\x00", pa.binary())]


def read_long(raw: bytes, at: int) -> tuple[int, int]:
    """The Avro long at raw[at]: (value, position after it). ValueError if its varint runs
    past raw or MAX_VARINT bytes; like read_varints, bits beyond 64 are dropped."""
    value = 0
    for k in range(MAX_VARINT):
        if at + k >= len(raw):
            raise ValueError("varint beyond the record")
        byte = raw[at + k]
        value |= (byte & 0x7F) << (7 * k)
        if byte < 0x80:
            value &= (1 << 64) - 1
            return (value >> 1) ^ -(value & 1), at + k + 1
    raise ValueError(f"varint of more than {MAX_VARINT} bytes")


# ---------------------------------------------------------------------------------------
# Vectorized reading.
# ---------------------------------------------------------------------------------------


def read_varints(data: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The varints starting at data[pos]: (value uint64, size in bytes int64, indices into
    pos of those with no last byte within MAX_VARINT). Most are one byte, so later bytes
    are read only where a varint goes on; data must hold MAX_VARINT bytes past each pos."""
    byte = data[pos]
    value = (byte & 0x7F).astype(np.uint64)
    size = np.ones(len(pos), np.int64)
    going = np.flatnonzero(byte >= 0x80)
    for k in range(1, MAX_VARINT):
        if not len(going):
            break
        byte = data[pos[going] + k]
        value[going] |= (byte & 0x7F).astype(np.uint64) << np.uint64(7 * k)
        size[going] += 1
        going = going[byte >= 0x80]
    return value, size, going


def unzigzag(z: np.ndarray) -> np.ndarray:
    """uint64 varint values -> the int64 longs they encode."""
    return (z >> np.uint64(1)).astype(np.int64) ^ -(z & np.uint64(1)).astype(np.int64)
