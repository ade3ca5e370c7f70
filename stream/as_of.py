"""As of when an embedding is computed: the wall clock when live, history's own time in a replay.

BEAT sees each event's age, counted back from the embedding's reference time (its "as of"),
so an embedding knows how long its user has been silent. Live, that time is now. But when a
worker reads old windows (a backfill, a new deployment reading retained events, a worker
catching up after a long outage), "now" would make every user look silent for as long as the
history is old. The rule, per partition of beat.windows:

    clock[p]  = the newest event time in any window the worker has read from partition p
    as_of[p]  = now        while clock[p] is within replay_lag_ms of now   (live)
              = clock[p]   once it lags further behind                     (replayed history)

and never earlier than the partition's previous as-of + 1 ms, so a user's rows carry strictly
increasing timestamps (Redis keeps a row only when its timestamp is newer than the stored
one). The as-of is also the row's Feast event timestamp and its ``updated_at`` on
beat.embeddings: in a replay, the embedding is dated in the history it describes, and a live
row, being newer, wins over a replayed one.

Offline (pretraining evaluation, notebooks), the caller passes as_of to BeatEncoder.encode
itself; the same window and the same as-of give the same embedding on both paths.
"""

from __future__ import annotations

import numpy as np

_NEVER = -(2**62)


class AsOfClock:
    """The as-of of each partition of one encoder worker (see the module docstring)."""

    def __init__(self, replay_lag_ms: int) -> None:
        self.replay_lag_ms = replay_lag_ms
        self.newest_event_ms: dict[int, int] = {}
        self.last_as_of_ms: dict[int, int] = {}

    def as_of(
        self, partitions: np.ndarray, newest_event_ms: np.ndarray, now_ms: int
    ) -> np.ndarray:
        """The as-of of each row, int64 [n], given the partition each row's window came from
        and the window's newest event time; advances the partitions' clocks."""
        out = np.empty(len(partitions), np.int64)
        for partition in np.unique(partitions).tolist():
            rows = partitions == partition
            seen = self.newest_event_ms.get(partition, _NEVER)
            clock = max(seen, int(newest_event_ms[rows].max()))
            self.newest_event_ms[partition] = clock
            live = clock >= now_ms - self.replay_lag_ms
            as_of = max(now_ms if live else clock, self.last_as_of_ms.get(partition, _NEVER) + 1)
            self.last_as_of_ms[partition] = as_of
            out[rows] = as_of
        return out

    def forget(self, partitions: list[int]) -> None:
        """Partitions this worker no longer holds: their next owner keeps their clocks."""
        for partition in partitions:
            self.newest_event_ms.pop(partition, None)
            self.last_as_of_ms.pop(partition, None)
