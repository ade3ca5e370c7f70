"""Which partition a key belongs to: the Java client's murmur2 partitioner, vectorized.

beatstream keeps a user's window with the partition number of the user's events, and its
own producers use librdkafka's ``murmur2_random`` (the Java client's, and faust's), so a
user's events, windows and state share a number. A producer with another partitioner
(confluent-kafka's default, crc32) puts some users' events elsewhere; the stream worker
finds them with ``key_partitions`` and moves them to their partition of the repartition
topic, as Kafka Streams does, so every user has one window whatever the producers used.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_SEED, _M = np.uint32(0x9747B28C), np.uint32(0x5BD1E995)


def key_partitions(keys: pa.Array, partitions: int) -> np.ndarray:
    """The partition of each key (bytes) among `partitions`, int64 [n]: murmur2 of the key,
    its sign bit cleared, modulo the partition count, as the Java client computes it. Keys
    must not be null. Each distinct key is hashed once."""
    if partitions < 1:
        raise ValueError(f"a topic has at least one partition, not {partitions}")
    distinct = pc.dictionary_encode(keys)
    hashes = murmur2(distinct.dictionary.cast(pa.binary()))
    home = (hashes & np.uint32(0x7FFFFFFF)).astype(np.int64) % partitions
    return home[distinct.indices.to_numpy(zero_copy_only=False)]


def murmur2(keys: pa.BinaryArray) -> np.ndarray:
    """Kafka's murmur2 (seed 0x9747b28c) of each key, uint32 [n]: the key's bytes as
    little-endian 4-byte words, then its 1-3 trailing bytes, all keys at once."""
    n = len(keys)
    if not n:
        return np.empty(0, np.uint32)
    _, offset_buffer, data_buffer = keys.buffers()
    offsets = np.frombuffer(offset_buffer, np.int32)[keys.offset : keys.offset + n + 1]
    offsets = offsets.astype(np.int64)
    length = np.diff(offsets)
    width = (int(length.max(initial=0)) // 4 + 2) * 4  # a word of zeros past every key
    data = np.frombuffer(data_buffer or b"", np.uint8)
    row = np.repeat(np.arange(n), length)
    padded = np.zeros((n, width), np.uint8)
    column = np.arange(len(row)) - (offsets[:-1] - offsets[0])[row]
    padded[row, column] = data[offsets[0] : offsets[-1]]
    words = padded.view("<u4")  # [n, width / 4]
    h = _SEED ^ length.astype(np.uint32)
    with np.errstate(over="ignore"):
        full = length // 4
        for j in range(int(full.max(initial=0))):
            going = full > j
            k = words[going, j] * _M
            k ^= k >> np.uint32(24)
            h[going] = (h[going] * _M) ^ (k * _M)
        tail_at = full * 4
        tail = length % 4
        rows = np.arange(n)
        for i in (2, 1, 0):  # the Java switch falls through from the highest trailing byte
            has = tail > i
            h[has] ^= padded[rows[has], tail_at[has] + i].astype(np.uint32) << np.uint32(8 * i)
        h[tail > 0] *= _M
        h ^= h >> np.uint32(13)
        h *= _M
        h ^= h >> np.uint32(15)
    return h
