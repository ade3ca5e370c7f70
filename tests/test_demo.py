"""What the demo reports of freshness: the warm p99 leaves out the cold start only."""

from __future__ import annotations

import math

from stream.config import load_settings
from stream.demo import Observed, _summary


def test_the_warm_p99_leaves_out_what_was_written_in_the_first_five_seconds() -> None:
    observed = Observed(event_ms=[1_000_000, 1_060_000])
    cold = [(1_000_000 + 1_900, 1_900.0)] * 100  # the first events' embeddings: 2 %
    warm = [(1_000_000 + 5_000 + i, 200.0 + i % 100) for i in range(5_000)]
    for written, freshness in cold + warm:
        observed.written_ms.append(written)
        observed.freshness_ms.append(freshness)
    assert observed.freshness()[1] == 1_900.0  # the cold start is the run's p99
    assert 297 < observed.warm_freshness_p99() < 300  # from 5 s on
    assert math.isnan(Observed(event_ms=[0, 1]).warm_freshness_p99())


def test_the_summary_gives_the_encoded_windows_event_counts_by_percentile() -> None:
    settings = load_settings()
    observed = Observed(event_ms=[0, 10_000])
    observed.messages = {settings.events_topic: 300, settings.windows_topic: 200,
                         settings.embeddings_topic: 101}
    observed.encoded_events = list(range(101))  # 0..100 events
    observed.written_ms, observed.freshness_ms = [6_000] * 101, [100.0] * 101
    summary = _summary(observed, settings)
    assert summary["encoded_events_percentiles"] == list(range(0, 101, 5))
    assert summary["freshness_p99_after_5s_ms"] == 100.0
