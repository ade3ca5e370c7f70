"""Padded model inputs (a batch of users) from event windows (EventWindow, one user's raw events:
model/event_window.py, imported here too)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from torch import Tensor

from model.beat import MS_PER_DAY
from model.event_window import EventWindow
from model.vocab import Vocabulary


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
