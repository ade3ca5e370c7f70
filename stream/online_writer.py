"""Embedding rows into Feast's online store in bulk, in exactly the layout Feast writes.

``FeatureStore.write_to_online_store`` converts every value of a pandas frame to a protobuf
``Value`` in Python (768 floats per embedding) and then writes one row at a time: about
8,500 rows/s. Here a batch's values are serialized once, as columns:

    embedding        a ``Value`` with ``float_list_val``: one fixed prefix, then the row's
                     768 float32 as their little-endian bytes (protobuf's packed floats)
    model_version    one ``string_val``, shared by every row of the batch
    event_count      ``int64_val``: the tag, then a varint per row
    last_event_time  ``unix_timestamp_val`` in seconds, as Feast converts datetimes

and the entity keys as Feast serializes them (``serialize_entity_key``, version 3). Each
store then gets the batch in as few calls as it takes:

    redis   two round trips per batch on a connection of Feast's client: one Lua script
            answers, for every row, whether its timestamp is newer than the stored one
            (Feast's rule: equal or older is skipped), then one HSET per newer row into the
            hash Feast reads (key: entity key + project; fields: murmur3 of "view:feature",
            and "_ts:view"), the commands built in Redis' wire format column by column.
    sqlite  one executemany upsert into Feast's table ``<project>_<view>`` (sqlite always
            overwrites, as Feast's SqliteOnlineStore does).

tests/test_online_writer.py checks that the stored bytes equal what Feast's own writer
stores for the same rows, and that reads through the SDK and ``feast serve`` are bit-exact.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import hiredis
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import redis

from stream.avro_binary import binary_array, end_to_end, unsigned_varint, varints

if TYPE_CHECKING:
    from stream.feast_sink import EmbeddingRows

_FLOAT_LIST_TAG = b"\x82\x01"  # Value.float_list_val: field 16, length-delimited
_FLOAT_LIST_VAL_TAG = b"\x0a"  # FloatList.val: field 1, packed
_STRING_VAL_TAG = b"\x12"  # Value.string_val: field 2
_INT64_VAL_TAG = 0x20  # Value.int64_val: field 4, varint
_TIMESTAMP_VAL_TAG = 0x40  # Value.unix_timestamp_val: field 8, varint
_STRING_TYPE = 2  # feast ValueType.STRING, in serialized entity keys


@dataclass
class OnlineRows:
    """A batch serialized for the online store: one entry per row in each list."""

    entity_keys: pa.BinaryArray  # serialize_entity_key(user_id), version 3
    values: dict[str, pa.BinaryArray]  # feature name -> serialized Value of each row
    texts: dict[str, list[str | None]]  # feature name -> Feast's text form (sqlite value_text)
    event_ts_ms: np.ndarray  # int64 [n] each row's Feast event timestamp, unix ms
    vectors: dict[str, np.ndarray]  # feature name -> float32 [n, d], for vector columns

    def __len__(self) -> int:
        return len(self.entity_keys)

    @classmethod
    def from_embeddings(cls, rows: EmbeddingRows, join_key: str) -> OnlineRows:
        n = len(rows.user_id)
        return cls(
            entity_keys=entity_keys(join_key, rows.user_id),
            values={
                "embedding": float_list_values(rows.embedding),
                "model_version": pa.array([string_value(rows.model_version)] * n, pa.binary()),
                "event_count": varint_values(_INT64_VAL_TAG, rows.event_count),
                # Feast keeps UNIX_TIMESTAMP values in whole seconds
                "last_event_time": varint_values(
                    _TIMESTAMP_VAL_TAG, rows.last_event_time_ms // 1000
                ),
            },
            texts={
                "embedding": [None] * n,
                "model_version": [rows.model_version] * n,
                "event_count": list(map(str, rows.event_count.tolist())),
                "last_event_time": [None] * n,
            },
            event_ts_ms=rows.as_of_ms,
            vectors={"embedding": rows.embedding},
        )


def entity_keys(join_key: str, user_ids: Sequence[str]) -> pa.BinaryArray:
    """Feast's serialize_entity_key (version 3) of a single string join key, per value."""
    name = join_key.encode()
    prefix = struct.pack("<III", 1, _STRING_TYPE, len(name)) + name
    prefix += struct.pack("<I", _STRING_TYPE)
    ids = pa.array(user_ids, pa.string()).cast(pa.binary())
    lengths = pc.binary_length(ids).to_numpy().astype("<u4")
    length_bytes = binary_array(np.full(len(ids), 4), lengths.view(np.uint8))
    return pc.binary_join_element_wise(pa.scalar(prefix), length_bytes, ids, b"")


