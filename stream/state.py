"""The stream workers' state: one key-value store per assigned partition, user_id -> window.

Stores are caches of the windows topic, which is the changelog: a store is rebuilt from its
partition of beat.windows whenever the partition is assigned (stream_worker.restore), so a
store never needs to survive a crash. RocksDB (rocksdict) keeps large states out of memory.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol


class PartitionStore(Protocol):
    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]: ...
    def put_many(self, keys: Sequence[bytes], values: Sequence[bytes]) -> None: ...
    def delete(self, key: bytes) -> None: ...
    def __len__(self) -> int: ...
    def close(self) -> None: ...


class MemoryStore:
    def __init__(self) -> None:
        self._data: dict[bytes, bytes] = {}

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        get = self._data.get
        return [get(key) for key in keys]

    def put_many(self, keys: Sequence[bytes], values: Sequence[bytes]) -> None:
        self._data.update(zip(keys, values))

    def delete(self, key: bytes) -> None:
        self._data.pop(key, None)

    def __len__(self) -> int:
        return len(self._data)

    def close(self) -> None:
        self._data.clear()


class RocksStore:
    """A RocksDB database per partition, emptied when opened (the changelog refills it)."""

    def __init__(self, path: Path) -> None:
        from rocksdict import Options, Rdict, WriteBatch

        shutil.rmtree(path, ignore_errors=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        options = Options(raw_mode=True)
        self._db = Rdict(str(path), options)
        self._write_batch = WriteBatch
        self._path = path

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        return self._db.get(list(keys))

    def put_many(self, keys: Sequence[bytes], values: Sequence[bytes]) -> None:
        batch = self._write_batch(raw_mode=True)
        for key, value in zip(keys, values):
            batch.put(key, value)
        self._db.write(batch)

    def delete(self, key: bytes) -> None:
        self._db.delete(key)

    def __len__(self) -> int:
        return sum(1 for _ in self._db.keys())

    def close(self) -> None:
        self._db.close()
        shutil.rmtree(self._path, ignore_errors=True)


def open_store(kind: str, data_dir: Path, group: str, partition: int) -> PartitionStore:
    if kind == "memory":
        return MemoryStore()
    return RocksStore(data_dir / "state" / group / f"partition-{partition}")
