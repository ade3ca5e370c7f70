"""Reference windows for the tests, computed the slow obvious way from every event sent,
independently of stream.window: the events tests send, and the windows they should give."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa

from stream.window import event_id_hashes

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)
ACTIONS = ["page_view", "search", "add_to_cart", "purchase", "login"]
PROPERTIES = ["books", "games", "travel", None]
USERS = 40  # of traffic()


def event(user: str, n: int, at: datetime, action: str | None = None) -> dict:
    return {
        "user_id": user,
        "event_id": f"{user}-{n}",
        "event_time": at,
        "action": action or ACTIONS[n % len(ACTIONS)],
        "property": PROPERTIES[n % len(PROPERTIES)],
        "value": 9.5 * n if n % 3 == 0 else None,
        "attributes": {"n": str(n)},
    }


def login_event(user: str, n: int, now: datetime, **fields: object) -> dict:
    """A plain valid event (a login, (10 - n) minutes before now): the filler between the
    hostile messages of the dead-letter and limit tests; fields override any value."""
    return {
        "user_id": user,
        "event_id": f"{user}-{n}",
        "event_time": now - timedelta(minutes=10 - n),
        "action": "login",
        "property": None,
        "value": None,
        "attributes": {},
        **fields,
    }


def id_hash(event: dict) -> int:
    """The platform's 32-bit event-id hash (a hash function, not the window logic under test)."""
    return int(event_id_hashes(pa.array([event["event_id"]]))[0])


def expected_windows(
    events: list[dict], max_events: int = 256, window_days: float = 90
) -> dict[str, list[dict]]:
    """Each user's window: the first of each (event-id hash, time), ordered by (time, hash),
    those within window_days of the newest, the newest max_events of them."""
    by_user: dict[str, dict[tuple, dict]] = {}
    for e in events:
        by_user.setdefault(e["user_id"], {}).setdefault((id_hash(e), e["event_time"]), e)
    windows = {}
    for user, unique in by_user.items():
        ordered = sorted(unique.values(), key=lambda e: (e["event_time"], id_hash(e)))
        newest = ordered[-1]["event_time"]
        recent = [e for e in ordered if e["event_time"] >= newest - timedelta(days=window_days)]
        windows[user] = recent[-max_events:]
    return windows


def ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def window_columns(window: list[dict]) -> dict[str, list]:
    """An expected window in the layout of Window.columns() (values kept as float32)."""
    return {
        "event_time": [ms(e["event_time"]) for e in window],
        "id_hash": [id_hash(e) for e in window],
        "action": [e["action"] for e in window],
        "property": [e["property"] for e in window],
        "value": [None if e["value"] is None else float(np.float32(e["value"])) for e in window],
    }


def traffic(n_events: int, seed: int) -> list[dict]:
    """Zipf-like activity over 120 days in random order (so late events and events
    older than a user's 90-day window abound), with a tenth re-sent as duplicates."""
    rng = random.Random(seed)
    weights = [1 / (rank + 1) for rank in range(USERS)]
    counts: dict[str, int] = {}
    events = []
    for user in rng.choices([f"u{i:02d}" for i in range(USERS)], weights, k=n_events):
        counts[user] = counts.get(user, 0) + 1
        at = T0 + timedelta(minutes=rng.randrange(120 * 24 * 60))
        events.append(event(user, counts[user], at))
    duplicates = rng.sample(events, n_events // 10)
    for copy in duplicates:
        events.insert(rng.randrange(events.index(copy), len(events) + 1), copy)
    return events
