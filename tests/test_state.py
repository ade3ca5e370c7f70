"""The stream workers' partition stores: memory (Window objects) and RocksDB (rows + symbol ids)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stream.state import open_store
from stream.window import ROW, Window


def window(user: str, n: int, earlier: tuple[int, float, int | None] = (0, 0.0, None)) -> Window:
    rows = np.zeros(n, ROW)
    rows["time_lo"] = np.arange(n)
    return Window.from_strings(user, rows, ["view"], ["books"], earlier)


def test_stores_keep_the_latest_window_per_key_and_forget_on_close(tmp_path: Path) -> None:
    for kind in ("memory", "rocksdb"):
        store = open_store(kind, tmp_path, "group", 3)
        store.put_many([b"a", b"b"], [window("a", 2), window("b", 1)])
        newer = window("a", 5, (7, 12.5, 1_700_000_000_000))
        store.put_many([b"a"], [newer])
        store.delete(b"b")
        got = store.get_many([b"a", b"b", b"c"])
        assert got[0].rows.tobytes() == newer.rows.tobytes() and got[0].actions == ["view"], kind
        assert got[0].user_id == "a" and got[0].columns() == newer.columns(), kind
        assert got[0].earlier == (7, 12.5, 1_700_000_000_000), kind
        assert got[1:] == [None, None], kind
        assert len(store) == 1, kind
        store.close()
    # A RocksDB store is a cache of beat.windows: its files go when the partition does,
    # and a store opened again starts empty (restore() refills it from the topic).
    assert not (tmp_path / "state" / "group" / "partition-3").exists()
    assert len(open_store("rocksdb", tmp_path, "group", 3)) == 0
