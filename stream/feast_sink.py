"""The Feast side: open the feature store, register feature_repo/, write and read embeddings.

The store's settings come from ``feature_repo/feature_store.yaml`` with the online store
chosen by ``BEAT_ONLINE_STORE`` (``sqlite`` or ``redis``), and the project and registry
from beatstream's settings, so tests and demos can each have their own.
"""

from __future__ import annotations

import runpy
import sqlite3
from dataclasses import dataclass

import numpy as np
import pandas as pd
import redis
import yaml

from stream.config import Settings
from stream.online_writer import OnlineRows, RedisRowWriter, SqliteRowWriter

FEATURE_VIEW = "user_embedding"
FEATURES = ["embedding", "model_version", "event_count", "last_event_time"]


@dataclass
class EmbeddingRows:
    """One micro-batch of encoded users, as columns."""

    user_id: list[str]
    embedding: np.ndarray  # float32[n, d]
    model_version: str
    event_count: np.ndarray  # int64[n]
    last_event_time_ms: np.ndarray  # int64[n]
    # int64[n] unix ms: the moment each embedding describes (stream/as_of.py), which is
    # also its Feast event timestamp and its updated_at on beat.embeddings
    as_of_ms: np.ndarray


def feature_store_yaml(settings: Settings) -> dict:
    """The effective feature_store.yaml of this deployment (`beat feast-config` prints it)."""
    repo = settings.feature_repo
    with open(repo / "feature_store.yaml") as f:
        config = yaml.safe_load(f)
    # Paths as in the yaml (so `feast serve` in feature_repo/ sees what the workers
    # wrote) unless BEAT_FEAST_DATA_DIR gives this deployment its own folder.
    data_dir = settings.feast_data_dir or repo / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    config["project"] = settings.feast_project
    config["registry"] = str(data_dir / "registry.db")
    if settings.online_store == "redis":
        config["online_store"] = {"type": "redis", "connection_string": settings.redis_url}
    else:
        config["online_store"] = {"type": "sqlite", "path": str(data_dir / "online_store.db")}
    return config


def repo_config(settings: Settings) -> "feast.RepoConfig":  # noqa: F821
    from feast import RepoConfig

    return RepoConfig(repo_path=settings.feature_repo, **feature_store_yaml(settings))


def feast_objects(settings: Settings) -> list:
    """Every Feast object defined in feature_repo/*.py, as `feast apply` would find them."""
    from feast import Entity, FeatureService, FeatureView
    from feast.data_source import DataSource

    kinds = (Entity, FeatureView, FeatureService, DataSource)
    found: dict[int, object] = {}
    for path in sorted(settings.feature_repo.glob("*.py")):
        for value in runpy.run_path(str(path)).values():
            if isinstance(value, kinds):
                found[id(value)] = value
    return list(found.values())


class FeatureSink:
    """Writes embeddings to the Feast online store and reads them back."""

    def __init__(self, settings: Settings) -> None:
        from feast import FeatureStore

        self.store = FeatureStore(config=repo_config(settings))
        self.store.apply(feast_objects(settings))
        self.view = self.store.get_feature_view(FEATURE_VIEW)
        self.join_key = self.view.entity_columns[0].name
        writer = RedisRowWriter if settings.online_store == "redis" else SqliteRowWriter
        self.writer = writer(self.store, self.view)
        self.where = settings.redis_url if writer is RedisRowWriter else "sqlite"
        # Errors that mean "the store is not answering now": the encoder retries them.
        self.unavailable = (redis.ConnectionError, redis.TimeoutError, sqlite3.OperationalError)
        self._feature_refs = [f"{FEATURE_VIEW}:{name}" for name in FEATURES]

    def write(self, rows: EmbeddingRows) -> int:
        """Rows written (Redis skips a row whose stored timestamp is at least as new)."""
        return self.writer.write(OnlineRows.from_embeddings(rows, self.join_key))

    def write_via_feast(self, rows: EmbeddingRows) -> None:
        """The same rows through Feast's write_to_online_store (the baseline of
        bench/feast_write.py, and the reference layout of the tests)."""
        self.store.write_to_online_store(FEATURE_VIEW, embedding_frame(rows))

    def read(self, user_ids: list[str]) -> dict[str, list]:
        """Feature values per name, in the order of user_ids (None where a user has none)."""
        response = self.store.get_online_features(
            features=self._feature_refs, entity_rows=[{"user_id": u} for u in user_ids]
        )
        return response.to_dict()


def embedding_frame(rows: EmbeddingRows) -> pd.DataFrame:
    """The rows as the frame Feast's write_to_online_store and push take."""
    return pd.DataFrame(
        {
            "user_id": rows.user_id,
            "embedding": list(rows.embedding),
            "model_version": rows.model_version,
            "event_count": rows.event_count,
            "last_event_time": pd.to_datetime(rows.last_event_time_ms, unit="ms", utc=True),
            "updated_at": pd.to_datetime(rows.as_of_ms, unit="ms", utc=True),
        }
    )
