"""Online reads of embeddings through Feast: our user_embedding against a plain Feast view.

    OMP_NUM_THREADS=1 .venv/bin/python bench/feast_read.py [--users 1000] [--reads 150]

For Redis (127.0.0.1:6379 or BEAT_REDIS_URL) and sqlite, each in a Feast project of its
own: the same --users rows are written to user_embedding by FeatureSink.write (our bulk
writer) and to `plain_embedding`, a view of the same four fields (768 float32 and three
scalars) that Feast's own write_to_online_store fills: the baseline, so any cost of ours
shows as a ratio. Then p50/p99 latency of reads of 1 and of 100 random users, through the
SDK (FeatureStore.get_online_features(...).to_dict()) and through `feast serve`'s HTTP
/get-online-features (a child process on a free loopback port; the time is the client's,
response body received). The two views are read alternately, so load on the shared
machine falls on both. Prints a table, writes bench/results/feast_read.json, with the load
average.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.feast_bench import batches, bench_settings, drop_redis_rows, run_per_store  # noqa: E402
from stream.feast_server import feast_server  # noqa: E402
from stream.feast_sink import FEATURE_VIEW, FEATURES, FeatureSink, embedding_frame  # noqa: E402

RESULTS = REPO / "bench" / "results" / "feast_read.json"
PLAIN_VIEW = "plain_embedding"
VIEWS = (PLAIN_VIEW, FEATURE_VIEW)  # the baseline first in every table row
USERS_PER_READ = (1, 100)


def add_plain_view(sink: FeatureSink, data_dir: Path) -> None:
    """Register plain_embedding: user_embedding's fields, a source nothing reads."""
    from feast import FeatureView, FileSource

    source = FileSource(name=f"{PLAIN_VIEW}_source", path=str(data_dir / "unused.parquet"),
                        timestamp_field="updated_at")
    view = FeatureView(name=PLAIN_VIEW, entities=[sink.store.get_entity("user")],
                       ttl=sink.view.ttl, schema=sink.view.features, source=source, online=True)
    sink.store.apply([view])


def fill(sink: FeatureSink, users: int) -> None:
    """The same rows into both views: ours by our writer, the baseline by Feast's."""
    for rows in batches(users, 1_000, seed=1):
        sink.write(rows)
        sink.store.write_to_online_store(PLAIN_VIEW, embedding_frame(rows))


def refs(view: str) -> list[str]:
    return [f"{view}:{name}" for name in FEATURES]


def sdk_reader(sink: FeatureSink) -> Callable[[str, list[str]], object]:
    def read(view: str, user_ids: list[str]) -> dict:
        return sink.store.get_online_features(
            features=refs(view), entity_rows=[{"user_id": u} for u in user_ids]
        ).to_dict()
    return read


def http_reader(url: str) -> Callable[[str, list[str]], object]:
    session = requests.Session()

    def read(view: str, user_ids: list[str]) -> dict:
        response = session.post(f"{url}/get-online-features", timeout=30, json={
            "features": refs(view), "entities": {"user_id": user_ids},
        })
        response.raise_for_status()
        return response.json()
    return read


def check_same_values(read: Callable[[str, list[str]], object]) -> None:
    """Both views hold the same rows: a reader that differed would be timing another read."""
    plain, ours = (read(view, ["u00000000", "u00000001"]) for view in VIEWS)
    def text(body: object) -> str:
        return json.dumps(body, sort_keys=True, default=str)

    if text(plain).replace(PLAIN_VIEW, FEATURE_VIEW) != text(ours):
        raise AssertionError("plain_embedding and user_embedding read back differently")


def latencies(
    read: Callable[[str, list[str]], object], users: int, reads: int, population: int
) -> dict:
    """p50/p99 ms per view of reads of `users` random users of the population written,
    the views alternating."""
    rng = np.random.default_rng(users)
    times: dict[str, list[float]] = {view: [] for view in VIEWS}
    for i in range(reads + 5):  # the first 5 warm up
        user_ids = [f"u{u:08d}" for u in rng.choice(population, users, replace=False)]
        for view in VIEWS if i % 2 else VIEWS[::-1]:
            start = time.perf_counter()
            read(view, user_ids)
            if i >= 5:
                times[view].append((time.perf_counter() - start) * 1000)
    return {view: {"reads": len(t), "p50_ms": round(float(np.percentile(t, 50)), 2),
                   "p99_ms": round(float(np.percentile(t, 99)), 2)}
            for view, t in times.items()}


def run_store(store: str, args: argparse.Namespace) -> dict[str, dict]:
    settings = bench_settings(store, "read")
    sink = FeatureSink(settings)
    add_plain_view(sink, settings.feast_data_dir)
    fill(sink, args.users)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as directory, \
            feast_server(settings, Path(directory)) as url:
        for path, read in (("sdk", sdk_reader(sink)), ("http", http_reader(url))):
            check_same_values(read)
            results[path] = {str(n): latencies(read, n, args.reads, args.users)
                             for n in USERS_PER_READ}
    if store == "redis":
        drop_redis_rows(sink)
    return results


def print_table(results: dict, stores: list[str]) -> None:
    print(f"{'store':<7} {'path':<5} {'users':>5}  {'plain p50/p99 ms':>17}  "
          f"{'ours p50/p99 ms':>16}  {'p50 ratio':>9}")
    for store in stores:
        for path, by_users in results[store].items():
            for users, views in by_users.items():
                plain, ours = (views[view] for view in VIEWS)
                print(f"{store:<7} {path:<5} {users:>5}  "
                      f"{plain['p50_ms']:>8.2f} /{plain['p99_ms']:>7.2f}  "
                      f"{ours['p50_ms']:>7.2f} /{ours['p99_ms']:>7.2f}  "
                      f"{ours['p50_ms'] / plain['p50_ms']:>8.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=1_000, help="users written to each view")
    parser.add_argument("--reads", type=int, default=150, help="timed reads per view and size")
    parser.add_argument("--stores", default="redis,sqlite")
    args = parser.parse_args()
    run_per_store(args.stores.split(","), lambda store: run_store(store, args), print_table,
                  RESULTS)


if __name__ == "__main__":
    main()
