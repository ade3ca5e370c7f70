"""The as-of rule: wall clock when live, the partition's newest event in a replay."""

from __future__ import annotations

import numpy as np

from stream.as_of import AsOfClock

HOUR_MS = 3_600_000
NOW = 1_780_000_000_000


def as_of(clock: AsOfClock, partitions: list[int], newest: list[int], now: int = NOW) -> list[int]:
    return clock.as_of(np.array(partitions), np.array(newest, np.int64), now).tolist()


def test_live_partitions_are_as_of_now_and_replayed_ones_as_of_their_newest_event() -> None:
    clock = AsOfClock(replay_lag_ms=HOUR_MS)
    live, replay = NOW - 5_000, NOW - 400 * 24 * HOUR_MS
    # partition 0 is live; partition 1 replays history from a year ago
    got = as_of(clock, [0, 1, 1, 0], [live, replay, replay - 9, live - 7])
    assert got == [NOW, replay, replay, NOW]


def test_the_partition_clock_is_the_newest_event_seen_so_far() -> None:
    clock = AsOfClock(replay_lag_ms=HOUR_MS)
    old = NOW - 10 * 24 * HOUR_MS
    assert as_of(clock, [2], [old]) == [old]
    # an older window later on the partition is as of the newest event already seen
    assert as_of(clock, [2], [old - HOUR_MS]) == [old + 1]
    # once the replay reaches the last hour, the partition is live
    assert as_of(clock, [2], [NOW - 60_000]) == [NOW]


def test_rows_of_a_partition_get_strictly_newer_as_of_times() -> None:
    clock = AsOfClock(replay_lag_ms=HOUR_MS)
    assert as_of(clock, [0], [NOW], now=NOW) == [NOW]
    assert as_of(clock, [0], [NOW], now=NOW) == [NOW + 1]  # the same millisecond again
    assert as_of(clock, [0], [NOW], now=NOW - 50) == [NOW + 2]  # the wall clock stepped back


def test_a_partition_given_up_starts_afresh() -> None:
    clock = AsOfClock(replay_lag_ms=HOUR_MS)
    old = NOW - 10 * 24 * HOUR_MS
    as_of(clock, [3], [old + 1_000])
    clock.forget([3])
    assert as_of(clock, [3], [old]) == [old]
