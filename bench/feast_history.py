"""Embedding history in PostgreSQL: append rate beside the online write, and a point-in-time join.

    .venv/bin/python bench/feast_history.py [--users 10000] [--updates 3] [--entity-rows 100000]

In a Feast project of its own (its schema dropped at the end), --updates rounds of --users
768-float embeddings in micro-batches of --batch, as the encoder writes them:
  - online write: FeatureSink's sqlite writer (stream/online_writer.py), for scale;
  - history append: HistoryWriter.append (one binary COPY per batch, built column-wise);
  - baseline append: psycopg's COPY with write_row per row, what a plain writer does
    (Feast's postgres offline store has no offline write; its file store, whose
    write_to_offline_store rewrites the whole Parquet file, needs dask, not installed here).
Then get_historical_features for --entity-rows entity rows at random times, against the
same point-in-time join as one SQL query (LATERAL, newest row at or before each time)
fetched by psycopg, as the baseline. Prints a table, writes bench/results/feast_history.json.
The machine is shared: the load average is recorded, quote ratios.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.feast_bench import drop_postgres_schema, save_results  # noqa: E402
from bench.feast_write import rate  # noqa: E402
from stream.config import load_settings  # noqa: E402
from stream.feast_sink import EmbeddingRows, FeatureSink  # noqa: E402
from stream.offline_history import HISTORY_COLUMNS  # noqa: E402
from stream.online_writer import OnlineRows  # noqa: E402

RESULTS = REPO / "bench" / "results" / "feast_history.json"
T0_MS = 1_780_315_200_000  # 2026-06-01 12:00 UTC
ROUND_MS = 3_600_000  # an hour between a user's updates


def batches(users: int, size: int, round_: int) -> list[EmbeddingRows]:
    rng = np.random.default_rng(round_)
    at_ms = T0_MS + round_ * ROUND_MS
    return [EmbeddingRows(
        user_id=[f"u{i:08d}" for i in range(start, min(start + size, users))],
        embedding=rng.standard_normal((min(size, users - start), 768)).astype(np.float32),
        model_version="bench",
        event_count=np.full(min(size, users - start), round_ + 1),
        last_event_time_ms=np.full(min(size, users - start), at_ms - 1000),
        as_of_ms=np.full(min(size, users - start), at_ms),
    ) for start in range(0, users, size)]


def per_row_copy(sink: FeatureSink):  # noqa: ANN201
    """psycopg's COPY, one write_row per row: the baseline append."""
    import psycopg

    conn = psycopg.connect(sink.history._url, autocommit=True)

    def append(rows: EmbeddingRows) -> None:
        last = pd.to_datetime(rows.last_event_time_ms, unit="ms", utc=True)
        as_of = pd.to_datetime(rows.as_of_ms, unit="ms", utc=True)
        with conn.transaction(), conn.cursor() as cur, cur.copy(
            f"COPY {sink.history.table} ({', '.join(HISTORY_COLUMNS)}) FROM STDIN"
        ) as copy:
            for i, user in enumerate(rows.user_id):
                copy.write_row((user, rows.embedding[i].tolist(), rows.model_version,
                                int(rows.event_count[i]), last[i], as_of[i]))
    return append


def entity_frame(users: int, n: int, rounds: int) -> pd.DataFrame:
    rng = np.random.default_rng(99)
    at_ms = T0_MS - ROUND_MS // 2 + rng.integers(0, (rounds + 1) * ROUND_MS, n)
    return pd.DataFrame({
        "user_id": [f"u{i:08d}" for i in rng.integers(0, users, n)],
        "event_timestamp": pd.to_datetime(at_ms, unit="ms", utc=True),
    })


def feast_join(sink: FeatureSink, entities: pd.DataFrame) -> dict:
    start = time.perf_counter()
    frame = sink.store.get_historical_features(
        entity_df=entities, features=[f"{sink.view.name}:embedding"]
    ).to_df()
    seconds = time.perf_counter() - start
    found = int(frame["embedding"].map(lambda e: e is not None and len(e) > 0).sum())
    return {"entity_rows": len(frame), "with_embedding": found, "seconds": round(seconds, 2)}


def sql_join(sink: FeatureSink, entities: pd.DataFrame) -> dict:
    """The same join in one query: per entity row, the newest history row at or before it."""
    import psycopg

    start = time.perf_counter()
    with psycopg.connect(sink.history._url) as conn, conn.cursor() as cur:
        cur.execute("CREATE TEMP TABLE entities (user_id text, at timestamptz)")
        with cur.copy("COPY entities FROM STDIN") as copy:
            for row in entities.itertuples(index=False):
                copy.write_row(row)
        cur.execute(
            "SELECT e.user_id, e.at, h.embedding FROM entities e LEFT JOIN LATERAL ("
            f"SELECT embedding FROM {sink.history.table} h WHERE h.user_id = e.user_id "
            "AND h.updated_at <= e.at ORDER BY updated_at DESC, written_at DESC LIMIT 1"
            ") h ON true"
        )
        result = cur.fetchall()
    seconds = time.perf_counter() - start
    found = sum(row[2] is not None for row in result)
    return {"entity_rows": len(result), "with_embedding": found, "seconds": round(seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--updates", type=int, default=3)
    parser.add_argument("--baseline-users", type=int, default=2_048)
    parser.add_argument("--entity-rows", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1_024)
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()

    run = uuid.uuid4().hex[:8]
    settings = load_settings(
        feast_project=f"bench_history_{run}", feast_data_dir=Path("/tmp") / f"beat_bench_{run}",
        online_store="sqlite", offline_store="postgres", postgres_url=args.postgres_url,
    )
    sink = FeatureSink(settings)
    results: dict = {"load_average_before": os.getloadavg(), "args": vars(args)}
    try:
        results["append"] = {
            # the online rows as FeatureSink.write makes and writes them, history aside
            "online write (sqlite, FeatureSink)": rate(
                lambda rows: sink.writer.write(OnlineRows.from_embeddings(rows, sink.join_key)),
                batches(args.users, args.batch, 0)),
            "baseline: psycopg COPY, write_row per row": rate(
                per_row_copy(sink), batches(args.baseline_users, args.batch, 0)),
            "ours: HistoryWriter.append (binary COPY)": rate(
                sink.history.append,
                [b for r in range(args.updates) for b in batches(args.users, args.batch, r)]),
        }
        entities = entity_frame(args.users, args.entity_rows, args.updates)
        results["point-in-time join"] = {
            "baseline: one SQL query (LATERAL), psycopg": sql_join(sink, entities),
            "feast get_historical_features": feast_join(sink, entities),
        }
    finally:
        drop_postgres_schema(settings, args.postgres_url)
    results["load_average_after"] = os.getloadavg()
    report(results)


def report(results: dict) -> None:
    print(f"{'append path':<44} {'rows':>8} {'rows/s':>10}")
    for path, r in results["append"].items():
        print(f"{path:<44} {r['rows']:>8,} {r['rows_per_s']:>10,}")
    print(f"\n{'point-in-time join':<44} {'rows':>8} {'found':>8} {'seconds':>8}")
    for path, r in results["point-in-time join"].items():
        print(f"{path:<44} {r['entity_rows']:>8,} {r['with_embedding']:>8,} {r['seconds']:>8}")
    save_results(results, RESULTS)


if __name__ == "__main__":
    main()