def float_list_values(matrix: np.ndarray) -> pa.BinaryArray:
    """A serialized Value(float_list_val=row) per row of a float32 [n, d] matrix."""
    n, d = matrix.shape
    prefix = float_list_prefix(d)
    out = np.empty((n, len(prefix) + 4 * d), np.uint8)
    out[:, : len(prefix)] = np.frombuffer(prefix, np.uint8)
    out[:, len(prefix) :] = np.ascontiguousarray(matrix, "<f4").view(np.uint8)
    return binary_array(np.full(n, out.shape[1]), out.ravel())


def float_list_prefix(d: int) -> bytes:
    """The bytes before the floats of a serialized Value(float_list_val=[d floats]): the
    floats follow as d little-endian float32 (the lookalike index reads them from there)."""
    packed = _FLOAT_LIST_VAL_TAG + unsigned_varint(4 * d)
    return _FLOAT_LIST_TAG + unsigned_varint(len(packed) + 4 * d) + packed


def varint_values(tag: int, numbers: np.ndarray) -> pa.BinaryArray:
    """A serialized Value with one varint field (int64_val, unix_timestamp_val) per number;
    numbers must be non-negative (protobuf writes negative int64 in 10 bytes)."""
    numbers = np.asarray(numbers, np.int64)
    if len(numbers) and numbers.min() < 0:
        raise ValueError("varint_values takes non-negative numbers")
    body = varints(numbers.view(np.uint64))
    return pc.binary_join_element_wise(pa.scalar(bytes([tag])), body, b"")


def string_value(text: str) -> bytes:
    data = text.encode()
    return _STRING_VAL_TAG + unsigned_varint(len(data)) + data


def timestamp_protos(unix_ms: np.ndarray) -> pa.BinaryArray:
    """A serialized google.protobuf.Timestamp per unix ms, as Feast's Redis store keeps
    them (`_ts:<view>`): seconds (field 1) and nanos (field 2), each left out when 0."""
    seconds, nanos = np.divmod(np.asarray(unix_ms, np.int64), 1000)
    nanos *= 1_000_000
    pieces = []
    for tag, number in ((0x08, seconds), (0x10, nanos)):
        present = number > 0
        pieces += [binary_array(present.astype(np.int64), np.full(present.sum(), tag, np.uint8)),
                   varints(number.view(np.uint64), present)]
    return pc.binary_join_element_wise(*pieces, b"")


# Which rows are newer than what is stored, by Feast's rule (equal or older is skipped).
# Timestamps are google.protobuf.Timestamps (seconds = field 1, nanos = field 2, varints),
# compared as (seconds, nanos). KEYS: the rows' hashes; ARGV: the ts field, then each
# row's new ts. Returns 1 (write) or 0 (skip) per key.
_NEWER = """
local function varint(s, i)
  local n, scale = 0, 1
  while true do
    local b = string.byte(s, i)
    n = n + (b % 128) * scale
    if b < 128 then return n, i + 1 end
    scale = scale * 128
    i = i + 1
  end
end
local function seconds_nanos(ts)
  local seconds, nanos, i = 0, 0, 1
  while i <= #ts do
    local tag = string.byte(ts, i)
    local v
    v, i = varint(ts, i + 1)
    if tag == 8 then seconds = v elseif tag == 16 then nanos = v end
  end
  return seconds, nanos
end
local newer = {}
for row = 1, #KEYS do
  local new_s, new_n = seconds_nanos(ARGV[row + 1])
  local old = redis.call('HGET', KEYS[row], ARGV[1])
  local flag = 1
  if old then
    local old_s, old_n = seconds_nanos(old)
    if not (new_s > old_s or (new_s == old_s and new_n > old_n)) then flag = 0 end
  end
  newer[row] = flag
end
return newer
"""


