"""Users' whole event histories as one Arrow table: what pretraining and evaluation read.

One row per user, sorted by user_id; each list column holds that user's events, oldest
first, ordered by (event_time, event_id) with repeated event_ids removed. `beat export`
writes this table to Parquet and `beat pretrain` builds it by replaying beat.events.

    user_id     string
    event_time  list<int64>    unix ms, ascending
    action      list<string>
    property    list<string>   null where an event has no property
    value       list<float64>  null where an event has no value
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from model.batch import EventWindow

SEQUENCE_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("event_time", pa.list_(pa.int64())),
        ("action", pa.list_(pa.string())),
        ("property", pa.list_(pa.string())),
        ("value", pa.list_(pa.float64())),
    ]
)
EVENT_COLUMNS = ("event_time", "action", "property", "value")


def read_sequences(path: str | Path) -> pa.Table:
    table = pq.read_table(path)
    if not table.schema.equals(SEQUENCE_SCHEMA):
        raise ValueError(
            f"{path} is not a sequences file (see model/sequences.py); "
            f"its schema is\n{table.schema}"
        )
    return table


def write_sequences(table: pa.Table, path: str | Path) -> None:
    pq.write_table(table.cast(SEQUENCE_SCHEMA), path, compression="zstd")


def lengths(table: pa.Table) -> np.ndarray:
    """Events per user, int64 [users]."""
    return pc.list_value_length(table["event_time"]).to_numpy(zero_copy_only=False).astype(np.int64)


def keep_events(table: pa.Table, keep: np.ndarray) -> pa.Table:
    """The table with only the events where keep (bool, one per event, in flattened order)
    is True; users left with no event keep their (empty) row."""
    kept_before = np.concatenate([[0], np.cumsum(keep)])  # [events + 1]
    first = starts(table)
    counts = kept_before[first + lengths(table)] - kept_before[first]  # [users]
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    columns = {"user_id": table["user_id"].combine_chunks()}
    for name in EVENT_COLUMNS:
        values = pc.list_flatten(table[name]).combine_chunks().filter(pa.array(keep))
        columns[name] = pa.ListArray.from_arrays(offsets, values)
    return pa.table(columns).cast(SEQUENCE_SCHEMA)


def split_at(table: pa.Table, cutoff_ms: int) -> tuple[pa.Table, pa.Table]:
    """(events before cutoff_ms, events at or after it), both with every user's row."""
    times = pc.list_flatten(table["event_time"]).to_numpy()
    before = times < cutoff_ms
    return keep_events(table, before), keep_events(table, ~before)


def to_windows(table: pa.Table, max_events: int | None = None) -> list[EventWindow]:
    """One EventWindow per user (the newest max_events events when given)."""
    first = starts(table)
    ends = first + lengths(table)
    if max_events is not None:
        first = np.maximum(first, ends - max_events)
    flat = {name: pc.list_flatten(table[name]) for name in EVENT_COLUMNS}
    times = flat["event_time"].to_numpy()
    action = flat["action"].to_numpy(zero_copy_only=False)
    prop = flat["property"].to_numpy(zero_copy_only=False)
    value = flat["value"].fill_null(np.nan).to_numpy(zero_copy_only=False)
    return [
        EventWindow(times[s:e], action[s:e], prop[s:e], value[s:e])
        for s, e in zip(first.tolist(), ends.tolist())
    ]


def starts(table: pa.Table) -> np.ndarray:
    """Index of each user's first event in the flattened columns, int64 [users]."""
    n = lengths(table)
    return np.concatenate([[0], np.cumsum(n)[:-1]]).astype(np.int64) if len(n) else n
