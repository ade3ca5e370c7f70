"""One user's raw events as columns (EventWindow): numpy only, so that what builds windows
(the stream worker, `beat` commands) does not import torch; model.batch makes them inputs."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np


@dataclass
class EventWindow:
    """One user's recent events as columns, oldest first.

    event_time_ms: int64 [n] unix milliseconds, ascending
    action:        str/object [n]
    property:      object [n]; None where an event has no property
    value:         float64 [n]; NaN where an event has no amount (None: no event has one)
    event_id_hash: uint32 [n], optional: the stream's 32-bit hash of each event_id
                   (stream.window.event_id_hashes). With it, BeatEncoder orders the events
                   of one millisecond by it, as the stream does, whatever the caller's order.

    and the user's history before these events, which the window no longer holds (it keeps
    the newest events of a span; a user's tenure and lifetime activity lie before it):
    earlier_events: how many events came before the window
    earlier_value:  the sum of their amounts
    first_event_ms: when the first of them happened (unix ms); None when there are none
    """

    event_time_ms: np.ndarray
    action: np.ndarray
    property: np.ndarray
    value: np.ndarray | None = None
    event_id_hash: np.ndarray | None = None
    earlier_events: int = 0
    earlier_value: float = 0.0
    first_event_ms: int | None = None

    def __post_init__(self) -> None:
        self.event_time_ms = np.asarray(self.event_time_ms, dtype=np.int64)
        self.action = np.asarray(self.action, dtype=object)
        self.property = np.asarray(self.property, dtype=object)
        n = len(self.event_time_ms)
        if self.event_id_hash is not None:
            self.event_id_hash = np.asarray(self.event_id_hash, dtype=np.uint32)
            if len(self.event_id_hash) != n:
                raise ValueError(
                    f"event_id_hash has {len(self.event_id_hash)} values for {n} events"
                )
        if self.value is None:
            self.value = np.full(n, np.nan)
        # None inside an object array (Arrow nulls) is a missing amount as well
        self.value = np.asarray(self.value, dtype=np.float64)
        columns = (self.action, self.property, self.value)
        if self.event_time_ms.ndim != 1 or any(len(column) != n for column in columns):
            raise ValueError(
                "EventWindow columns must be 1-d and of one length; got event_time_ms "
                f"{self.event_time_ms.shape}, action {self.action.shape}, "
                f"property {self.property.shape}, value {self.value.shape}"
            )
        has_first = self.first_event_ms is not None
        if self.earlier_events < 0 or (self.earlier_events > 0) != has_first:
            raise ValueError(
                f"earlier_events {self.earlier_events} and first_event_ms {self.first_event_ms}: "
                "a window with earlier events needs the first one's time, and only then"
            )

    def take(self, index: np.ndarray | slice) -> EventWindow:
        """The events at index (an index array or a slice), in that order; the earlier
        history stays as it is."""
        hashes = None if self.event_id_hash is None else self.event_id_hash[index]
        return replace(
            self,
            event_time_ms=self.event_time_ms[index],
            action=self.action[index],
            property=self.property[index],
            value=self.value[index],
            event_id_hash=hashes,
        )

    def since(self, start: int) -> EventWindow:
        """The events from index `start` on; those before it join the earlier history."""
        if start <= 0:
            return self
        left = slice(None, start)
        return replace(
            self.take(slice(start, None)),
            earlier_events=self.earlier_events + start,
            earlier_value=self.earlier_value + float(np.nansum(self.value[left])),
            first_event_ms=int(
                self.event_time_ms[0] if self.first_event_ms is None else self.first_event_ms
            ),
        )

    def first_event_time(self) -> int | None:
        """The user's first event (unix ms): the first earlier one, else the window's oldest."""
        if self.first_event_ms is not None:
            return self.first_event_ms
        return int(self.event_time_ms[0]) if len(self) else None

    def __len__(self) -> int:
        return len(self.event_time_ms)
