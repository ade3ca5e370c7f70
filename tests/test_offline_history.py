"""Embedding history in PostgreSQL (stream/offline_history.py), read back through Feast's
get_historical_features: real PostgreSQL on 127.0.0.1:5432, real Feast, no mocks."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import SecretStr

from model import init_model_dir
from stream.codec import AvroCodec
from stream.config import ConfigError, Settings, load_settings
from stream.encoder_worker import load_worker
from stream.feast_sink import EmbeddingRows, FeatureSink
from stream.offline_history import HistoryWriter

from conftest import ACTIONS, POSTGRES_URL, WindowFeed, read_topic, running

T1_MS = 1_780_315_200_000  # 2026-06-01 12:00 UTC
T2_MS = T1_MS + 3_600_000
URL = POSTGRES_URL


@pytest.fixture
def pg_settings(postgres_project: str, tmp_path: Path) -> Settings:
    return load_settings(feast_project=postgres_project, feast_data_dir=tmp_path,
                         offline_store="postgres", postgres_url=URL)


def rows(user_ids: list[str], at_ms: int, seed: int) -> EmbeddingRows:
    n = len(user_ids)
    return EmbeddingRows(
        user_id=user_ids,
        embedding=np.random.default_rng(seed).standard_normal((n, 768)).astype(np.float32),
        model_version="beat-abc123",
        event_count=np.full(n, 7 + seed),
        last_event_time_ms=np.full(n, at_ms - 60_000),
        as_of_ms=np.full(n, at_ms),
    )


def historical(sink: FeatureSink, user_ids: list[str], times_ms: list[int]) -> pd.DataFrame:
    entities = pd.DataFrame({
        "user_id": user_ids,
        "event_timestamp": pd.to_datetime(times_ms, unit="ms", utc=True),
        "row": range(len(user_ids)),
    })
    features = [f"{sink.view.name}:embedding", f"{sink.view.name}:event_count"]
    frame = sink.store.get_historical_features(entity_df=entities, features=features).to_df()
    return frame.sort_values("row").reset_index(drop=True)


def test_point_in_time_read_returns_the_embedding_current_then(pg_settings: Settings) -> None:
    sink = FeatureSink(pg_settings)
    first, second = rows(["u", "v"], T1_MS, seed=1), rows(["u"], T2_MS, seed=2)
    sink.write(first)
    sink.write(second)
    sink.write(first)  # a replay after a crash before the commit: appended again

    frame = historical(sink, ["u", "u", "u", "u", "v"],
                       [T1_MS - 1, T1_MS, (T1_MS + T2_MS) // 2, T2_MS + 1, T2_MS + 1])

    assert frame["embedding"][0] is None or not len(frame["embedding"][0])  # before any
    for row, expected in [(1, first.embedding[0]), (2, first.embedding[0]),
                          (3, second.embedding[0]), (4, first.embedding[1])]:
        np.testing.assert_array_equal(np.asarray(frame["embedding"][row], np.float32), expected)
    assert frame["event_count"].tolist()[1:] == [8, 8, 9, 8]


def test_each_view_appends_to_a_history_table_of_its_own(pg_settings: Settings) -> None:
    import psycopg

    sink = FeatureSink(pg_settings)
    other = HistoryWriter(pg_settings, "user_embedding_beat_small_2")
    sink.write(rows(["u"], T1_MS, seed=1))
    with psycopg.connect(URL) as conn:
        counts = [conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                  for table in (sink.history.table, other.table)]
    assert counts == [1, 0]


def test_offline_store_settings_are_checked_at_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="BEAT_OFFLINE_STORE"):
        load_settings(offline_store="file")
    with pytest.raises(ConfigError, match="BEAT_POSTGRES_URL"):
        load_settings(postgres_url="127.0.0.1:5432")
    unreachable = load_settings(feast_project="beat_hist_none", feast_data_dir=tmp_path,
                                offline_store="postgres",
                                postgres_url="postgresql://postgres@127.0.0.1:1/postgres")
    with pytest.raises(ConfigError, match="BEAT_OFFLINE_STORE=postgres: cannot reach "
                                          "BEAT_POSTGRES_URL"):
        FeatureSink(unreachable)


def test_the_encoder_worker_appends_what_it_serves(
    settings: Settings, postgres_project: str, tmp_path: Path
) -> None:
    """Two windows of one user from the past (so each is as of its newest event) through a
    running encoder worker: the history answers with the vector published at each time."""
    init_model_dir(tmp_path / "model", "tiny", ACTIONS, ["web"], seed=2)
    settings = settings.model_copy(update={
        "model_dir": tmp_path / "model", "max_wait_ms": 20, "torch_threads": 1,
        "max_events": 64, "feast_project": postgres_project, "feast_data_dir": tmp_path / "feast",
        "offline_store": "postgres", "postgres_url": SecretStr(URL),
    })
    t1_ms = int(time.time() * 1000) - 200 * 86_400_000
    t2_ms = t1_ms + 60_000
    feed = WindowFeed(settings, users=0)
    codec = AvroCodec("user_embedding", settings.embeddings_topic)
    published = []
    with running(load_worker(settings)):
        for times in ([t1_ms - 5, t1_ms], [t1_ms - 5, t1_ms, t2_ms]):
            feed.times["u"] = times
            feed.producer.produce(settings.windows_topic,
                                  feed.codec.encode(feed.window("u").to_record(t2_ms)), b"u")
            feed.producer.flush(10)
            messages = read_topic(settings, settings.embeddings_topic,
                                  until=lambda m, n=len(published) + 1: len(m) >= n)
            published = [codec.decode(m.value()) for m in messages]
    assert [int(r["updated_at"].timestamp() * 1000) for r in published] == [t1_ms, t2_ms]

    frame = historical(FeatureSink(settings, deploy=False), ["u", "u"],
                       [(t1_ms + t2_ms) // 2, t2_ms + 1])
    for row, record in enumerate(published):
        np.testing.assert_array_equal(np.asarray(frame["embedding"][row], np.float32),
                                      np.asarray(record["embedding"], np.float32))
