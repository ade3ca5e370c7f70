"""What each pretraining view sees, as of when, and what it must predict (numpy, data side).

For every training user one step draws (sample_views):

1. an as-of time t, uniform in time between the user's (2m)-th event and the end of the
   data (m = min_view_events). Uniform in time, not over events, because that is how a
   server asks: at any moment, whatever the user did last. A user who went quiet is asked
   about long after their last event, which is exactly the silence churn models must read;
   sampling only right after events would never show a silence that lasted.
2. view B: the newest len_b events at or before t; view A: the len_a events before B (two
   adjacent time windows of one user, CoLES-style, for the contrastive loss). A's as-of
   time is uniform in the gap between its last event and B's first. Each view then keeps
   only its events within window_days of its newest one, as served windows do; the user's
   events before a view are its earlier history (the lifetime statistics).
3. each view's ages count back from its as-of time, and its targets look forward from it:
     next event       the first event after the view (none when the data ends first)
     time to next     days from as-of to that event; censored at the end of the data when
                      there is none (we only know it is longer)
     future window    for each horizon H: which actions and properties occur in (t, t + H],
                      and how many events; unknown (censored) when t + H is past the end of
                      the data, so that the end of the data never teaches "silent"

Every draw comes from the caller's numpy Generator, so a step's seed fixes its views.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch
from torch import Tensor

from model.batch import EventBatch
from model.beat import MS_PER_DAY


@dataclass
class UserEvents:
    """Every training user's events as flat arrays, each user's events contiguous and in
    time order: user u's events are [starts[u], starts[u] + lengths[u])."""

    starts: np.ndarray  # int64 [U]
    lengths: np.ndarray  # int64 [U]
    event_time: np.ndarray  # int64 [E] unix ms
    action_ids: np.ndarray  # int32 [E]
    property_ids: np.ndarray  # int32 [E]
    values: np.ndarray  # float32 [E], NaN: no amount
    data_end_ms: int  # the end of the observed data: no event after it is known
    value_before: np.ndarray = field(init=False)  # float64 [E + 1]: amounts before event e

    def __post_init__(self) -> None:
        amounts = np.nan_to_num(self.values).astype(np.float64)
        self.value_before = np.concatenate([[0.0], np.cumsum(amounts)])


@dataclass
class ViewBatch:
    """Two views per user (A of every user, then B: 2B rows) and their targets."""

    inputs: EventBatch  # [2B, W]
    next_action: Tensor  # int64 [2B], 0 where there is no next event
    next_property: Tensor  # int64 [2B]
    has_next: Tensor  # bool [2B]
    gap_days: Tensor  # float32 [2B]: as-of → next event, or → end of data where none
    gap_censored: Tensor  # bool [2B]: no next event, the gap is only known to be longer
    future_actions: Tensor  # float32 [2B, H, action vocabulary]: 1 = occurs within horizon h
    future_properties: Tensor  # float32 [2B, H, property vocabulary]
    future_counts: Tensor  # float32 [2B, H]: events within horizon h
    future_known: Tensor  # bool [2B, H]: the horizon ends before the data does

    def __len__(self) -> int:
        return len(self.has_next)

    def to(self, device: str | torch.device) -> ViewBatch:
        targets = {
            f.name: getattr(self, f.name).to(device, non_blocking=True)
            for f in fields(self)
            if f.name != "inputs"
        }
        return replace(self, inputs=self.inputs.to(device), **targets)


