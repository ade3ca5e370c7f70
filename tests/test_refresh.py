"""`beat refresh`: users who went quiet are re-encoded as of now; active ones are left alone."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import Producer

from model import BeatEncoder, init_model_dir
from stream.broker import SEAL_KEY, ensure_topics, producer_config
from stream.codec import AvroCodec
from stream.config import ConfigError, Settings
from stream.encoder_worker import load_worker
from stream.refresh import refresh_idle
from stream.window import ROW, Window

from conftest import read_topic

DAY_MS = 86_400_000


def window(user: str, newest_ms: int) -> Window:
    rows = np.zeros(3, ROW)
    times = newest_ms - np.array([2, 1, 0]) * 3_600_000
    rows["time_lo"], rows["time_hi"] = times & 0xFFFFFFFF, times >> 32
    rows["value"] = np.nan
    return Window.from_strings(user, rows, ["login"], ["web"])


# decode_ahead: a user a step, the second decoded while the first encodes (as on a GPU).
@pytest.mark.parametrize("decode_ahead", [False, True])
def test_refresh_re_encodes_only_idle_users_as_of_now(
    settings: Settings, tmp_path: Path, decode_ahead: bool
) -> None:
    init_model_dir(tmp_path / "model", "tiny", ["login"], ["web"], seed=1)
    # The tiny preset reads 64 events: the workers' windows must hold as many.
    settings = settings.model_copy(update={
        "model_dir": tmp_path / "model", "max_events": 64, "decode_ahead": decode_ahead,
        "max_batch": 1 if decode_ahead else 1024,
    })
    ensure_topics(settings)
    now_ms = int(time.time() * 1000)
    quiet, active = window("quiet", now_ms - 10 * DAY_MS), window("active", now_ms - 60_000)
    codec = AvroCodec("user_window", settings.windows_topic)
    producer = Producer(producer_config(settings))
    for w in (quiet, active):
        producer.produce(
            settings.windows_topic,
            codec.encode(w.to_record(now_ms)),
            w.user_id.encode(),
            partition=0,
        )
    producer.produce(settings.windows_topic, None, SEAL_KEY, partition=0)
    producer.flush(10)

    summary = refresh_idle(settings, load_worker(settings), idle_ms=DAY_MS)

    assert (summary.users, summary.refreshed) == (2, 1)
    published = read_topic(settings, settings.embeddings_topic)
    records = [
        AvroCodec("user_embedding", settings.embeddings_topic).decode(m.value()) for m in published
    ]
    assert [r["user_id"] for r in records] == ["quiet"]
    as_of_ms = int(records[0]["updated_at"].timestamp() * 1000)
    assert as_of_ms >= now_ms
    encoder = BeatEncoder.from_pretrained(tmp_path / "model")
    expected = encoder.encode([quiet.event_window()], as_of_ms=as_of_ms)[0]
    np.testing.assert_allclose(records[0]["embedding"], expected, rtol=1e-4, atol=1e-5)
    # As of now, ten days of silence show: not the embedding written right after the last event.
    assert not np.allclose(expected, encoder.encode([quiet.event_window()])[0], atol=1e-4)
    stored = load_worker(settings).sink.read(["quiet", "active"])
    np.testing.assert_allclose(stored["embedding"][0], expected, rtol=1e-4, atol=1e-5)
    assert stored["embedding"][1] is None


def test_refresh_needs_a_model(settings: Settings) -> None:
    with pytest.raises(ConfigError, match="BEAT_MODEL_DIR"):
        load_worker(settings.model_copy(update={"model_dir": None}))
