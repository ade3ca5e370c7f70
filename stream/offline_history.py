"""Embedding history in PostgreSQL, for Feast's point-in-time reads (get_historical_features).

With ``BEAT_OFFLINE_STORE=postgres`` every row the encoders write online is also appended
to a history table, ``<project>.<view>_history`` at ``BEAT_POSTGRES_URL``: one schema per
Feast project, one table per feature view, so each model version keeps a history of its own
(a version's view holds only its rows). Feast reads the table through its postgres offline
store (feature_repo/definitions.py declares it as each view's batch source).

Why not Feast's file offline store: its write_to_offline_store reads the whole Parquet file
and writes it again on every append. Here a batch is one binary COPY, built column-wise
like the online rows (stream/online_writer.py), so appends cost the same at any table size
and never touch the rows already there.

At-least-once: the sink appends before the encoder commits the batch's offsets, so a
restart may append a row again. The point-in-time read still returns the right vector, once:
a replayed window gives the same row (same embedding, same updated_at), and Feast's join
takes, per entity row, the newest updated_at at or before the entity's timestamp and among
equal ones the last written (``written_at``, filled in by PostgreSQL).

With ``BEAT_OFFLINE_STORE=none`` (the embedded default) no history is kept; views still
declare a file source there, which is never written.
"""

from __future__ import annotations

import struct
from urllib.parse import unquote, urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stream.avro_binary import binary_array, end_to_end
from stream.config import ConfigError, Settings

HISTORY_COLUMNS = ["user_id", "embedding", "model_version", "event_count", "last_event_time",
                   "updated_at"]
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
_COPY_TRAILER = struct.pack("!h", -1)
_FLOAT4_OID = 700
_PG_EPOCH_US = 946_684_800_000_000  # 2000-01-01 in unix microseconds: timestamptz's zero


def history_table(settings: Settings, view: str) -> str:
    """The view's history table, schema-qualified (Feast project and view names are
    lower-case letters, digits and underscores: no quoting needed)."""
    return f"{settings.feast_project}.{view}_history"


def postgres_config(settings: Settings) -> dict:
    """BEAT_POSTGRES_URL as the fields of Feast's postgres offline store config."""
    url = urlsplit(settings.postgres_url.get_secret_value())
    options = dict(part.split("=", 1) for part in url.query.split("&") if "=" in part)
    return {
        "type": "postgres",
        # ?host=/a/dir: a Unix socket's folder (a server that listens on no TCP port)
        "host": options.get("host") or url.hostname or "127.0.0.1",
        "port": url.port or 5432,
        "database": url.path.lstrip("/") or "postgres",
        "db_schema": settings.feast_project,  # Feast's temporary tables go here too
        "user": unquote(url.username or "postgres"),
        "password": unquote(url.password or ""),
        "sslmode": options.get("sslmode", "prefer"),
    }


def history_source(settings: Settings, view: str) -> "feast.data_source.DataSource":  # noqa: F821
    """The batch source of a view: its history table, or (no offline store) a file source
    that nothing writes."""
    from feast import FileSource
    from feast.infra.offline_stores.contrib.postgres_offline_store.postgres_source import (
        PostgreSQLSource,
    )

    if settings.offline_store == "postgres":
        return PostgreSQLSource(name=f"{view}_history", table=history_table(settings, view),
                                timestamp_field="updated_at",
                                created_timestamp_column="written_at")
    return FileSource(name=f"{view}_history", path=f"data/{view}_history.parquet",
                      timestamp_field="updated_at")


