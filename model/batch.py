"""Event windows (one user's raw events) and padded model inputs (a batch of users)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from torch import Tensor

from model.beat import MS_PER_DAY
from model.vocab import Vocabulary


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


@dataclass
class EventBatch:
    """BEAT's inputs for B users, right-padded to L events, oldest first (see model/beat.py).

    action_ids    [B, L] int64    vocabulary ids, 0 at padding
    property_ids  [B, L] int64    vocabulary ids, 0 at padding
    time_gaps     [B, L] float64  days before the row's reference time, as_of (default: the
                                  row's newest event, which then has age 0)
    padding_mask  [B, L] bool     True for a real event
    event_times   [B, L] int64    unix ms (UTC), for the hour-of-day / day-of-week signals
    values        [B, L] float32  the event's amount; NaN where it has none (and at padding)

    and per row, the user's history before the window (EventWindow's earlier_*):
    earlier_events   [B] float64  events before the window
    earlier_value    [B] float64  the sum of their amounts
    first_event_age  [B] float64  days from the user's first event (earlier or in the window)
                                  to the reference time; 0 for an empty window
    """

    action_ids: Tensor
    property_ids: Tensor
    time_gaps: Tensor
    padding_mask: Tensor
    event_times: Tensor
    values: Tensor
    earlier_events: Tensor
    earlier_value: Tensor
    first_event_age: Tensor

    @classmethod
    def from_windows(
        cls,
        windows: Sequence[EventWindow],
        actions: Vocabulary,
        properties: Vocabulary,
        as_of_ms: int | Sequence[int] | np.ndarray | None = None,
    ) -> EventBatch:
        """Pad windows to the longest one (at least one slot, so an empty window still has a
        row); values the vocabularies have never seen become the out-of-vocabulary id.

        as_of_ms: the moment each embedding is for (unix ms; one for all windows or one per
        window). Ages count back from it, so the newest event's age is how long the user has
        been silent by then. None: each window's newest event (age 0). A window whose newest
        event is after as_of (clock skew, the stream's future tolerance) is taken as of that
        event: a negative silence means nothing.
        """
        lengths = np.array([len(window) for window in windows])
        width = max(int(lengths.max(initial=0)), 1)
        real = np.arange(width) < lengths[:, None]  # [B, width] bool, right-padded
        times = np.zeros((len(windows), width), dtype=np.int64)
        action_ids = np.zeros((len(windows), width), dtype=np.int64)
        property_ids = np.zeros((len(windows), width), dtype=np.int64)
        ages = np.zeros((len(windows), width), dtype=np.float64)
        values = np.full((len(windows), width), np.nan, dtype=np.float32)

        # Boolean-mask assignment fills row by row, matching the order of the concatenation.
        flat_times = np.concatenate([window.event_time_ms for window in windows])
        times[real] = flat_times
        newest = np.array([w.event_time_ms[-1] if len(w) else 0 for w in windows], np.int64)
        reference = newest if as_of_ms is None else np.maximum(newest, as_of_ms)  # [B]
        ages[real] = (np.repeat(reference, lengths) - flat_times) / MS_PER_DAY
        action_ids[real] = actions.lookup(np.concatenate([w.action for w in windows]))
        property_ids[real] = properties.lookup(np.concatenate([w.property for w in windows]))
        values[real] = np.concatenate([w.value for w in windows])
        first = np.array([w.first_event_time() or 0 for w in windows], np.int64)
        first_age = np.where(lengths > 0, (reference - first) / MS_PER_DAY, 0.0)
        earlier_events = np.array([w.earlier_events for w in windows], np.float64)
        earlier_value = np.array([w.earlier_value for w in windows], np.float64)
        columns = (
            action_ids, property_ids, ages, real, times, values,
            earlier_events, earlier_value, first_age,
        )
        return cls(*(torch.from_numpy(column) for column in columns))

    def __len__(self) -> int:
        return self.action_ids.shape[0]

    @property
    def lengths(self) -> Tensor:
        return self.padding_mask.sum(dim=1)  # [B]

    def rows(self, index: Tensor, width: int) -> EventBatch:
        """Rows `index`, cut to their first `width` events."""
        return EventBatch(
            *(t[index, :width] if t.dim() == 2 else t[index] for t in self.inputs().values())
        )

    def to(self, device: str | torch.device) -> EventBatch:
        """On device; from pinned memory (pin_memory) the copy to a GPU is asynchronous."""
        moved = {f.name: getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)}
        return replace(self, **moved)

    def pin_memory(self) -> EventBatch:
        """In page-locked host memory, which a GPU copies from without a staging copy and
        without blocking the host (CUDA only)."""
        return replace(self, **{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})

    def inputs(self) -> dict[str, Tensor]:
        """Keyword arguments for Beat.forward."""
        return {f.name: getattr(self, f.name) for f in fields(self)}
