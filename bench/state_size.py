"""Stream-worker state size: bytes per stored event, and memory / disk per 1M users with full
windows.

    .venv/bin/python bench/state_size.py [--users 100000]

Full windows (256 events) are taken from the heaviest users of a synthetic history, so
their symbol tables (distinct action/property pairs) are those of real personas, and
repeated over --users users. Measured at --users and scaled to 1M (the stores grow
linearly): the memory store's allocations (Window objects, keys and the dict; tracemalloc),
a RocksDB store's files after a flush and compaction, and the window messages (what
beat.windows, the changelog, holds per user after compaction).
Writes bench/results/state_size.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from stream.codec import AvroCodec  # noqa: E402
from stream.state import MemoryStore, RocksStore  # noqa: E402
from stream.synthetic import SyntheticEvents  # noqa: E402
from stream.window import ROW, NewEvents, Window, encode_window_body, event_id_hashes, merge_batch  # noqa: E402

RESULTS = REPO / "bench" / "results"
MAX_EVENTS, WINDOW_MS = 256, 90 * 86_400_000
MILLION = 1_000_000


def template_windows(count: int) -> list[Window]:
    """Full windows of the heaviest synthetic users (at most count of them)."""
    start = datetime(2024, 1, 1, tzinfo=UTC)
    history = pa.Table.from_batches(
        list(SyntheticEvents(n_users=3_000, seed=1).history(start, start + timedelta(days=30)))
    )
    users = history["user_id"].combine_chunks().dictionary_encode()
    user_ids = users.dictionary.to_pylist()
    new = NewEvents(
        users.indices.to_numpy().astype(np.int64),
        history["event_time"].cast(pa.int64()).to_numpy(),
        event_id_hashes(history["event_id"].combine_chunks()),
        history["action"].combine_chunks(),
        history["property"].combine_chunks(),
        history["value"].to_numpy(zero_copy_only=False).astype(np.float64),
    )
    windows, _ = merge_batch([None] * len(user_ids), user_ids, new, MAX_EVENTS, WINDOW_MS)
    full = [w for w in windows if len(w) == MAX_EVENTS]
    return full[:count]


def fresh_copy(template: Window, user_id: str) -> Window:
    """Its own rows and symbol ids, as a window merged or restored by a worker has."""
    return Window(user_id, template.rows.copy(), template.symbols.copy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=100_000)
    args = parser.parse_args()
    templates = template_windows(500)
    codec = AvroCodec("user_window", "beat.windows")
    header = codec.framing.header()
    keys = [f"u{i:07d}".encode() for i in range(args.users)]

    # tracemalloc sees Python objects and numpy buffers alike; the resident set would not
    # grow while freed memory (the synthetic history's) is reused.
    store = MemoryStore()
    tracemalloc.start()
    for start in range(0, args.users, 10_000):
        chunk = keys[start : start + 10_000]
        windows = [
            fresh_copy(templates[(start + i) % len(templates)], key.decode())
            for i, key in enumerate(chunk)
        ]
        store.put_many(chunk, windows)
        del windows
    memory_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    store.close()

    payloads = [header + encode_window_body(t, 1_700_000_000_000) for t in templates]
    directory = Path(tempfile.mkdtemp(prefix="beat-rocks-"))
    rocks = RocksStore(directory / "p0")
    for start in range(0, args.users, 10_000):
        chunk = keys[start : start + 10_000]
        rocks.put_many(chunk, [templates[(start + i) % len(templates)] for i in range(len(chunk))])
    rocks._db.flush()
    rocks._db.compact_range(None, None)
    disk_bytes = sum(f.stat().st_size for f in (directory / "p0").rglob("*") if f.is_file())
    rocks.close()
    shutil.rmtree(directory, ignore_errors=True)

    symbols = np.array([len(t.actions) for t in templates])
    message_bytes = np.array([len(p) for p in payloads])
    scale = MILLION / args.users
    result = {
        "users_measured": args.users,
        "events_per_window": MAX_EVENTS,
        "row_bytes_per_event": ROW.itemsize,
        "symbols_per_window_median": float(np.median(symbols)),
        "message_bytes_per_user_mean": float(message_bytes.mean()),
        "message_bytes_per_event_mean": float(message_bytes.mean() / MAX_EVENTS),
        "memory_store_gib_per_1m_users": memory_bytes * scale / 2**30,
        "memory_store_bytes_per_event": memory_bytes / args.users / MAX_EVENTS,
        "rocksdb_gib_per_1m_users": disk_bytes * scale / 2**30,
        "rocksdb_bytes_per_event": disk_bytes / args.users / MAX_EVENTS,
        "changelog_gib_per_1m_users": float(message_bytes.mean()) * MILLION / 2**30,
    }
    for name, value in result.items():
        print(f"{name:34} {value:,.2f}" if isinstance(value, float) else f"{name:34} {value:,}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "state_size.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS / 'state_size.json'}")


if __name__ == "__main__":
    main()
