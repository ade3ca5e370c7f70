"""The Feast side: open the feature store, register feature_repo/, write and read embeddings.

The store's settings come from ``feature_repo/feature_store.yaml`` with the online store
chosen by ``BEAT_ONLINE_STORE`` (``sqlite``, ``redis`` or ``postgres``), and the project
and registry from beatstream's settings, so tests and demos can each have their own.

Who writes the registry: ``register`` (``beat model publish`` and ``beat model switch``,
the deploy step), and an encoder serving BEAT_MODEL_DIR into ``user_embedding`` (the
embedded default, which has no deploy step). Encoders of published versions only read it:
a file registry is rewritten whole on every apply, so workers applying beside a publish
could undo its new view.
"""

from __future__ import annotations

import runpy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from stream.config import ConfigError, Settings
from stream.offline_history import HistoryWriter, postgres_config
from stream.online_writer import (
    OnlineRows,
    PostgresRowWriter,
    RedisRowWriter,
    SqliteRowWriter,
)

FEATURE_VIEW = "user_embedding"
FEATURES = ["embedding", "model_version", "event_count", "last_event_time"]
# Feast's sqlite and PostgreSQL online stores with lookalike search
# (stream/sqlite_vector_store.py, stream/postgres_vector_store.py)
SQLITE_STORE_TYPE = "stream.sqlite_vector_store.VectorSqliteOnlineStore"
POSTGRES_STORE_TYPE = "stream.postgres_vector_store.VectorPostgreSQLOnlineStore"


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
    config["registry"] = registry_config(settings, data_dir)
    if settings.online_store == "redis":
        config["online_store"] = {"type": "redis", "connection_string": settings.redis_url}
        if settings.redis_key_ttl_seconds is not None:
            config["online_store"]["key_ttl_seconds"] = settings.redis_key_ttl_seconds
    elif settings.online_store == "postgres":
        config["online_store"] = {**postgres_config(settings), "type": POSTGRES_STORE_TYPE,
                                  "vector_enabled": True}
    else:
        config["online_store"] = {"type": SQLITE_STORE_TYPE, "vector_enabled": True,
                                  "path": str(data_dir / "online_store.db")}
    if settings.offline_store == "postgres":
        config["offline_store"] = postgres_config(settings)
    return config


def registry_config(settings: Settings, data_dir: Path) -> str | dict:
    """Feast's registry: a file under the data dir, or its SQL registry in PostgreSQL
    (SQLAlchemy with psycopg 3), whose tables hold every project's objects side by side."""
    if settings.feast_registry == "file":
        return str(data_dir / "registry.db")
    url = settings.postgres_url.get_secret_value()
    return {
        "registry_type": "sql",
        "path": "postgresql+psycopg://" + url.split("://", 1)[1],
        # how long a reader trusts its copy: a publish or switch reaches readers within it
        "cache_ttl_seconds": 60,
    }


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
        # definitions.py reads the published model versions of these settings
        for value in runpy.run_path(str(path), {"BEAT_SETTINGS": settings}).values():
            if isinstance(value, kinds):
                found[id(value)] = value
    return list(found.values())


def register(settings: Settings) -> "feast.FeatureStore":  # noqa: F821
    """Apply feature_repo/ (with a view per published version) to the registry: the deploy
    step. Creates the online tables of new views; removes nothing."""
    from feast import FeatureStore

    store = FeatureStore(config=repo_config(settings))
    store.apply(feast_objects(settings))
    return store


class FeatureSink:
    """Writes embeddings to one feature view of the Feast online store (and, with
    BEAT_OFFLINE_STORE=postgres, to its history) and reads them back.

    With deploy, applies feature_repo/ first (the embedded default's user_embedding);
    otherwise the view must be registered already (a published version's).
    """

    def __init__(
        self, settings: Settings, view: str = FEATURE_VIEW, deploy: bool = True
    ) -> None:
        from feast import FeatureStore
        from feast.errors import FeatureViewNotFoundException

        self.store = register(settings) if deploy else FeatureStore(config=repo_config(settings))
        try:
            self.view = self.store.get_feature_view(view)
        except FeatureViewNotFoundException:
            raise ConfigError(
                f"feature view {view} is not in the Feast registry {settings.feast_project} "
                "(BEAT_FEAST_DATA_DIR): `beat model publish` registers a version's view"
            ) from None
        self.join_key = self.view.entity_columns[0].name
        writer = {"redis": RedisRowWriter, "postgres": PostgresRowWriter,
                  "sqlite": SqliteRowWriter}[settings.online_store]
        self.writer = writer(self.store, self.view)
        self.where = {"redis": settings.redis_url, "sqlite": "sqlite",
                      "postgres": "postgres"}[settings.online_store]
        self.history = (HistoryWriter(settings, self.view.name)
                        if settings.offline_store == "postgres" else None)
        if self.history is not None:  # the encoder's wait message names what it waits for
            self.where += f" and history {self.history.table}"
        # Errors that mean "the store is not answering now": the encoder retries them.
        self.unavailable = (*self.writer.unavailable,
                            *(self.history.unavailable if self.history else ()))
        self._feature_refs = [f"{self.view.name}:{name}" for name in FEATURES]
        # A published version's view (feature_repo/definitions.py) takes its rows only.
        self.version = self.view.tags.get("model_version")

    def write(self, rows: EmbeddingRows) -> int:
        """Rows written online (Redis skips a row whose stored timestamp is at least as new);
        every row is also in the history, committed, when this returns. A retry after a
        failed append writes online again, which is idempotent."""
        if self.version not in (None, rows.model_version):
            raise ValueError(f"rows of model {rows.model_version} cannot go to the feature view "
                             f"{self.view.name} of model {self.version}")
        written = self.writer.write(OnlineRows.from_embeddings(rows, self.join_key))
        if self.history is not None:
            self.history.append(rows)
        return written

    def write_via_feast(self, rows: EmbeddingRows) -> None:
        """The same rows through Feast's write_to_online_store (the baseline of
        bench/feast_write.py, and the reference layout of the tests)."""
        self.store.write_to_online_store(self.view.name, embedding_frame(rows))

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