class HistoryWriter:
    """Appends embedding rows to one view's history table, one binary COPY per batch."""

    def __init__(self, settings: Settings, view: str) -> None:
        import psycopg

        self.table = history_table(settings, view)
        self.unavailable = (psycopg.OperationalError,)
        self._url = settings.postgres_url.get_secret_value()
        self._conn: psycopg.Connection | None = None
        try:
            self._create()
        except psycopg.OperationalError as err:
            where = postgres_config(settings)
            raise ConfigError(
                f"BEAT_OFFLINE_STORE=postgres: cannot reach BEAT_POSTGRES_URL "
                f"({where['host']}:{where['port']}/{where['database']}): {err}".strip()
            ) from None

    def _connection(self) -> "psycopg.Connection":  # noqa: F821
        import psycopg

        if self._conn is None or self._conn.broken or self._conn.closed:
            self._conn = psycopg.connect(self._url, connect_timeout=5, autocommit=True)
        return self._conn

    def _create(self) -> None:
        schema = self.table.split(".")[0]
        conn = self._connection()
        with conn.transaction():
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {self.table} (user_id text NOT NULL, "
                "embedding real[] NOT NULL, model_version text NOT NULL, "
                "event_count bigint NOT NULL, last_event_time timestamptz NOT NULL, "
                "updated_at timestamptz NOT NULL, "
                # Feast's created timestamp: of two rows with the same updated_at (a replay
                # appended again) its join returns one, the last written; without it, both.
                "written_at timestamptz NOT NULL DEFAULT clock_timestamp())"
            )
            # Stored out of line uncompressed: embeddings do not compress, and trying costs
            # more than the rest of the append.
            conn.execute(f"ALTER TABLE {self.table} ALTER COLUMN embedding SET STORAGE EXTERNAL")
            # Feast's join looks each entity up by user_id and time; a BRIN index would be
            # smaller but does not serve user_id lookups.
            conn.execute(f"CREATE INDEX IF NOT EXISTS {self.table.split('.')[1]}_user_time "
                         f"ON {self.table} (user_id, updated_at)")

    def append(self, rows: "EmbeddingRows") -> None:  # noqa: F821
        """Append the rows, committed when this returns."""
        if not rows.user_id:
            return
        data = copy_binary(rows)
        conn = self._connection()
        with conn.transaction(), conn.cursor() as cur:
            with cur.copy(f"COPY {self.table} ({', '.join(HISTORY_COLUMNS)}) "
                          "FROM STDIN (FORMAT BINARY)") as copy:
                copy.write(data)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


def copy_binary(rows: "EmbeddingRows") -> bytes:  # noqa: F821
    """The rows in PostgreSQL's binary COPY format, built column by column (no Python per
    row): each tuple is a field count, then each field as a length and its bytes."""
    user_ids = pa.array(rows.user_id, pa.string()).cast(pa.binary())
    version = rows.model_version.encode()
    fields = [  # in the order of HISTORY_COLUMNS
        _length_prefixed(user_ids),
        _fixed(_float4_arrays(rows.embedding)),
        pa.scalar(struct.pack("!i", len(version)) + version),  # the same in every row
        _fixed(_int8_bytes(rows.event_count)),
        _fixed(_int8_bytes(rows.last_event_time_ms * 1000 - _PG_EPOCH_US)),
        _fixed(_int8_bytes(rows.as_of_ms * 1000 - _PG_EPOCH_US)),
    ]
    tuples = pc.binary_join_element_wise(pa.scalar(struct.pack("!h", len(fields))), *fields, b"")
    return _COPY_HEADER + end_to_end(tuples) + _COPY_TRAILER


def _float4_arrays(matrix: np.ndarray) -> np.ndarray:
    """Each row as a binary one-dimensional real[]: header (dims, has-nulls, element type,
    length, lower bound), then a 4-byte length and a big-endian float4 per element."""
    n, d = matrix.shape
    header = np.frombuffer(struct.pack("!iiiii", 1, 0, _FLOAT4_OID, d, 1), np.uint8)
    elements = np.empty((n, d, 2), ">u4")
    elements[:, :, 0] = 4
    elements[:, :, 1] = np.ascontiguousarray(matrix, np.float32).view(np.uint32)
    out = np.empty((n, len(header) + 8 * d), np.uint8)
    out[:, : len(header)] = header
    out[:, len(header) :] = elements.view(np.uint8).reshape(n, 8 * d)
    return out


def _int8_bytes(numbers: np.ndarray) -> np.ndarray:
    return np.asarray(numbers, np.int64).astype(">i8").view(np.uint8).reshape(-1, 8)


def _fixed(values: np.ndarray) -> pa.BinaryArray:
    """Fields of one size per row (uint8 [n, size]), each with its length in front."""
    n, size = values.shape
    out = np.empty((n, 4 + size), np.uint8)
    out[:, :4] = np.frombuffer(struct.pack("!i", size), np.uint8)
    out[:, 4:] = values
    return binary_array(np.full(n, out.shape[1]), out.ravel())


def _length_prefixed(values: pa.BinaryArray) -> pa.BinaryArray:
    lengths = pc.binary_length(values).to_numpy().astype(">i4").view(np.uint8)
    prefix = binary_array(np.full(len(values), 4), lengths)
    return pc.binary_join_element_wise(prefix, values, b"")
