"""The symbol table of (action, property) pairs stays bounded whatever producers send: the
pairs no stored window names are freed and their ids reused, and windows never notice; the
encoder's decoding never adds to it."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from stream import window
from stream.codec import AvroCodec
from stream.config import Settings
from stream.producer import EventProducer
from stream.state import MemoryStore, SymbolBound, open_store
from stream.window import (
    ROW,
    NewEvents,
    Symbols,
    Window,
    encode_window_body,
    merge_batch,
    record_event_window,
)

from conftest import read_topic, stream_worker
from reference_windows import T0, event, expected_windows, window_columns

WINDOW_MS = 90 * 86_400_000
T0_MS = 1_780_000_000_000


@pytest.fixture(autouse=True)
def symbols() -> Iterator[Symbols]:
    """A table of this test's own: a reclaim frees what other tests' windows name."""
    own = Symbols()
    saved, window.SYMBOLS = window.SYMBOLS, own
    yield own
    window.SYMBOLS = saved


def unique_events(start: int, n: int, users: int) -> NewEvents:
    """Events start..start+n-1, event i of user i % users, one ms apart, each with a
    property of its own (p<i>)."""
    index = np.arange(start, start + n)
    return NewEvents(
        user=index % users,
        event_time=T0_MS + index,
        id_hash=index.astype(np.uint32),
        action=pa.array(["view"] * n, pa.string()),
        property=pa.array([f"p{i}" for i in index.tolist()], pa.string()),
        value=np.full(n, np.nan),
    )


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_million_unique_properties_keep_the_table_bounded_and_windows_exact(
    symbols: Symbols,
) -> None:
    users, max_events, batch, total = 1_000, 16, 10_000, 1_000_000
    names = [f"u{u}" for u in range(users)]
    keys = [name.encode() for name in names]
    store, bound = MemoryStore(), SymbolBound(20_000)
    started, rss_after_warmup = time.perf_counter(), 0
    for start in range(0, total, batch):
        merged, _ = merge_batch(
            store.get_many(keys), names, unique_events(start, batch, users), max_events, WINDOW_MS
        )
        store.put_many(keys, merged)
        bound.enforce([store])
        if start == 10 * batch:  # the table's columns have reached their size
            rss_after_warmup = rss_bytes()
    took = time.perf_counter() - started
    growth = rss_bytes() - rss_after_warmup

    live = users * max_events  # each window names its 16 newest events' pairs
    assert len(symbols) <= 2 * live + batch and symbols.slots <= 2 * live + batch
    assert bound.bound == 2 * live  # the live pairs passed the 20,000 asked for
    # Unbounded, the million pairs took about 450 MB here (350 MB after the warm-up).
    assert growth < 40 << 20, f"RSS grew {growth >> 20} MiB after warm-up"
    codec = AvroCodec("user_window", "beat.windows")
    for u, got in enumerate(store.get_many(keys)):
        newest = range(total - users + u - (max_events - 1) * users, total, users)
        events = got.columns()
        assert events["property"] == [f"p{i}" for i in newest], names[u]
        assert events["event_time"] == [T0_MS + i for i in newest], names[u]
        assert got.earlier == (total // users - max_events, 0.0, T0_MS + u), names[u]
        if u % 97 == 0:  # the message carries the same strings as the window's ids
            record = codec.decode(codec.framing.header() + encode_window_body(got, 0))
            assert record["properties"] == got.properties and record["actions"] == ["view"] * 16
    print(f"1M unique properties: {took:.1f}s, table {len(symbols)} pairs, RSS +{growth >> 20} MiB")


def test_the_encoders_decoding_adds_nothing_to_the_table(symbols: Symbols) -> None:
    """The encoder worker and `beat refresh` decode window messages with
    record_event_window: nothing would ever free pairs interned for them, and ever new
    properties grew their table without end."""
    users, max_events, total = 10_000, 16, 200_000
    names = [f"u{u}" for u in range(users)]
    windows, _ = merge_batch(
        [None] * users, names, unique_events(0, total, users), max_events, WINDOW_MS
    )
    records = [w.to_record(0) for w in windows]
    expected = [(w.columns(), w.earlier) for w in windows]
    assert symbols.reclaim(np.empty(0, np.int32)) == total  # the table is empty now

    for record, (want, earlier) in zip(records, expected):
        got = record_event_window(record)
        assert got.property.tolist() == want["property"] and got.action.tolist() == want["action"]
        assert got.event_time_ms.tolist() == want["event_time"]
        assert got.event_id_hash.tolist() == want["id_hash"]
        assert (got.earlier_events, got.earlier_value, got.first_event_ms) == earlier
    assert len(symbols) == 0 and symbols.slots == total  # no new slot either


def test_a_reclaim_frees_only_unnamed_pairs_and_reuses_their_ids(
    symbols: Symbols, tmp_path: Path
) -> None:
    rows = np.zeros(2, ROW)
    rows["symbol"] = [0, 1]
    kept = Window.from_strings("a", rows, ["view", "buy"], ["books", None])
    gone = Window.from_strings("b", rows, ["view", "view"], ["games", "music"])
    for kind in ("memory", "rocksdb"):
        store = open_store(kind, tmp_path, "group", 0)
        store.put_many([b"a"], [kept])
        assert sorted(store.symbol_ids().tolist()) == sorted(kept.symbols.tolist()), kind
        store.close()
    assert symbols.reclaim(kept.symbols) == 2 and len(symbols) == 2
    assert (kept.actions, kept.properties) == (["view", "buy"], ["books", None])
    reused = symbols.ids(["login", "view"], ["x", "books"])  # a new pair, a kept one
    assert reused.tolist() == [gone.symbols.min(), kept.symbols[0]] and symbols.slots == 4
    assert symbols.strings(reused)[0].tolist() == ["login", "view"]


def test_a_worker_frees_pairs_between_batches_and_its_windows_stay_exact(
    settings: Settings, tmp_path: Path
) -> None:
    """Through a worker process with the RocksDB store: two waves of events, each with a
    property of its own, past a small table bound; the second wave reuses freed ids."""
    settings = settings.model_copy(
        update={"symbol_table_pairs": 1_000, "max_events": 4, "state_store": "rocksdb"}
    )
    waves = [
        [{**event(f"u{u}", n, T0 + timedelta(minutes=n)), "property": f"p{u}-{n}"}
         for u in range(200) for n in range(wave * 15, wave * 15 + 15)]
        for wave in range(2)
    ]  # fmt: skip
    producer, codec = EventProducer(settings), AvroCodec("user_window", settings.windows_topic)
    log = tmp_path / "stream.log"
    with stream_worker(settings, log):
        for sent, wave in enumerate(waves, 1):
            producer.send(wave)
            producer.flush()
            expected = expected_windows([e for w in waves[:sent] for e in w], max_events=4)
            want = {user: window_columns(events) for user, events in expected.items()}

            def done(messages: list) -> bool:
                latest = {}
                for message in messages:
                    if message.value() is not None:
                        got = Window.from_record(codec.decode(message.value()))
                        latest[got.user_id] = got.columns()
                return latest == want

            read_topic(settings, settings.windows_topic, until=done, timeout_s=60)
    assert "symbol pairs no window uses" in log.read_text()
