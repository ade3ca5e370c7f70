"""Properties, over inputs hypothesis makes up: the event decoder takes any bytes without
crashing, and a window depends only on the set of its user's events, whatever their order,
batching or replays."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream.codec import AvroCodec
from stream.config import load_settings
from stream.event_columns import EventDecoder
from stream.window import NewEvents, Window, merge_batch

CODEC = AvroCodec("behavior_event", "beat.events")
HEADER = CODEC.framing.header()
DECODER = EventDecoder(CODEC, load_settings().event_limits)
VALID = CODEC.encode({"user_id": "u1", "event_id": "e1", "event_time": 1_700_000_000_000,
                      "action": "login", "property": "web", "value": 2.5,
                      "attributes": {"k": "v", "k2": "v2"}})  # fmt: skip

payloads = st.one_of(
    st.none(),
    st.binary(max_size=200),
    st.binary(max_size=200).map(lambda body: HEADER + body),  # reaches the vectorized walk
    st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)).map(  # one byte changed
        lambda change: VALID[: change[0]] + bytes([change[1]]) + VALID[change[0] + 1 :]
    ),
    st.integers(0, len(VALID)).map(lambda cut: VALID[:cut]),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(payloads, max_size=40))
def test_the_decoder_takes_any_bytes(values: list[bytes | None]) -> None:
    out = DECODER.decode(values)
    decoded = out.row.tolist()
    rejected = [row for row, _ in out.rejected]
    assert sorted(decoded + rejected) == list(range(len(values)))  # each input, once
    assert all(isinstance(reason, str) and reason for _, reason in out.rejected)


MAX_EVENTS, WINDOW_MS = 6, 50_000
events = st.lists(
    st.fixed_dictionaries({
        "user_id": st.sampled_from(["a", "b", "c"]),
        "event_id": st.integers(0, 30).map(str),
        "event_time": st.integers(0, 200_000),
        "action": st.sampled_from(["view", "buy"]),
        "property": st.sampled_from(["x", None]),
        "value": st.sampled_from([None, 1.5]),
    }),
    min_size=1, max_size=40,
)  # fmt: skip


def windows_after(batches: list[list[dict]]) -> dict[str, dict]:
    """Each user's window after merging the batches one after another."""
    state: dict[str, Window] = {}
    for batch in batches:
        users = sorted({e["user_id"] for e in batch})
        new = NewEvents.from_records(batch, users)
        merged, _ = merge_batch([state.get(u) for u in users], users, new, MAX_EVENTS, WINDOW_MS)
        state.update(zip(users, merged))
    return {user: window.columns() for user, window in state.items()}


@settings(max_examples=300, deadline=None)
@given(events, st.randoms(use_true_random=False))
def test_a_window_depends_only_on_the_set_of_events(sent: list[dict], rng) -> None:  # noqa: ANN001
    # One event per (user, event_id, event_time): the identity the window de-duplicates on.
    unique = list({(e["user_id"], e["event_id"], e["event_time"]): e for e in sent}.values())
    at_once = windows_after([unique])
    shuffled = unique + rng.sample(unique, rng.randint(0, len(unique)))  # with replays
    rng.shuffle(shuffled)
    cuts = sorted(rng.sample(range(1, len(shuffled)), min(len(shuffled) - 1, rng.randint(0, 6))))
    batches = [shuffled[a:b] for a, b in zip([0, *cuts], [*cuts, len(shuffled)])]
    assert windows_after(batches) == at_once
    assert windows_after([unique, unique]) == at_once  # a whole replay changes nothing
    assert all(np.all(np.diff(w["event_time"]) >= 0) for w in at_once.values())
