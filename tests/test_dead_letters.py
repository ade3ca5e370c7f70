"""Bad input goes to the dead-letter topic with a reason, and the stream goes on."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from confluent_kafka import Producer

from model import BeatEncoder, init_model_dir
from stream.broker import producer_config
from stream.codec import AvroCodec
from stream.config import Settings
from stream.encoder_worker import EncoderWorker
from stream.feast_sink import FeatureSink
from stream.window import Window, event_id_hashes, pack_rows

from conftest import read_topic, running, stream_worker
from reference_windows import login_event

NOW = datetime.now(timezone.utc).replace(microsecond=0)


def event(user: str, n: int, at: datetime = NOW) -> dict:
    return login_event(user, n, at)


@pytest.mark.parametrize("state_store", ["memory", "rocksdb"])
def test_bad_events_are_dead_lettered_and_later_events_processed(
    settings: Settings, tmp_path: Path, state_store: str
) -> None:
    settings = settings.model_copy(update={"state_store": state_store})
    codec = AvroCodec("behavior_event", settings.events_topic)
    sends = [
        (b"alice", codec.encode(event("alice", 0))),
        (b"alice", b"\x7bnot avro at all"),
        (b"", codec.encode(event("", 1))),
        (b"mallory", codec.encode(event("alice", 2))),
        (b"bob", codec.encode(event("bob", 3, at=NOW + timedelta(days=2)))),
        (None, codec.encode(event("bob", 6))),
        (b"alice", codec.encode(event("alice", 4))),
        (b"bob", codec.encode(event("bob", 5))),
    ]
    producer = Producer(producer_config(settings))
    for key, value in sends:
        producer.produce(settings.events_topic, key=key, value=value)
    producer.flush(10)

    with stream_worker(settings, tmp_path / "stream.log"):
        dead = read_topic(
            settings, settings.dead_letter_topic, until=lambda m: len(m) >= 5, timeout_s=60
        )
        window_codec = AvroCodec("user_window", settings.windows_topic)

        def latest(messages: list) -> dict[str, Window]:
            windows = (
                Window.from_record(window_codec.decode(m.value()))
                for m in messages
                if m.value() is not None
            )
            return {w.user_id: w for w in windows}

        def windows_done(messages: list) -> bool:
            users = latest(messages)
            return set(users) == {"alice", "bob"} and len(users["alice"]) == 2

        windows = read_topic(settings, settings.windows_topic, until=windows_done, timeout_s=30)

    reasons = {m.value(): dict(m.headers())["dlq.reason"].decode() for m in dead}
    assert len(dead) == 5
    assert "not Avro single-object encoded" in reasons[b"\x7bnot avro at all"]
    assert reasons[sends[2][1]] == "missing user_id"
    assert "is not the event's user_id 'alice'" in reasons[sends[3][1]]
    assert "in the future" in reasons[sends[4][1]]
    assert "message key None is not the event's user_id 'bob'" in reasons[sends[5][1]]
    for message in dead:
        headers = dict(message.headers())
        assert headers["dlq.topic"].decode() == settings.events_topic
        assert int(headers["dlq.offset"]) >= 0
    kept = {user: w.rows["id_hash"].tolist() for user, w in latest(windows).items()}
    assert kept == {user: event_id_hashes(pa.array(ids)).tolist() for user, ids in
                    {"alice": ["alice-0", "alice-4"], "bob": ["bob-5"]}.items()}


# decode_ahead: one user a step, each step's successor decoded in a background thread (as
# on a GPU): a bad window decoded ahead is dead-lettered once, when its step takes it.
@pytest.mark.parametrize("decode_ahead", [False, True])
def test_the_encoder_dead_letters_windows_it_cannot_encode(
    settings: Settings, tmp_path: Path, decode_ahead: bool
) -> None:
    if decode_ahead:
        settings = settings.model_copy(update={"max_batch": 1, "decode_ahead": True})
    init_model_dir(tmp_path / "model", "tiny", ["login"], ["web"], seed=1)
    encoder = BeatEncoder.from_pretrained(tmp_path / "model", device="cpu")
    worker = EncoderWorker(settings, encoder, FeatureSink(settings))
    now_ms = int(NOW.timestamp() * 1000)
    times = np.array([now_ms - 60_000, now_ms])
    rows = pack_rows(times, np.zeros(2), event_id_hashes(pa.array(["c-1", "c-2"])), np.zeros(2))
    good = Window.from_strings("carol", rows, ["login"], ["web"])
    codec = AvroCodec("user_window", settings.windows_topic)
    sends = [
        (b"carol", codec.encode(good.to_record(now_ms))),
        (b"dave", codec.encode(Window.empty("dave").to_record(now_ms))),
        (b"erin", codec.encode({**good.to_record(now_ms), "user_id": "erin", "events": bytes(17)})),
        (b"frank", b"\x7bnot a window"),
        # a symbol's action without its property: once an IndexError that stopped the worker
        (b"gina", codec.encode({**good.to_record(now_ms), "user_id": "gina", "properties": []})),
        (b"hank", codec.encode({**good.to_record(now_ms), "user_id": "hank"})),
    ]
    producer = Producer(producer_config(settings))
    for key, value in sends:
        producer.produce(settings.windows_topic, key=key, value=value, partition=0)
    producer.flush(10)

    with running(worker):
        published = read_topic(settings, settings.embeddings_topic, until=lambda m: len(m) >= 2)
        dead = read_topic(settings, settings.dead_letter_topic, until=lambda m: len(m) >= 4)

    reasons = {m.key(): dict(m.headers())["dlq.reason"].decode() for m in dead}
    assert set(reasons) == {b"dave", b"erin", b"frank", b"gina"} and len(dead) == 4
    assert reasons[b"dave"] == "window has no events"
    assert "not a multiple of 16" in reasons[b"erin"]
    assert "not Avro single-object encoded" in reasons[b"frank"]
    assert reasons[b"gina"].startswith("window of 'gina': 1 actions for 0 properties")
    for message in dead:  # the original bytes, and where they came from
        headers = dict(message.headers())
        assert message.value() == dict(sends)[message.key()]
        assert headers["dlq.topic"].decode() == settings.windows_topic
        assert headers["dlq.partition"] == b"0"
    assert sorted(m.key() for m in published) == [b"carol", b"hank"]
    assert worker.stats.dead_letters == 4
