"""Users' rolling windows in a compact binary form, and how a batch of new events merges in.

A window holds a user's newest ``max_events`` events within ``window_ms`` of the user's
newest event, ascending by (event_time, event-id hash). It is stored and sent as

    rows        16 bytes per event (ROW): event_time (48-bit unix ms), symbol (uint16),
                event-id hash (uint32), value (float32, NaN when the event has none)
    symbols     the distinct (action, property) pairs of the window; ``symbol`` indexes them
    earlier     how many of the user's events came before the window, the sum of their
                amounts and the first one's time: what lifetime statistics need of the
                history the window no longer holds

which is the ``events``/``actions``/``properties``/``earlier_*`` of schemas/user_window.avsc,
and also the
stream worker's state (stream/state.py). In memory a window names its symbols by ids in a
process-wide table (SYMBOLS), so merging works on integers only; the stream worker frees
the pairs no stored window uses once the table passes BEAT_SYMBOL_TABLE_PAIRS.

Merging is idempotent, so replaying events after a crash cannot change a window: an event
whose event-id hash and event_time equal those of an event already in the window (or
earlier in the batch) is a duplicate and ignored; a new event older than the window is
dropped and counted; events pushed out by ``max_events`` are the window moving on.

An event joins the earlier history when it leaves the window (too old, or pushed out by
``max_events``), and also when it is new but never stays: it passes through within one batch
(a backlog replayed in large batches). A new event that never stays counts only if it is
newer than the stored window's oldest event, or if nothing has left the window yet: an older
one may be a re-sent copy of an event that already left and was counted, so it is dropped.
merge_batch() does this for every user of a batch at once, on flat numpy columns. (Replay
tells duplicates apart by event_id instead, having the strings: README, "Duplicates have
two rules, on purpose", says where the two differ.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from model.event_window import EventWindow
from stream.avro_binary import (
    write_array,
    write_double,
    write_long,
    write_optional_long,
    write_optional_string,
    write_string,
)
from stream.event_contract import hash_strings

ROW = np.dtype(
    [
        ("time_lo", "<u4"),
        ("time_hi", "<u2"),
        ("symbol", "<u2"),
        ("id_hash", "<u4"),
        ("value", "<f4"),
    ]
)
assert ROW.itemsize == 16
MAX_TIME_MS = 2**48 - 1  # year 10889
_NO_TIME = np.iinfo(np.int64).max  # no earlier event yet: any event time is smaller
MAX_SYMBOLS = 2**16  # distinct (action, property) pairs in one window, so max_events <= 65,536


def event_id_hashes(event_ids: pa.Array) -> np.ndarray:
    """A stable (process- and platform-independent) 32-bit hash per event_id, uint32 [n]."""
    return (hash_strings(event_ids) & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def pack_rows(
    time_ms: np.ndarray, symbol: np.ndarray, id_hash: np.ndarray, value: np.ndarray
) -> np.ndarray:
    rows = np.empty(len(time_ms), ROW)
    rows["time_lo"] = time_ms & 0xFFFFFFFF
    rows["time_hi"] = time_ms >> 32
    rows["symbol"] = symbol
    rows["id_hash"] = id_hash
    rows["value"] = value
    return rows


def row_times(rows: np.ndarray) -> np.ndarray:
    """event_time of each row, int64 unix ms."""
    return (rows["time_hi"].astype(np.int64) << 32) | rows["time_lo"].astype(np.int64)


class Symbols:
    """The (action, property) pairs that windows in this process use, each with a small int id.

    Windows in memory name their symbols by these ids, so a merge never touches the strings
    of stored windows, and each pair's Avro encoding is made once. Ids are slots of numpy
    object columns that grow by doubling, so looking up a window's strings costs the same
    whatever the table's size. A pair stays until reclaim() frees it, given every id the
    live windows still use: the stream worker does so at a batch boundary once the table
    passes its bound (stream/state.py, SymbolBound), and new pairs reuse the freed slots, so
    a producer sending ever new properties cannot grow the table without end (issue 12).
    """

    def __init__(self) -> None:
        self._ids: dict[tuple[str, str | None], int] = {}
        self._slots = 0  # ids handed out so far, held or freed: every id is below it
        self._free: list[int] = []  # freed slots, reused before new ones
        self._held = np.zeros(0, bool)  # by id: whether the slot holds a pair
        self.actions = np.empty(0, object)  # by id: each action
        self.properties = np.empty(0, object)  # each property (None: absent)
        self.avro_actions = np.empty(0, object)  # each action as an Avro string
        self.avro_properties = np.empty(0, object)  # each property as an Avro ["null", "string"]

    def __len__(self) -> int:
        """Pairs held."""
        return len(self._ids)

    @property
    def slots(self) -> int:
        """A bound on ids: every id is below it."""
        return self._slots

    def ids(self, actions: Sequence[str], properties: Sequence[str | None]) -> np.ndarray:
        """The id of each (action, property) pair, int32 [n]; new pairs are added."""
        get = self._ids.get
        found = [get(pair) for pair in zip(actions, properties)]
        for i in [i for i, known in enumerate(found) if known is None]:
            found[i] = self._add(actions[i], properties[i])
        return np.array(found, np.int32)

    def _add(self, action: str, property: str | None) -> int:
        known = self._ids.get((action, property))  # the same new pair twice in one call
        if known is not None:
            return known
        slot = self._free.pop() if self._free else self._new_slot()
        self._ids[(action, property)] = slot
        self._held[slot] = True
        self.actions[slot] = action
        self.properties[slot] = property
        self.avro_actions[slot] = write_string(action)
        self.avro_properties[slot] = write_optional_string(property)
        return slot

    def _new_slot(self) -> int:
        """The next unused slot, the columns doubled when full: amortized O(1) a pair, not
        a copy of the whole table (200k distinct properties made that 16.8 s a batch)."""
        if self._slots == len(self._held):
            size = max(2 * self._slots, 1_024)
            self._held = np.resize(self._held, size)
            self._held[self._slots :] = False
            for name in ("actions", "properties", "avro_actions", "avro_properties"):
                grown = np.empty(size, object)
                grown[: self._slots] = getattr(self, name)[: self._slots]
                setattr(self, name, grown)
        self._slots += 1
        return self._slots - 1

    def strings(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(actions, properties) of ids, object arrays."""
        return self.actions[ids], self.properties[ids]

    def reclaim(self, live: np.ndarray) -> int:
        """Free every pair whose id is not in live; returns how many were freed.

        live must hold every id that a window still in use names: a freed id is given to
        the next new pair, so a window that kept it would read that pair's strings."""
        kept = np.zeros(self._slots, bool)
        kept[live] = True
        dead = np.flatnonzero(self._held[: self._slots] & ~kept)
        for pair in zip(self.actions[dead].tolist(), self.properties[dead].tolist()):
            del self._ids[pair]
        self._held[dead] = False
        for column in (self.actions, self.properties, self.avro_actions, self.avro_properties):
            column[dead] = None  # the strings go now; the slots wait for new pairs
        self._free += dead[::-1].tolist()  # pop() reuses the lowest first
        return len(dead)


