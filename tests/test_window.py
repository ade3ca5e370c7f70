"""stream.window.merge_batch: a window is a function of the set of events seen, whatever the
order, the batching, or how often a batch is replayed (what crash recovery relies on)."""

from __future__ import annotations

import random
import struct

import numpy as np
import pytest

from stream.codec import AvroCodec, SingleObjectFraming, previous_schemas
from stream.window import NewEvents, Window, encode_window_body, merge_batch

from reference_windows import expected_windows, id_hash, ms, traffic, window_columns

MAX_EVENTS, WINDOW_MS = 256, 90 * 86_400_000


def as_records(events: list[dict]) -> list[dict]:
    return [{**e, "event_time": ms(e["event_time"])} for e in events]


def merge_with_replays(records: list[dict], rng: random.Random) -> dict[str, Window]:
    """Each user's window after merging records in batches of random sizes, where after a
    crash (30 % of batches) the events since the last commit are merged a second time."""
    windows: dict[str, Window] = {}
    start = 0
    while start < len(records):
        end = start + rng.randint(1, 300)
        replay = rng.randrange(max(0, start - 200), start + 1) if rng.random() < 0.3 else start
        batch = records[replay:end]
        users = sorted({r["user_id"] for r in batch})
        merged, _ = merge_batch(
            [windows.get(u) for u in users],
            users,
            NewEvents.from_records(batch, users),
            MAX_EVENTS,
            WINDOW_MS,
        )
        windows.update((w.user_id, w) for w in merged)
        start = end
    return windows


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_batches_in_any_order_with_replays_give_the_window_of_all_events(seed: int) -> None:
    events = traffic(3000, seed)
    windows = merge_with_replays(as_records(events), random.Random(seed))
    expected = expected_windows(events, MAX_EVENTS, WINDOW_MS // 86_400_000)
    assert set(windows) == set(expected)
    for user, wanted in expected.items():
        assert windows[user].columns() == window_columns(wanted), user
        assert len(windows[user].actions) == len(
            set(zip(windows[user].actions, windows[user].properties))
        )


def test_merged_windows_own_their_arrays() -> None:
    """A window that viewed the batch's arrays would keep all of them alive for as long as
    it is stored: in a soak the memory store held 150 times its windows' bytes."""
    records = as_records(traffic(500, 5))
    users = sorted({r["user_id"] for r in records})
    merged, _ = merge_batch(
        [None] * len(users), users, NewEvents.from_records(records, users), MAX_EVENTS, WINDOW_MS
    )
    assert all(w.rows.base is None and w.symbols.base is None for w in merged)


def test_counts_duplicates_and_too_old_events_of_the_batch() -> None:
    day = 86_400_000

    def record(user: str, event_id: str, days: int, action: str, prop: str | None,
               value: float | None) -> dict:
        return {"user_id": user, "event_id": event_id, "event_time": days * day,
                "action": action, "property": prop, "value": value}

    first = record("a", "1", 100, "x", None, None)
    records = [
        first,
        dict(first),  # re-sent: a duplicate
        record("a", "2", 5, "y", "p", 2.5),  # 95 days before a's newest: too old
        record("b", "3", 7, "x", "p", None),
    ]
    merged, counts = merge_batch(
        [None, None], ["a", "b"], NewEvents.from_records(records, ["a", "b"]), MAX_EVENTS, WINDOW_MS
    )
    assert (counts.duplicates, counts.too_old) == (1, 1)
    assert [len(w) for w in merged] == [1, 1]
    assert merged[1].columns()["property"] == ["p"]


def test_window_message_round_trip_and_size() -> None:
    events = as_records([e for e in traffic(3000, 4) if e["user_id"] == "u00"])
    (window,), _ = merge_batch(
        [None], ["u00"], NewEvents.from_records(events, ["u00"]), MAX_EVENTS, WINDOW_MS
    )
    codec = AvroCodec("user_window", "beat.windows")
    payload = codec.encode(window.to_record(0))
    back = Window.from_record(codec.decode(payload))
    assert back.rows.tobytes() == window.rows.tobytes() and back.columns() == window.columns()
    assert back.earlier == window.earlier and window.earlier_events > 0  # passed through
    # The row layout of schemas/user_window.avsc, packed here independently: 48-bit time
    # (low 32, high 16), symbol (uint16), event-id hash (uint32), value (float32).
    first = expected_windows(traffic(3000, 4))["u00"][0]
    time_ms = ms(first["event_time"])
    symbol = list(zip(window.actions, window.properties)).index(
        (first["action"], first["property"])
    )
    value = np.nan if first["value"] is None else first["value"]
    packed = struct.pack(
        "<IHHIf", time_ms & 0xFFFFFFFF, time_ms >> 32, symbol, id_hash(first), value
    )
    assert window.rows[:1].tobytes() == packed
    # 16 bytes per event plus the header: framing, user_id, time, the symbol table and the
    # earlier history (two longs and a double).
    symbols = sum(len(a) + len(p or "") + 3 for a, p in zip(window.actions, window.properties))
    assert len(payload) <= 16 * len(window) + symbols + 32 + 20
    # The stream worker's direct encoder writes exactly what fastavro writes.
    assert payload == codec.framing.header() + encode_window_body(window, 0)
    rows = window.rows[:3].copy()
    rows["symbol"] = [2, 0, 1]
    odd = Window.from_strings(
        "ü" * 70, rows, ["a", "ß" * 200, ""], [None, "p", ""], (2**40, -0.5, -(2**45))
    )
    assert codec.encode(odd.to_record(-(2**40))) == codec.framing.header() + encode_window_body(
        odd, -(2**40)
    )
    assert codec.encode(
        Window.empty("x").to_record(1)
    ) == codec.framing.header() + encode_window_body(Window.empty("x"), 1)
    with pytest.raises(ValueError, match="multiple of 16"):
        Window.from_record({**window.to_record(0), "events": b"\x00" * 17})
    with pytest.raises(ValueError, match="earlier events"):
        Window.from_record({**window.to_record(0), "first_event_time": None})


def test_a_window_message_from_before_the_earlier_history_still_decodes() -> None:
    """A changelog written by the previous release restores: its windows have no history."""
    events = as_records([e for e in traffic(300, 6) if e["user_id"] == "u00"])
    (window,), _ = merge_batch(
        [None], ["u00"], NewEvents.from_records(events, ["u00"]), MAX_EVENTS, WINDOW_MS
    )
    old_schema = previous_schemas("user_window")[0]
    old_codec = AvroCodec("user_window", "beat.windows")
    old_codec.schema, old_codec.framing = old_schema, SingleObjectFraming(old_schema)
    record = window.to_record(0)
    old_fields = {f["name"] for f in old_schema["fields"]}
    payload = old_codec.encode({k: v for k, v in record.items() if k in old_fields})
    back = Window.from_record(AvroCodec("user_window", "beat.windows").decode(payload))
    assert back.columns() == window.columns() and back.earlier == (0, 0.0, None)


@pytest.mark.parametrize("seed", [4, 5])
def test_the_earlier_history_counts_every_event_once(seed: int) -> None:
    """Events in time order, in batches of any size, replayed after crashes: every distinct
    event is in the window or in its earlier history, exactly once. In any order, none is
    counted twice (a late event older than what has left may be dropped)."""
    rng = random.Random(seed)
    events = traffic(3000, seed)
    distinct: dict[str, dict] = {}
    for e in as_records(events):
        distinct.setdefault(e["user_id"], {})[(e["event_time"], e["event_id"])] = e
    in_order = sorted(as_records(events), key=lambda e: e["event_time"])
    for records, exact in ((in_order, True), (as_records(events), False)):
        windows = merge_with_replays(records, rng)
        for user, window in windows.items():
            seen = distinct[user].values()
            counted = window.earlier_events + len(window)
            if not exact:
                assert counted <= len(seen)
                continue
            assert counted == len(seen), user
            amounts = [e["value"] for e in seen if e["value"] is not None]
            in_window = np.nansum(window.rows["value"].astype(np.float64))
            assert window.earlier_value + in_window == pytest.approx(sum(amounts), rel=1e-6)
            if window.earlier_events:
                assert window.first_event_ms == min(e["event_time"] for e in seen)


def test_event_window_gives_the_model_strings_and_amounts_in_order() -> None:
    events = as_records([e for e in traffic(500, 5) if e["user_id"] == "u01"])
    (window,), _ = merge_batch(
        [None], ["u01"], NewEvents.from_records(events, ["u01"]), MAX_EVENTS, WINDOW_MS
    )
    model_input = window.event_window()
    expected = expected_windows(traffic(500, 5))["u01"]  # computed without stream.window
    assert len(expected) > 10
    assert model_input.event_time_ms.tolist() == [ms(e["event_time"]) for e in expected]
    assert model_input.action.tolist() == [e["action"] for e in expected]
    assert model_input.property.tolist() == [e["property"] for e in expected]
    amounts = [np.nan if e["value"] is None else np.float32(e["value"]) for e in expected]
    np.testing.assert_array_equal(model_input.value, amounts)  # float32 as stored; NaN: none
    assert np.isnan(model_input.value).any() and not np.isnan(model_input.value).all()


def test_symbol_strings_follow_a_table_that_grows_between_calls() -> None:
    from stream.window import Symbols

    symbols = Symbols()
    seen: list[tuple[str, str | None]] = []
    for step in range(40):  # 1, 2, 3... new pairs a call: past several capacity doublings
        pairs = [(f"a{step}", f"p{step}-{i}" if i else None) for i in range(step + 1)]
        ids = symbols.ids(*zip(*pairs))
        seen += pairs
        asked = np.concatenate([ids, np.arange(len(seen))[::7]])
        actions, properties = symbols.strings(asked)
        assert list(zip(actions.tolist(), properties.tolist())) == [seen[i] for i in asked.tolist()]
