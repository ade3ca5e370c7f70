"""The stream workers' state: one key-value store per assigned partition, user_id -> window.

Stores are caches of the windows topic, which is the changelog: a store is rebuilt from its
partition of beat.windows whenever the partition is assigned (StreamWorker.restore), so a
store never needs to survive a crash. The memory store keeps Window objects, ready to merge.
RocksDB (rocksdict) keeps states larger than memory, each window as its rows and its symbol
ids (valid for the process that wrote them, which is the store's whole life: it is emptied
when opened), so reading one back is two numpy views, not an Avro decode.

Symbol ids stay valid because SymbolBound frees only the pairs no stored window names:
between batches every window of the stream worker is in a store.
"""

from __future__ import annotations

import shutil
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

import stream.window
from stream.window import ROW, Window


class PartitionStore(Protocol):
    def get_many(self, keys: Sequence[bytes]) -> list[Window | None]: ...
    def put_many(self, keys: Sequence[bytes], windows: Sequence[Window]) -> None: ...
    def delete(self, key: bytes) -> None: ...
    def symbol_ids(self) -> np.ndarray: ...
    def __len__(self) -> int: ...
    def close(self) -> None: ...


class MemoryStore:
    def __init__(self) -> None:
        self._data: dict[bytes, Window] = {}

    def get_many(self, keys: Sequence[bytes]) -> list[Window | None]:
        get = self._data.get
        return [get(key) for key in keys]

    def put_many(self, keys: Sequence[bytes], windows: Sequence[Window]) -> None:
        self._data.update(zip(keys, windows))

    def delete(self, key: bytes) -> None:
        self._data.pop(key, None)

    def symbol_ids(self) -> np.ndarray:
        """The SYMBOLS ids the stored windows name (with repeats), int32."""
        return _joined(w.symbols for w in self._data.values())

    def __len__(self) -> int:
        return len(self._data)

    def close(self) -> None:
        self._data.clear()


# rows, symbols, and the earlier history: events, their amounts' sum, the first one's time
# (-1: none; an event time is never negative)
_HEADER = struct.Struct("<IIqdq")


class RocksStore:
    """A RocksDB database per partition, emptied when opened (the changelog refills it)."""

    def __init__(self, path: Path) -> None:
        from rocksdict import Options, Rdict, WriteBatch

        shutil.rmtree(path, ignore_errors=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = Rdict(str(path), Options(raw_mode=True))
        self._write_batch = WriteBatch
        self._path = path

    def get_many(self, keys: Sequence[bytes]) -> list[Window | None]:
        values = self._db.get(list(keys))
        return [None if value is None else _unpack(key, value) for key, value in zip(keys, values)]

    def put_many(self, keys: Sequence[bytes], windows: Sequence[Window]) -> None:
        batch = self._write_batch(raw_mode=True)
        for key, window in zip(keys, windows):
            batch.put(key, _pack(window))
        self._db.write(batch)

    def delete(self, key: bytes) -> None:
        self._db.delete(key)

    def symbol_ids(self) -> np.ndarray:
        """The SYMBOLS ids the stored windows name (with repeats), int32: a scan of the
        whole store, which SymbolBound makes rare."""
        return _joined(_unpack_symbols(value) for value in self._db.values())

    def __len__(self) -> int:
        return sum(1 for _ in self._db.keys())

    def close(self) -> None:
        self._db.close()
        shutil.rmtree(self._path, ignore_errors=True)


def _pack(window: Window) -> bytes:
    symbols = window.symbols.astype(np.int32, copy=False)
    first = -1 if window.first_event_ms is None else window.first_event_ms
    header = _HEADER.pack(
        len(window.rows), len(symbols), window.earlier_events, window.earlier_value, first
    )
    return b"".join([header, window.rows.tobytes(), symbols.tobytes()])


def _unpack(key: bytes, value: bytes) -> Window:
    n_rows, _, earlier_events, earlier_value, first = _HEADER.unpack_from(value)
    rows = np.frombuffer(value, ROW, n_rows, _HEADER.size)
    first_event_ms = None if first < 0 else first
    return Window(
        key.decode(), rows, _unpack_symbols(value), earlier_events, earlier_value, first_event_ms
    )


def _unpack_symbols(value: bytes) -> np.ndarray:
    n_rows, n_symbols = _HEADER.unpack_from(value)[:2]
    return np.frombuffer(value, np.int32, n_symbols, _HEADER.size + ROW.itemsize * n_rows)


def _joined(ids: Iterable[np.ndarray]) -> np.ndarray:
    """Arrays of symbol ids as one, int32 (empty when there are none)."""
    return np.concatenate([np.empty(0, np.int32), *ids])


class SymbolBound:
    """When to free the SYMBOLS pairs no stored window names any more: once the table holds
    more than `pairs` (BEAT_SYMBOL_TABLE_PAIRS), or twice what the windows named at the last
    reclaim when that is more. So the table stays within max(pairs, 2 x live pairs) plus one
    batch's new pairs, whatever producers send, and a reclaim (a scan of every store) comes
    only after at least as many new pairs as it keeps: its cost per new pair stays bounded
    even when the live pairs alone exceed `pairs`.
    """

    def __init__(self, pairs: int) -> None:
        self.pairs = pairs
        self.bound = pairs

    def enforce(self, stores: Iterable[PartitionStore]) -> int | None:
        """Reclaim if the table is over its bound; the pairs freed, or None if it was not.
        Call it only when every window in use is in `stores`."""
        symbols = stream.window.SYMBOLS  # looked up here: benches and tests swap in their own
        if len(symbols) <= self.bound:
            return None
        freed = symbols.reclaim(_joined(store.symbol_ids() for store in stores))
        self.bound = max(self.pairs, 2 * len(symbols))
        return freed


def open_store(kind: str, data_dir: Path, group: str, partition: int) -> PartitionStore:
    if kind == "memory":
        return MemoryStore()
    return RocksStore(data_dir / "state" / group / f"partition-{partition}")