SYMBOLS = Symbols()


@dataclass
class Window:
    """One user's window: ROW rows ascending by (event_time, id_hash), its symbol table as
    SYMBOLS ids (row["symbol"] indexes ``symbols``), and the history before it."""

    user_id: str
    rows: np.ndarray  # ROW [n]
    symbols: np.ndarray  # int32 [symbols], ids in SYMBOLS
    earlier_events: int = 0  # events before the window (see the module doc)
    earlier_value: float = 0.0  # the sum of their amounts
    first_event_ms: int | None = None  # the first of them, unix ms; None when there are none

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def empty(cls, user_id: str) -> Window:
        return cls(user_id, np.empty(0, ROW), np.empty(0, np.int32))

    @classmethod
    def from_strings(
        cls,
        user_id: str,
        rows: np.ndarray,
        actions: Sequence[str],
        properties: Sequence[str | None],
        earlier: tuple[int, float, int | None] = (0, 0.0, None),
    ) -> Window:
        return cls(user_id, rows, SYMBOLS.ids(actions, properties), *earlier)

    @property
    def earlier(self) -> tuple[int, float, int | None]:
        return self.earlier_events, self.earlier_value, self.first_event_ms

    @property
    def event_time(self) -> np.ndarray:
        return row_times(self.rows)

    @property
    def actions(self) -> list[str]:
        return SYMBOLS.actions[self.symbols].tolist()

    @property
    def properties(self) -> list[str | None]:
        return SYMBOLS.properties[self.symbols].tolist()

    def to_record(self, emitted_at_ms: int) -> dict:
        """The beat.windows message value (schemas/user_window.avsc)."""
        return {
            "user_id": self.user_id,
            "emitted_at": emitted_at_ms,
            "events": self.rows.tobytes(),
            "actions": self.actions,
            "properties": self.properties,
            "earlier_events": self.earlier_events,
            "earlier_value": self.earlier_value,
            "first_event_time": self.first_event_ms,
        }

    @classmethod
    def from_record(cls, record: dict) -> Window:
        rows, earlier = _checked_record(record)
        return cls.from_strings(
            record["user_id"], rows, record["actions"], record["properties"], earlier
        )

    def event_window(self) -> EventWindow:
        """The model's input: times, the action/property strings and the amount of every event."""
        return _event_window(self.rows, *SYMBOLS.strings(self.symbols), self.earlier)

    def columns(self) -> dict[str, list]:
        """Plain per-event lists (value None where absent): for tests and debugging."""
        events = self.event_window()
        return {
            "event_time": events.event_time_ms.tolist(),
            "id_hash": self.rows["id_hash"].tolist(),
            "action": events.action.tolist(),
            "property": events.property.tolist(),
            "value": [None if np.isnan(v) else v for v in self.rows["value"].tolist()],
        }


