"""The bulk online writer stores what Feast's own writer stores, and reads back bit-exact."""

from __future__ import annotations

import sqlite3
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import redis
import requests

from stream.config import Settings, load_settings
from stream.feast_server import feast_server
from stream.feast_sink import EmbeddingRows, FeatureSink, feature_store_yaml

T0_MS = 1_780_315_200_000  # 2026-06-01 12:00 UTC


def feast_settings(
    tmp_path: Path, online_store: str, redis_url: str, postgres_url: str | None = None
) -> Settings:
    run = uuid.uuid4().hex[:8]
    return load_settings(
        feast_project=f"beat_writer_{run}", feast_data_dir=tmp_path / run,
        online_store=online_store, redis_url=redis_url,
        **({"postgres_url": postgres_url} if postgres_url else {}),
    )


def awkward_rows(n: int, at_ms: int, seed: int = 0) -> EmbeddingRows:
    """Embeddings with the floats a text round trip would break: subnormals, -0.0, extremes;
    as-of times a few hundred ms apart, some on whole seconds."""
    rng = np.random.default_rng(seed)
    embedding = rng.standard_normal((n, 768)).astype(np.float32)
    embedding[:, :6] = [np.float32(1e-45), -0.0, np.finfo(np.float32).max,
                        np.finfo(np.float32).tiny, np.float32(1 / 3), -np.float32(7e-39)]
    return EmbeddingRows(
        user_id=[f"user-{i}-é" for i in range(n)],  # non-ASCII ids: lengths are in bytes
        embedding=embedding,
        model_version="beat-abc123",
        event_count=rng.integers(1, 300, n),
        last_event_time_ms=rng.integers(1_600_000_000_000, 1_800_000_000_000, n),
        as_of_ms=at_ms + 250 * np.arange(n),
    )


def assert_bit_exact(read: list, written: np.ndarray) -> None:
    got = np.array(read, np.float32)
    assert got.view(np.uint32).tolist() == written.view(np.uint32).tolist()


def redis_hashes(url: str, project: str) -> dict[bytes, dict[bytes, bytes]]:
    """Every hash of a project, keyed by the entity key (the key less the project)."""
    host, port = url.split(":")
    client = redis.Redis(host=host, port=int(port))
    suffix = project.encode()
    return {
        key[: -len(suffix)]: client.hgetall(key)
        for key in client.scan_iter(match=b"*" + suffix, count=1000)
    }


def sqlite_rows(settings: Settings, sink: FeatureSink) -> list[tuple]:
    path = feature_store_yaml(settings)["online_store"]["path"]
    table = f"{settings.feast_project}_user_embedding"
    with sqlite3.connect(path) as conn:
        return sorted(conn.execute(
            f'SELECT entity_key, feature_name, value, value_text, event_ts FROM "{table}"'
        ).fetchall())


@pytest.mark.parametrize("online_store", ["redis", "sqlite"])
def test_stored_bytes_equal_feasts_own_writer(
    tmp_path: Path, online_store: str, redis_url: str
) -> None:
    ours_settings = feast_settings(tmp_path, online_store, redis_url)
    feasts_settings = feast_settings(tmp_path, online_store, redis_url)
    ours, feasts = FeatureSink(ours_settings), FeatureSink(feasts_settings)
    rows = awkward_rows(50, T0_MS)

    assert ours.write(rows) == 50
    feasts.write_via_feast(rows)

    if online_store == "redis":
        stored = redis_hashes(redis_url, ours_settings.feast_project)
        assert len(stored) == 50
        assert stored == redis_hashes(redis_url, feasts_settings.feast_project)
    else:
        stored = sqlite_rows(ours_settings, ours)
        assert len(stored) == 50 * 4
        assert stored == sqlite_rows(feasts_settings, feasts)