def _uniform_int(rng: np.random.Generator, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """One integer per row, uniform in [low, high] (inclusive)."""
    return low + np.floor(rng.random(len(low)) * (high - low + 1)).astype(np.int64)


def sample_views(
    events: UserEvents,
    users: np.ndarray,
    min_view_events: int,
    max_view_events: int,
    horizons_days: tuple[float, ...],
    vocab_sizes: tuple[int, int],
    rng: np.random.Generator,
    window_days: float | None = None,
) -> ViewBatch:
    """Views and targets of `users` (see the module doc); each needs 2 * min_view_events
    events. window_days: cut each view to the events within window_days of its newest, as
    BeatEncoder cuts what it serves; what is cut off joins the view's earlier history."""
    m, cap = min_view_events, max_view_events
    first, n = events.starts[users], events.lengths[users]  # [B]
    if int(n.min()) < 2 * m:
        raise ValueError(
            f"every user needs at least {2 * m} events for two views of {m}; one has {int(n.min())}"
        )
    times = events.event_time
    # 1. as-of of B: uniform in time from the (2m)-th event to the end of the data
    earliest = times[first + 2 * m - 1].astype(np.float64)
    latest = np.maximum(float(events.data_end_ms), earliest)
    as_of_b = np.floor(earliest + rng.random(len(users)) * (latest - earliest)).astype(np.int64)
    end_b = np.array(
        [  # [B] events at or before as_of_b, per user (>= 2m)
            np.searchsorted(times[f : f + k], t, side="right")
            for f, k, t in zip(first.tolist(), n.tolist(), as_of_b.tolist())
        ]
    )
    # 2. view lengths: B ends at end_b, A ends where B starts
    len_b = _uniform_int(rng, np.full_like(n, m), np.minimum(end_b - m, cap))
    cut = end_b - len_b  # first event of B, relative to the user's first
    len_a = _uniform_int(rng, np.full_like(n, m), np.minimum(cut, cap))
    gap_start, gap_end = times[first + cut - 1], times[first + cut]
    as_of_a = gap_start + np.floor(rng.random(len(users)) * (gap_end - gap_start)).astype(np.int64)

    starts = np.concatenate([first + cut - len_a, first + cut])  # [2B], absolute
    view_lengths = np.concatenate([len_a, len_b])
    if window_days is not None:
        starts, view_lengths = _within_window(times, starts, view_lengths, window_days)
    as_of = np.concatenate([as_of_a, as_of_b])
    after = np.concatenate([first + cut, first + end_b])  # [2B] absolute index of the next event
    user_end = np.concatenate([first + n, first + n])  # [2B] one past the user's last event
    inputs = _view_inputs(events, np.concatenate([first, first]), starts, view_lengths, as_of)
    return _with_targets(events, inputs, as_of, after, user_end, horizons_days, vocab_sizes)


def _within_window(
    times: np.ndarray, starts: np.ndarray, lengths: np.ndarray, window_days: float
) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) of each view cut to the events within window_days of its newest."""
    ends = starts + lengths
    oldest_kept = times[ends - 1] - window_days * MS_PER_DAY  # [R] ms
    cut = np.array(
        [
            s + np.searchsorted(times[s:e], t, side="left")
            for s, e, t in zip(starts.tolist(), ends.tolist(), oldest_kept.tolist())
        ],
        dtype=np.int64,
    )
    return cut, ends - cut


def _view_inputs(
    events: UserEvents,
    user_first: np.ndarray,
    starts: np.ndarray,
    lengths: np.ndarray,
    as_of: np.ndarray,
) -> EventBatch:
    """Events [starts, starts + lengths) of each row, right-padded; ages as of `as_of`; the
    user's events from user_first up to starts are the row's earlier history."""
    width = int(lengths.max())
    real = np.arange(width) < lengths[:, None]  # [R, W]
    index = np.where(real, starts[:, None] + np.arange(width), 0)  # [R, W]
    times = np.where(real, events.event_time[index], 0)
    ages = np.where(real, (as_of[:, None] - times) / MS_PER_DAY, 0.0)
    action_ids = np.where(real, events.action_ids[index], 0).astype(np.int64)
    property_ids = np.where(real, events.property_ids[index], 0).astype(np.int64)
    values = np.where(real, events.values[index], np.nan).astype(np.float32)
    earlier_events = (starts - user_first).astype(np.float64)
    earlier_value = events.value_before[starts] - events.value_before[user_first]
    first_event_age = (as_of - events.event_time[user_first]) / MS_PER_DAY
    columns = (
        action_ids, property_ids, ages, real, times, values,
        earlier_events, earlier_value, first_event_age,
    )
    return EventBatch(*(torch.from_numpy(column) for column in columns))


def _with_targets(
    events: UserEvents,
    inputs: EventBatch,
    as_of: np.ndarray,
    after: np.ndarray,
    user_end: np.ndarray,
    horizons_days: tuple[float, ...],
    vocab_sizes: tuple[int, int],
) -> ViewBatch:
    """Next event, time to it, and the future windows of every view (rows R = 2B)."""
    times, rows = events.event_time, len(as_of)
    has_next = after < user_end
    next_index = np.where(has_next, after, 0)
    gap_end = np.where(has_next, times[next_index], events.data_end_ms)
    gap_days = np.maximum(gap_end - as_of, 0) / MS_PER_DAY

    horizons = np.asarray(horizons_days, dtype=np.float64)  # [H]
    horizon_end = as_of[:, None] + horizons[None] * MS_PER_DAY  # [R, H] ms
    known = horizon_end <= events.data_end_ms  # [R, H]
    # events within (as_of, horizon_end]: [after, stop) of the user's events
    stop = np.array(
        [
            [
                after[r] + np.searchsorted(times[after[r] : user_end[r]], e, side="right")
                for e in ends
            ]
            for r, ends in enumerate(horizon_end.tolist())
        ]
    ).reshape(rows, len(horizons))  # [R, H] absolute
    counts = (stop - after[:, None]).astype(np.float32)  # [R, H]
    future = [np.zeros((rows, len(horizons), size), np.float32) for size in vocab_sizes]
    flat_counts = counts.astype(np.int64).ravel()  # [R * H]
    event = np.repeat(np.repeat(after, len(horizons)), flat_counts)  # [N] events to mark
    event += np.arange(len(event)) - np.repeat(np.cumsum(flat_counts) - flat_counts, flat_counts)
    cell = np.repeat(np.arange(rows * len(horizons)), flat_counts)  # [N] (row, horizon) cell
    for target, ids in zip(future, (events.action_ids, events.property_ids)):
        target.reshape(-1, target.shape[-1])[cell, ids[event]] = 1.0
    return ViewBatch(
        inputs=inputs,
        next_action=torch.from_numpy(np.where(has_next, events.action_ids[next_index], 0)).long(),
        next_property=torch.from_numpy(
            np.where(has_next, events.property_ids[next_index], 0)
        ).long(),
        has_next=torch.from_numpy(has_next),
        gap_days=torch.from_numpy(gap_days.astype(np.float32)),
        gap_censored=torch.from_numpy(~has_next),
        future_actions=torch.from_numpy(future[0]),
        future_properties=torch.from_numpy(future[1]),
        future_counts=torch.from_numpy(counts),
        future_known=torch.from_numpy(known),
    )
