"""End to end on a real broker and real Feast stores: events -> windows -> embeddings.

The expected windows are computed here, independently of stream.window, from the whole
event history of each user.
"""

from __future__ import annotations

import random
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from pydantic import SecretStr

from model import BeatEncoder, EventWindow, init_model_dir
from stream.codec import AvroCodec
from stream.config import Settings
from stream.encoder_worker import EncoderWorker
from stream.feast_sink import FeatureSink
from stream.lookalike import similar_users
from stream.producer import EventProducer
from stream.window import Window

from conftest import read_topic, running, stream_worker
from reference_windows import ACTIONS, PROPERTIES, T0, event, expected_windows, ms, window_columns


def history() -> list[dict]:
    """A handful of users whose windows exercise ordering, duplicates, age and length."""
    rng = random.Random(7)
    events = []
    events += [event("in_order", n, T0 + timedelta(minutes=n)) for n in range(12)]
    shuffled = [event("out_of_order", n, T0 + timedelta(hours=n)) for n in range(20)]
    rng.shuffle(shuffled)
    events += shuffled
    dupes = [event("duplicates", n, T0 + timedelta(seconds=30 * n)) for n in range(10)]
    events += dupes + dupes[2:6]  # re-delivered copies of four events
    # Six events 100-130 days before the user's newest one: outside the 90-day window.
    events += [event("old_and_new", n, T0 - timedelta(days=130 - 5 * n)) for n in range(6)]
    events += [event("old_and_new", 10 + n, T0 + timedelta(days=n)) for n in range(5)]
    events += [event("long", n, T0 + timedelta(seconds=n)) for n in range(300)]  # over 256
    return events


def latest_windows(settings: Settings) -> dict[str, Window]:
    """The newest window message of each user in beat.windows (seals skipped)."""
    codec = AvroCodec("user_window", settings.windows_topic)
    return {
        w.user_id: w
        for w in (
            Window.from_record(codec.decode(m.value()))
            for m in read_topic(settings, settings.windows_topic)
            if m.value() is not None
        )
    }


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("model")
    init_model_dir(directory, "tiny", ACTIONS, [p for p in PROPERTIES if p], seed=3)
    return directory


@pytest.mark.parametrize("online_store", ["sqlite", "redis", "postgres"])
def test_events_become_windows_and_embeddings_in_feast(
    settings: Settings, model_dir: Path, online_store: str, tmp_path: Path, redis_url: str,
    request: pytest.FixtureRequest,
) -> None:
    settings = settings.model_copy(update={"online_store": online_store, "redis_url": redis_url})
    if online_store == "postgres":  # with pgvector, for lookalike search
        settings = settings.model_copy(
            update={"postgres_url": SecretStr(request.getfixturevalue("pgvector_url"))})
    events = history()
    expected = expected_windows(events)
    encoder = BeatEncoder.from_pretrained(model_dir, device="cpu")
    worker = EncoderWorker(settings, encoder, FeatureSink(settings))
    producer = EventProducer(settings)

    with stream_worker(settings, tmp_path / "stream.log") as windows_process, running(worker):
        # Two deliveries a few flush intervals apart, so windows merge across batches.
        half = len(events) // 2
        producer.send(events[:half])
        producer.flush()
        time.sleep(1.0)
        producer.send(events[half:])
        producer.flush()

        codec = AvroCodec("user_embedding", settings.embeddings_topic)

        def newest_records(messages: list) -> dict[str, dict]:
            return {
                record["user_id"]: record for record in (codec.decode(m.value()) for m in messages)
            }

        def all_users_final(messages: list) -> bool:
            assert windows_process.poll() is None, (
                f"stream worker died: {(tmp_path / 'stream.log').read_text()[-3000:]}"
            )
            latest = newest_records(messages)
            return all(
                u in latest
                and latest[u]["event_count"] == len(w)
                and latest[u]["last_event_time"] == w[-1]["event_time"]
                for u, w in expected.items()
            )

        messages = read_topic(
            settings, settings.embeddings_topic, until=all_users_final, timeout_s=90
        )
        published = newest_records(messages)
        partition_of = {codec.decode(m.value())["user_id"]: m.partition() for m in messages}

    latest = latest_windows(settings)
    for user, window in expected.items():
        assert latest[user].columns() == window_columns(window), user
    assert len(latest["long"]) == 256
    assert len(latest["old_and_new"]) == 5
    # what left the window (or never stayed) is the user's earlier history, each event once
    assert latest["long"].earlier_events == 300 - 256
    assert latest["old_and_new"].earlier_events == 6
    assert latest["old_and_new"].first_event_ms == ms(T0 - timedelta(days=130))
    assert latest["duplicates"].earlier == (0, 0.0, None)

    users = sorted(expected)
    stored = FeatureSink(settings).read(users)
    # Each user's whole history: the encoder cuts it to the window, and what it cuts off
    # counts as earlier history, as what left the stream's window does.
    histories = expected_windows(events, max_events=len(events), window_days=36_500)
    windows = [
        EventWindow(
            np.array([ms(e["event_time"]) for e in histories[u]]),
            np.array([e["action"] for e in histories[u]], dtype=object),
            np.array([e["property"] for e in histories[u]], dtype=object),
            # the amounts as the window stores them: float32, NaN where an event has none
            np.array([np.nan if e["value"] is None else np.float32(e["value"])
                      for e in histories[u]]),
        )
        for u in users
    ]
    # The published record carries the time the embedding is as of.
    direct = encoder.encode(windows, as_of_ms=[ms(published[u]["updated_at"]) for u in users])
    # The events are months old, so this is a replay: each embedding is as of the newest event
    # the worker has seen on the user's partition (stream/as_of.py), not the wall clock (a
    # later batch of the partition adds 1 ms, so that rows stay strictly newer).
    clock: dict[int, int] = {}
    for user in users:
        partition = partition_of[user]
        clock[partition] = max(clock.get(partition, 0), ms(expected[user][-1]["event_time"]))
    for i, user in enumerate(users):
        assert stored["model_version"][i] == encoder.model_version
        assert stored["event_count"][i] == len(expected[user])
        np.testing.assert_allclose(
            np.array(stored["embedding"][i], np.float32), direct[i], rtol=1e-4, atol=1e-5
        )
        newest_on_partition = clock[partition_of[user]]
        assert newest_on_partition <= ms(published[user]["updated_at"]) < newest_on_partition + 1000
    # Different users have different embeddings: the store did not keep one row for all.
    assert not np.allclose(stored["embedding"][0], stored["embedding"][1])
    if online_store != "redis":  # the encoder's rows reached the lookalike search
        assert_lookalikes_match_brute_force(settings, users, np.array(stored["embedding"]))


def assert_lookalikes_match_brute_force(
    settings: Settings, users: list[str], embeddings: np.ndarray
) -> None:
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    cosine = unit @ unit[0]
    expected = [users[i] for i in np.argsort(-cosine) if i != 0]
    found = similar_users(FeatureSink(settings).store, users[0], k=len(users) - 1)
    assert [u.user_id for u in found] == expected
    np.testing.assert_allclose([u.similarity for u in found], np.sort(cosine)[::-1][1:],
                               atol=1e-5)