class RedisRowWriter:
    """Writes OnlineRows into Feast's Redis online store (single node)."""

    def __init__(self, store: "feast.FeatureStore", view: "feast.FeatureView") -> None:  # noqa: F821
        from feast.infra.online_stores.helpers import _mmh3
        from feast.infra.online_stores.redis import _versioned_fv_name

        config = store.config
        online = store._get_provider().online_store
        self.client = online._get_client(config.online_store)
        # errors that mean "not answering now": the encoder retries them
        self.unavailable = (redis.ConnectionError, redis.TimeoutError)
        self.project = config.project.encode()
        name = _versioned_fv_name(view, config)
        self.ts_field = f"_ts:{name}".encode()
        self.fields = {f.name: _mmh3(f"{name}:{f.name}") for f in view.features}
        self.newer = self.client.register_script(_NEWER)
        # Feast follows each HSET with an EXPIRE when key_ttl_seconds is set; so do we,
        # or keys written here would never expire.
        self.key_ttl = config.online_store.key_ttl_seconds

    def write(self, rows: OnlineRows) -> int:
        """Rows written (the others had a stored timestamp at least as new)."""
        if not len(rows):
            return 0
        ts = timestamp_protos(rows.event_ts_ms)
        keys = pc.binary_join_element_wise(rows.entity_keys, pa.scalar(self.project), b"")
        newer = self.newer(keys=keys.to_pylist(), args=[self.ts_field, *ts.to_pylist()])
        newer = np.asarray(newer, bool)
        # Like Feast, a check and then a write: a row written by someone else in between is
        # overwritten. Only one encoder holds a user's partition at a time, except briefly
        # in a rebalance, and both then write the same window.
        if not newer.any():
            return 0
        take = pa.array(np.flatnonzero(newer))
        args: list[pa.Array | bytes] = [keys.take(take), self.ts_field, ts.take(take)]
        for name, values in rows.values.items():
            args += [self.fields[name], values.take(take)]
        commands = [_resp_commands(b"HSET", args)]
        if self.key_ttl:
            commands.append(_resp_commands(b"EXPIRE", [args[0], b"%d" % self.key_ttl]))
        self._send(b"".join(commands), len(take) * len(commands))
        return len(take)

    def _send(self, commands: bytes, replies: int) -> None:
        """Send packed commands on a connection of Feast's client and read every reply.

        The replies are parsed by one hiredis reader over raw socket reads: redis-py's
        read_response() costs more per reply than Redis spends on an HSET.
        """
        pool = self.client.connection_pool
        connection = pool.get_connection()
        try:
            connection.send_packed_command([commands])
            reader, error = hiredis.Reader(), None
            while replies:
                try:
                    data = connection._sock.recv(1 << 16)
                except OSError as err:
                    raise redis.ConnectionError(f"reading replies: {err}") from err
                if not data:
                    raise redis.ConnectionError("Redis closed the connection while writing")
                reader.feed(data)
                while replies and (reply := reader.gets()) is not False:
                    replies -= 1
                    if isinstance(reply, hiredis.ReplyError) and error is None:
                        error = reply
            if error is not None:
                raise redis.ResponseError(str(error))
        except BaseException:
            connection.disconnect()  # unread replies would answer the next command
            raise
        finally:
            pool.release(connection)


def _resp_commands(command: bytes, args: Sequence[pa.Array | bytes]) -> bytes:
    """One Redis command per row, in the wire format (RESP), built column by column:
    each arg is a binary column (one value per row) or bytes shared by every row."""
    pieces: list[pa.Array | pa.Scalar] = [pa.scalar(b"*%d\r\n" % (len(args) + 1) + _bulk(command))]
    for arg in args:
        if isinstance(arg, bytes):
            pieces.append(pa.scalar(_bulk(arg)))
        else:
            sizes = pc.cast(pc.binary_length(arg), pa.string()).cast(pa.binary())
            pieces += [pa.scalar(b"$"), sizes, pa.scalar(b"\r\n"), arg, pa.scalar(b"\r\n")]
    return end_to_end(pc.binary_join_element_wise(*pieces, b""))


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


class SqliteRowWriter:
    """Upserts OnlineRows into Feast's sqlite online store table of the view."""

    def __init__(self, store: "feast.FeatureStore", view: "feast.FeatureView") -> None:  # noqa: F821
        from feast.infra.online_stores.sqlite import _quote_id, _table_id

        config = store.config
        self.online = store._get_provider().online_store
        self.config = config
        # "database is locked" and the like: the encoder retries them (the connection's
        # module is sqlite3 or pysqlite3, stream/sqlite_vector_store.py)
        self.unavailable = (self.online._get_conn(config).OperationalError,)
        versioned = config.registry.enable_online_feature_view_versioning
        table = _quote_id(_table_id(config.project, view, versioned))
        self.upsert = (
            f"INSERT INTO {table} "
            "(entity_key, feature_name, value, value_text, event_ts, created_ts) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(entity_key, feature_name) DO UPDATE SET "
            "value = excluded.value, value_text = excluded.value_text, "
            "event_ts = excluded.event_ts, created_ts = excluded.created_ts;"
        )

    def write(self, rows: OnlineRows) -> int:
        # naive UTC datetimes, as Feast stores them
        event_ts = pd.to_datetime(rows.event_ts_ms, unit="ms").to_pydatetime().tolist()
        conn = self.online._get_conn(self.config)
        keys = rows.entity_keys.to_pylist()
        with conn:
            for name, values in rows.values.items():
                conn.executemany(self.upsert, zip(
                    keys, [name] * len(rows), values.to_pylist(), rows.texts[name],
                    event_ts, [None] * len(rows),
                ))
        return len(rows)