def record_event_window(record: dict) -> EventWindow:
    """The model's input of a window message's record (as Window.from_record checks it),
    straight from the record's strings: nothing goes into SYMBOLS. The encoder worker and
    `beat refresh` keep no Window, so pairs interned for them would never be freed, and ever
    new properties would grow their table without end (issue 12)."""
    rows, earlier = _checked_record(record)
    actions = np.array(record["actions"], object)
    properties = np.array(record["properties"], object)
    return _event_window(rows, actions, properties, earlier)


def _checked_record(record: dict) -> tuple[np.ndarray, tuple[int, float, int | None]]:
    """A window record's rows (ROW, a view of its bytes) and earlier history; ValueError
    if they do not fit together."""
    events = record["events"]
    if len(events) % ROW.itemsize:
        raise ValueError(
            f"window of {record['user_id']!r}: {len(events)} event bytes "
            f"is not a multiple of {ROW.itemsize}"
        )
    rows = np.frombuffer(events, ROW)
    if len(record["actions"]) != len(record["properties"]):
        raise ValueError(
            f"window of {record['user_id']!r}: {len(record['actions'])} actions "
            f"for {len(record['properties'])} properties (one of each per symbol)"
        )
    if len(rows) and int(rows["symbol"].max()) >= len(record["actions"]):
        raise ValueError(
            f"window of {record['user_id']!r} "
            f"names a symbol beyond its {len(record['actions'])}"
        )
    earlier = record["earlier_events"], record["earlier_value"], record["first_event_time"]
    if (earlier[0] > 0) != (earlier[2] is not None) or earlier[0] < 0:
        raise ValueError(
            f"window of {record['user_id']!r}: {earlier[0]} earlier events "
            f"and first_event_time {earlier[2]}"
        )
    return rows, earlier


def _event_window(
    rows: np.ndarray,
    actions: np.ndarray,
    properties: np.ndarray,
    earlier: tuple[int, float, int | None],
) -> EventWindow:
    """An EventWindow of ROW rows whose symbols index actions and properties (object [k])."""
    symbol = rows["symbol"]
    return EventWindow(
        row_times(rows), actions[symbol], properties[symbol], rows["value"], rows["id_hash"],
        *earlier,
    )


def encode_window_body(window: Window, emitted_at_ms: int) -> bytes:
    """The Avro body of window.to_record(emitted_at_ms) (schemas/user_window.avsc), built
    directly: fastavro's per-record overhead (15-20 us on this schema) was the stream
    worker's largest cost per window. tests/test_window.py checks it byte for byte."""
    events = window.rows.tobytes()
    return b"".join([
        write_string(window.user_id),
        write_long(emitted_at_ms),
        write_long(len(events)), events,
        write_array(SYMBOLS.avro_actions[window.symbols].tolist()),
        write_array(SYMBOLS.avro_properties[window.symbols].tolist()),
        write_long(window.earlier_events),
        write_double(window.earlier_value),
        write_optional_long(window.first_event_ms),
    ])


