"""The stream workers' state: one key-value store per assigned partition, user_id -> window.

Stores are caches of the windows topic, which is the changelog: a store is rebuilt from its
partition of beat.windows whenever the partition is assigned (stream_worker.restore), so a
store never needs to survive a crash. The memory store keeps Window objects, ready to merge;
RocksDB (rocksdict) keeps the window messages' bytes, for states larger than memory, and
decodes them when read.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from stream.window import Window


class PartitionStore(Protocol):
    def get_many(self, keys: Sequence[bytes]) -> list[Window | None]: ...
    def put_many(self, keys: Sequence[bytes], windows: Sequence[Window], payloads: Sequence[bytes]) -> None:
        """Store windows under keys; payloads are the same windows as window messages."""
    def delete(self, key: bytes) -> None: ...
    def __len__(self) -> int: ...
    def close(self) -> None: ...


class MemoryStore:
    def __init__(self) -> None:
        self._data: dict[bytes, Window] = {}

    def get_many(self, keys: Sequence[bytes]) -> list[Window | None]:
        get = self._data.get
        return [get(key) for key in keys]

    def put_many(self, keys: Sequence[bytes], windows: Sequence[Window], payloads: Sequence[bytes]) -> None:
        self._data.update(zip(keys, windows))

    def delete(self, key: bytes) -> None:
        self._data.pop(key, None)

    def __len__(self) -> int:
        return len(self._data)

    def close(self) -> None:
        self._data.clear()


class RocksStore:
    """A RocksDB database per partition, emptied when opened (the changelog refills it)."""

    def __init__(self, path: Path, decode: Callable[[bytes], Window]) -> None:
        from rocksdict import Options, Rdict, WriteBatch

        shutil.rmtree(path, ignore_errors=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        options = Options(raw_mode=True)
        self._db = Rdict(str(path), options)
        self._write_batch = WriteBatch
        self._path = path
        self._decode = decode

    def get_many(self, keys: Sequence[bytes]) -> list[Window | None]:
        return [None if value is None else self._decode(value) for value in self._db.get(list(keys))]

    def put_many(self, keys: Sequence[bytes], windows: Sequence[Window], payloads: Sequence[bytes]) -> None:
        batch = self._write_batch(raw_mode=True)
        for key, payload in zip(keys, payloads):
            batch.put(key, payload)
        self._db.write(batch)

    def delete(self, key: bytes) -> None:
        self._db.delete(key)

    def __len__(self) -> int:
        return sum(1 for _ in self._db.keys())

    def close(self) -> None:
        self._db.close()
        shutil.rmtree(self._path, ignore_errors=True)


def open_store(kind: str, data_dir: Path, group: str, partition: int, decode: Callable[[bytes], Window]) -> PartitionStore:
    if kind == "memory":
        return MemoryStore()
    return RocksStore(data_dir / "state" / group / f"partition-{partition}", decode)