@pytest.mark.parametrize("online_store", ["redis", "sqlite"])
def test_get_online_features_reads_back_bit_exact(
    tmp_path: Path, online_store: str, redis_url: str
) -> None:
    sink = FeatureSink(feast_settings(tmp_path, online_store, redis_url))
    rows = awkward_rows(20, T0_MS)
    sink.write(rows)

    back = sink.read(rows.user_id)

    for i in range(20):
        assert_bit_exact(back["embedding"][i], rows.embedding[i])
    assert back["model_version"] == ["beat-abc123"] * 20
    assert back["event_count"] == rows.event_count.tolist()
    seconds = [t.timestamp() for t in back["last_event_time"]]
    assert seconds == (rows.last_event_time_ms // 1000).tolist()


def test_a_re_encode_replaces_the_row_and_an_older_write_does_not(
    tmp_path: Path, redis_url: str
) -> None:
    sink = FeatureSink(feast_settings(tmp_path, "redis", redis_url))
    first, second, stale = (awkward_rows(3, T0_MS + ms, seed) for ms, seed in
                            [(0, 1), (1, 2), (-1000, 3)])

    assert sink.write(first) == 3
    assert sink.write(second) == 3  # one millisecond later: a newer row replaces the old
    assert_bit_exact(sink.read(first.user_id)["embedding"][1], second.embedding[1])
    assert sink.write(stale) == 0  # Redis keeps the newer row, as Feast's writer does
    assert sink.write(second) == 0  # the same instant again: skipped too
    back = sink.read(first.user_id)
    assert_bit_exact(back["embedding"][1], second.embedding[1])
    assert back["event_count"] == second.event_count.tolist()


def postgres_rows(settings: Settings) -> list[tuple]:
    """Every row of the project's user_embedding table, the vector as pgvector's text."""
    import psycopg

    table = f'"{settings.feast_project}"."{settings.feast_project}_user_embedding"'
    with psycopg.connect(settings.postgres_url.get_secret_value()) as conn:
        return conn.execute(
            "SELECT entity_key, feature_name, value, value_text, vector_value::text, event_ts "
            f"FROM {table} ORDER BY entity_key, feature_name"
        ).fetchall()


def test_postgres_rows_equal_feasts_own_writer_and_read_back_bit_exact(
    tmp_path: Path, pgvector_url: str
) -> None:
    """BEAT_ONLINE_STORE=postgres (pgvector): our COPY stores what Feast's writer stores,
    the vector column (lookalike search) included."""
    ours_settings, feasts_settings = (feast_settings(tmp_path, "postgres", "", pgvector_url)
                                      for _ in range(2))
    ours, feasts = FeatureSink(ours_settings), FeatureSink(feasts_settings)
    rows = awkward_rows(50, T0_MS)

    assert ours.write(rows) == 50
    feasts.write_via_feast(rows)

    stored = postgres_rows(ours_settings)
    assert len(stored) == 50 * 4
    assert sum(vector is not None for *_, vector, _ in stored) == 50  # the embeddings
    assert stored == postgres_rows(feasts_settings)
    back = ours.read(rows.user_id)
    for i in range(50):
        assert_bit_exact(back["embedding"][i], rows.embedding[i])
    assert back["event_count"] == rows.event_count.tolist()


@pytest.mark.parametrize("online_store", ["redis", "sqlite"])
def test_feast_serve_reads_back_bit_exact(
    tmp_path: Path, online_store: str, redis_url: str
) -> None:
    settings = feast_settings(tmp_path, online_store, redis_url)
    sink = FeatureSink(settings)
    rows = awkward_rows(5, T0_MS)
    sink.write(rows)
    with feast_server(settings, tmp_path) as url:
        response = requests.post(f"{url}/get-online-features", json={
            "features": ["user_embedding:embedding", "user_embedding:event_count"],
            "entities": {"user_id": rows.user_id},
        }, timeout=30)
    response.raise_for_status()
    body = response.json()

    names = body["metadata"]["feature_names"]
    embeddings = body["results"][names.index("embedding")]["values"]
    counts = body["results"][names.index("event_count")]["values"]
    for i in range(5):
        assert_bit_exact(embeddings[i], rows.embedding[i])  # JSON doubles hold float32 exactly
    assert counts == rows.event_count.tolist()


def test_redis_keys_expire_after_the_key_ttl_and_a_rewrite_refreshes_it(
    tmp_path: Path, redis_url: str
) -> None:
    ttl = 3_600
    settings = load_settings(
        feast_project=f"beat_ttl_{uuid.uuid4().hex[:8]}", feast_data_dir=tmp_path,
        online_store="redis", redis_url=redis_url, redis_key_ttl_seconds=ttl,
    )
    sink = FeatureSink(settings)
    client = sink.writer.client

    def ttls() -> list[int]:
        keys = sorted(client.scan_iter(match=b"*" + settings.feast_project.encode()))
        return [client.ttl(key) for key in keys]

    def renewed(since: float) -> bool:
        """Every key's expiry set to the whole TTL by a write after since (monotonic): a
        starved test may read it seconds later."""
        left, elapsed = ttls(), time.monotonic() - since
        return len(left) == 3 and all(ttl - elapsed - 1 <= seconds <= ttl for seconds in left)

    def age_keys(seconds_left: int) -> None:  # as if most of the TTL had passed
        for key in client.scan_iter(match=b"*" + settings.feast_project.encode()):
            client.expire(key, seconds_left)

    start = time.monotonic()
    sink.write(awkward_rows(3, T0_MS))
    assert renewed(start)
    age_keys(10)
    start = time.monotonic()
    sink.write(awkward_rows(3, T0_MS + 60_000))  # our writer refreshes the expiry...
    assert renewed(start)
    age_keys(10)
    start = time.monotonic()
    sink.write_via_feast(awkward_rows(3, T0_MS + 120_000))  # ...as Feast's own writer does
    assert renewed(start)
    client.delete(*client.scan_iter(match=b"*" + settings.feast_project.encode()))