@dataclass
class NewEvents:
    """A batch's valid events as columns; ``user`` indexes the batch's list of users."""

    user: np.ndarray  # int64 [n]
    event_time: np.ndarray  # int64 [n], unix ms in [0, MAX_TIME_MS]
    id_hash: np.ndarray  # uint32 [n]
    action: pa.Array  # string [n]
    property: pa.Array  # string [n], null where absent
    value: np.ndarray  # float [n], NaN where absent

    @classmethod
    def from_records(cls, records: Sequence[dict], users: Sequence[str]) -> NewEvents:
        """From decoded events (event_time in unix ms): for tests and small batches."""
        index = {user: i for i, user in enumerate(users)}
        return cls(
            np.array([index[r["user_id"]] for r in records], np.int64),
            np.array([r["event_time"] for r in records], np.int64),
            event_id_hashes(pa.array([r["event_id"] for r in records], pa.string())),
            pa.array([r["action"] for r in records], pa.string()),
            pa.array([r["property"] for r in records], pa.string()),
            np.array([np.nan if r["value"] is None else r["value"] for r in records], np.float64),
        )


@dataclass
class MergeCounts:
    duplicates: int  # new events already in the window (or earlier in the batch)
    too_old: int  # new events older than window_ms before the user's newest event, dropped


def merge_batch(
    stored: Sequence[Window | None],
    users: Sequence[str],
    new: NewEvents,
    max_events: int,
    window_ms: int,
) -> tuple[list[Window], MergeCounts]:
    """Merge each user's new events into their stored window (None: no window yet).

    Every user in ``users`` must have at least one new event. Returns one window per user.
    """
    windows = [w if w is not None else Window.empty(u) for w, u in zip(stored, users)]
    # Joined as bytes: np.concatenate of structured arrays costs ~15 us per array.
    old_rows = np.frombuffer(b"".join([w.rows.tobytes() for w in windows]), ROW)
    old_user = np.repeat(np.arange(len(users)), [len(w) for w in windows])
    symbol_counts = np.array([len(w.symbols) for w in windows], np.int64)
    symbol_start = np.concatenate([[0], np.cumsum(symbol_counts)[:-1]]).astype(np.int64)
    old_symbols = np.concatenate([w.symbols for w in windows]) if windows else np.empty(0, np.int32)
    old_pair = old_symbols[symbol_start[old_user] + old_rows["symbol"]]
    # The new events' pairs: factorized on Arrow, then one SYMBOLS lookup per distinct pair.
    new_code, first = _pair_codes(new.action, new.property)
    take = pa.array(first)
    new_pair = SYMBOLS.ids(new.action.take(take).to_pylist(), new.property.take(take).to_pylist())[
        new_code
    ]

    is_new = np.repeat([False, True], [len(old_rows), len(new.user)])
    user = np.concatenate([old_user, new.user])
    time = np.concatenate([row_times(old_rows), new.event_time])
    id_hash = np.concatenate([old_rows["id_hash"], new.id_hash])
    value = np.concatenate([old_rows["value"], new.value.astype(np.float32)])
    pair = np.concatenate([old_pair, new_pair]).astype(np.int64)

    # Stable sort: a stored event comes before its replayed copy, and copies keep arrival order.
    order = np.lexsort((id_hash, time, user))
    user, time, id_hash, value, pair, is_new = (
        a[order] for a in (user, time, id_hash, value, pair, is_new)
    )
    duplicate = np.zeros(len(user), bool)
    duplicate[1:] = (
        (user[1:] == user[:-1]) & (time[1:] == time[:-1]) & (id_hash[1:] == id_hash[:-1])
    )

    newest = np.zeros(len(users), np.int64)
    newest[user] = time  # rows ascend by time within a user, so the last write is the newest
    too_old = time < newest[user] - window_ms
    counts = MergeCounts(
        int(np.count_nonzero(duplicate & is_new)),
        int(np.count_nonzero(too_old & ~duplicate & is_new)),
    )

    admitted = ~duplicate & ~too_old
    admitted_user = user[admitted]
    ends = np.cumsum(np.bincount(admitted_user, minlength=len(users)))
    stays = admitted.copy()  # and of those, the newest max_events of each user
    stays[admitted] = ends[admitted_user] - np.arange(len(admitted_user)) <= max_events
    earlier = _earlier_history(windows, old_rows, user, time, id_hash, value, is_new,
                               ~duplicate & ~stays)
    user, time, id_hash, value, pair = (a[stays] for a in (user, time, id_hash, value, pair))

    # Each user's symbol table: the distinct pairs the kept events use, in id order.
    n_pairs = SYMBOLS.slots
    user_pairs, symbol_of_row = np.unique(user * n_pairs + pair, return_inverse=True)
    pair_user = user_pairs // n_pairs
    pair_start = np.searchsorted(pair_user, np.arange(len(users) + 1))
    symbol = np.arange(len(user_pairs)) - pair_start[pair_user]
    rows = pack_rows(time, symbol[symbol_of_row], id_hash, value)
    symbols = (user_pairs % n_pairs).astype(np.int32)

    row_bounds = np.concatenate([[0], np.cumsum(np.bincount(user, minlength=len(users)))]).tolist()
    symbol_bounds = pair_start.tolist()
    # Copies, not views: a stored window would keep the whole batch's arrays alive (in a
    # soak the memory store held 150 times its windows' bytes, and grew by 2 MB a second).
    merged = [
        Window(
            users[u],
            rows[row_bounds[u] : row_bounds[u + 1]].copy(),
            symbols[symbol_bounds[u] : symbol_bounds[u + 1]].copy(),
            *earlier[u],
        )
        for u in range(len(users))
    ]
    return merged, counts


