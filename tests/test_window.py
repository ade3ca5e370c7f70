"""stream.window.merge: the window is a function of the set of events seen, whatever the
order, the batching, or how often a batch is replayed (what crash recovery relies on)."""

from __future__ import annotations

import random

import pytest

from stream.window import Window, merge

from test_pipeline import expected_windows, ms
from test_recovery import traffic, window_columns

MAX_EVENTS, WINDOW_DAYS = 256, 90


def as_records(events: list[dict]) -> list[dict]:
    return [{**e, "event_time": ms(e["event_time"])} for e in events]


def columns(window: Window) -> tuple[list, ...]:
    record = window.to_record(0)
    return tuple(record[c] for c in ("event_id", "event_time", "action", "property", "value"))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_batches_in_any_order_with_replays_give_the_window_of_all_events(seed: int) -> None:
    rng = random.Random(seed)
    events = [e for e in traffic(3000, seed) if e["user_id"] in ("u00", "u01", "u05")]
    expected = expected_windows(events, MAX_EVENTS, WINDOW_DAYS)
    for user, wanted in expected.items():
        mine = as_records([e for e in events if e["user_id"] == user])
        window, start = Window.empty(user), 0
        while start < len(mine):
            end = start + rng.randint(1, 40)
            # After a crash, events since the last commit are merged a second time.
            replay = rng.randrange(max(0, start - 30), start + 1) if rng.random() < 0.3 else start
            window, _ = merge(window, Window.from_events(user, mine[replay:end]), MAX_EVENTS, WINDOW_DAYS * 86_400_000)
            start = end
        assert columns(window) == window_columns(wanted), user
        assert len(window) <= MAX_EVENTS


def test_state_round_trip_keeps_every_column() -> None:
    events = as_records([e for e in traffic(500, 4) if e["user_id"] == "u00"])
    window, _ = merge(Window.empty("u00"), Window.from_events("u00", events), MAX_EVENTS, WINDOW_DAYS * 86_400_000)
    assert columns(Window.from_state(window.to_state())) == columns(window)
