"""A user's rolling window of recent events, and how new events merge into it.

The window holds the newest ``max_events`` events within ``window_ms`` of the user's
newest event, in event-time order (ties broken by event_id, so the order never depends
on arrival order). An event whose event_id is already in the window is ignored; an
event older than the window is dropped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stream.codec import decode_state, encode_state

WINDOW_SCHEMA = "user_window"


@dataclass
class Window:
    """Columns of one user's events, ascending by (event_time, event_id)."""

    user_id: str
    event_id: np.ndarray  # object[n] of str
    event_time: np.ndarray  # int64[n], epoch ms
    action: np.ndarray  # object[n] of str
    property: np.ndarray  # object[n] of str | None
    value: np.ndarray  # float64[n], NaN where the event has no value

    def __len__(self) -> int:
        return len(self.event_time)

    @classmethod
    def empty(cls, user_id: str) -> "Window":
        obj = np.empty(0, dtype=object)
        return cls(user_id, obj, np.empty(0, np.int64), obj, obj, np.empty(0, np.float64))

    @classmethod
    def from_events(cls, user_id: str, events: list[dict]) -> "Window":
        """Events as decoded from beat.events (event_time in epoch ms)."""
        return cls(
            user_id,
            np.array([e["event_id"] for e in events], dtype=object),
            np.array([e["event_time"] for e in events], dtype=np.int64),
            np.array([e["action"] for e in events], dtype=object),
            np.array([e["property"] for e in events], dtype=object),
            np.array([np.nan if e["value"] is None else e["value"] for e in events], np.float64),
        )

    def take(self, index: np.ndarray) -> "Window":
        return Window(
            self.user_id, self.event_id[index], self.event_time[index], self.action[index],
            self.property[index], self.value[index],
        )

    def to_record(self, emitted_at_ms: int) -> dict:
        """The beat.windows message value (schemas/user_window.avsc)."""
        return {
            "user_id": self.user_id,
            "emitted_at": emitted_at_ms,
            "event_id": self.event_id.tolist(),
            "event_time": self.event_time.tolist(),
            "action": self.action.tolist(),
            "property": self.property.tolist(),
            "value": [None if np.isnan(v) else v for v in self.value.tolist()],
        }

    @classmethod
    def from_record(cls, record: dict) -> "Window":
        return cls(
            record["user_id"],
            np.array(record["event_id"], dtype=object),
            np.array(record["event_time"], dtype=np.int64),
            np.array(record["action"], dtype=object),
            np.array(record["property"], dtype=object),
            np.array([np.nan if v is None else v for v in record["value"]], np.float64),
        )

    def to_state(self) -> bytes:
        return encode_state(WINDOW_SCHEMA, self.to_record(0))

    @classmethod
    def from_state(cls, body: bytes) -> "Window":
        return cls.from_record(decode_state(WINDOW_SCHEMA, body))


def concat(a: Window, b: Window) -> Window:
    return Window(
        a.user_id,
        *(np.concatenate([getattr(a, c), getattr(b, c)]) for c in ("event_id", "event_time", "action", "property", "value")),
    )


@dataclass
class MergeCounts:
    duplicates: int  # new events whose event_id was already in the window (or batch)
    too_old: int  # events older than window_ms before the newest one, dropped

def merge(window: Window, new: Window, max_events: int, window_ms: int) -> tuple[Window, MergeCounts]:
    """Merge new events into a window. Events pushed out by ``max_events`` are not
    counted as dropped: that is the window moving on."""
    seen = set(window.event_id.tolist())
    fresh = np.fromiter((eid not in seen for eid in new.event_id.tolist()), bool, len(new))
    # Within one batch the first copy of an event_id wins, like across batches.
    _, first = np.unique(new.event_id[fresh].astype(str), return_index=True)
    fresh_index = np.flatnonzero(fresh)[np.sort(first)]
    merged = concat(window, new.take(fresh_index))

    order = np.lexsort((merged.event_id.astype(str), merged.event_time))
    merged = merged.take(order)
    cutoff = merged.event_time[-1] - window_ms if len(merged) else 0
    too_old = int(np.count_nonzero(merged.event_time < cutoff))
    start = max(too_old, len(merged) - max_events)
    counts = MergeCounts(duplicates=len(new) - len(fresh_index), too_old=too_old)
    return merged.take(np.arange(start, len(merged))), counts