def _earlier_history(
    windows: Sequence[Window],
    old_rows: np.ndarray,
    user: np.ndarray,
    time: np.ndarray,
    id_hash: np.ndarray,
    value: np.ndarray,
    is_new: np.ndarray,
    leaving: np.ndarray,
) -> list[tuple[int, float, int | None]]:
    """Each user's earlier history once the `leaving` events (sorted rows of merge_batch, no
    duplicates among them) have joined it. A stored event that leaves joins it; a new one
    only if it cannot be a re-sent copy of an event that joined before (see the module doc)."""
    n = len(windows)
    stored_events = np.array([w.earlier_events for w in windows], np.int64)
    sizes = np.array([len(w) for w in windows], np.int64)
    oldest_time = np.full(n, -1, np.int64)  # the stored window's oldest event, (time, hash)
    oldest_hash = np.zeros(n, np.uint32)
    has_rows = sizes > 0
    first_row = (np.cumsum(sizes) - sizes)[has_rows]
    oldest_time[has_rows] = row_times(old_rows[first_row])
    oldest_hash[has_rows] = old_rows["id_hash"][first_row]
    newer = (time > oldest_time[user]) | (
        (time == oldest_time[user]) & (id_hash > oldest_hash[user])
    )
    joins = leaving & (~is_new | newer | (stored_events[user] == 0))

    joining_user = user[joins]
    events = stored_events + np.bincount(joining_user, minlength=n)
    amounts = np.bincount(
        joining_user, weights=np.nan_to_num(value[joins]).astype(np.float64), minlength=n
    )
    # the first earlier event: the stored one, or an earlier joining one
    first = np.array(
        [_NO_TIME if w.first_event_ms is None else w.first_event_ms for w in windows], np.int64
    )
    np.minimum.at(first, joining_user, time[joins])
    values = np.array([w.earlier_value for w in windows], np.float64) + amounts
    return [
        (count, value, first_ms) if count else (0, 0.0, None)
        for count, value, first_ms in zip(events.tolist(), values.tolist(), first.tolist())
    ]


def _pair_codes(actions: pa.Array, properties: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A code per (action, property) pair, int64 [n], and the index of each code's first
    occurrence, int64 [codes]. A null property is a value of its own."""
    action_codes = _codes(actions)
    property_codes = _codes(properties)
    combined = action_codes * (int(property_codes.max(initial=0)) + 1) + property_codes
    _, first, codes = np.unique(combined, return_index=True, return_inverse=True)
    return codes.reshape(-1), first


def _codes(strings: pa.Array) -> np.ndarray:
    encoded = pc.dictionary_encode(strings, null_encoding="encode")
    return encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