class PostgresRowWriter:
    """Upserts OnlineRows into Feast's PostgreSQL online store table of the view, on Feast's
    connection: one binary COPY of the batch into a temporary table, then one INSERT ...
    ON CONFLICT, in one transaction. The view's vector field also goes to ``vector_value``
    (pgvector), as Feast's writer puts it there with ``vector_enabled``: lookalike search
    reads that column."""

    _COLUMNS = ("entity_key", "feature_name", "value", "value_text", "vector_value",
                "event_ts", "created_ts")

    def __init__(self, store: "feast.FeatureStore", view: "feast.FeatureView") -> None:  # noqa: F821
        import psycopg
        from feast.infra.online_stores.postgres_online_store.postgres import _table_id
        from feast.utils import _get_feature_view_vector_field_metadata
        from psycopg import sql

        config = store.config
        self.online = store._get_provider().online_store
        self.config = config
        self.unavailable = (psycopg.OperationalError,)
        self._registered_on: psycopg.Connection | None = None
        self._vector_oid = 0
        field = _get_feature_view_vector_field_metadata(view)
        self.vector_field = field.name if field and config.online_store.vector_enabled else None
        table = sql.Identifier(_table_id(config.project, view,
                                         config.registry.enable_online_feature_view_versioning))
        columns = sql.SQL(", ").join(map(sql.Identifier, self._COLUMNS))
        self.create = sql.SQL(
            "CREATE TEMPORARY TABLE IF NOT EXISTS beat_online_rows ON COMMIT DELETE ROWS AS "
            "SELECT {columns} FROM {table} WITH NO DATA").format(columns=columns, table=table)
        self.copy = sql.SQL("COPY beat_online_rows ({columns}) FROM STDIN (FORMAT BINARY)"
                            ).format(columns=columns)
        updates = sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c))
                                     for c in self._COLUMNS[2:])
        self.upsert = sql.SQL(
            "INSERT INTO {table} ({columns}) SELECT {columns} FROM beat_online_rows "
            "ON CONFLICT (entity_key, feature_name) DO UPDATE SET {updates}"
        ).format(table=table, columns=columns, updates=updates)

    def write(self, rows: OnlineRows) -> int:
        event_ts = pd.to_datetime(rows.event_ts_ms, unit="ms", utc=True).to_pydatetime()
        keys = rows.entity_keys.to_pylist()
        with self.online._get_conn(self.config) as conn:
            # before the cursor, which copies the connection's adapters when made
            vector_type = self._vector_type(conn)
            try:
                with conn.cursor() as cur:
                    cur.execute(self.create)
                    with cur.copy(self.copy) as copy:
                        copy.set_types(["bytea", "text", "bytea", "text", vector_type,
                                        "timestamptz", "timestamptz"])
                        for name, values in rows.values.items():
                            vectors = (rows.vectors[name] if name == self.vector_field
                                       else [None] * len(rows))
                            for row in zip(keys, [name] * len(rows), values.to_pylist(),
                                           rows.texts[name], vectors, event_ts,
                                           [None] * len(rows)):
                                copy.write_row(row)
                    cur.execute(self.upsert)
                conn.commit()
            except BaseException:
                conn.rollback()  # Feast's connection is shared: leave no failed transaction
                raise
        return len(rows)

    def _vector_type(self, conn: "psycopg.Connection") -> int | str:  # noqa: F821
        """The type of vector_value for the COPY: pgvector's vector (its oid, with
        pgvector's binary dumper of numpy arrays registered on the connection), or bytea
        where the store keeps no vectors."""
        if not self.vector_field:
            return "bytea"
        if conn is not self._registered_on:
            from pgvector.psycopg import register_vector
            from psycopg.types import TypeInfo

            register_vector(conn)
            self._vector_oid = TypeInfo.fetch(conn, "vector").oid
            self._registered_on = conn
        return self._vector_oid

