"""Embeddings into Feast's online store: our bulk writer vs Feast's own, same stores, same run.

    .venv/bin/python bench/feast_write.py [--rows 30720] [--feast-rows 3072] [--batch 1024]

For Redis (127.0.0.1:6379 or BEAT_REDIS_URL) and sqlite, each in a Feast project of its
own: FeatureSink.write (stream/online_writer.py: Values serialized as columns, one
Lua check and one pipelined send per batch) against Feast's write_to_online_store and
push(to=ONLINE) of the same rows as a pandas frame (Feast converts each of the 768 floats
to protobuf in Python). Rows are 768-float embeddings with a model version, an event count
and a last event time, in micro-batches of --batch users as the encoder writes them; each
path's time includes building what it writes (our columns, Feast's frame). Also the
beat.embeddings values: encoded column-wise (encoder_worker.embedding_values) against
fastavro one record at a time. And Redis's own MEMORY USAGE per user key (the sizing
figure). Prints a table, writes bench/results/feast_write.json.
The machine is shared: the load average is recorded, quote ratios.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.feast_bench import batches, bench_settings, save_results  # noqa: E402
from stream.codec import AvroCodec  # noqa: E402
from stream.encoder_worker import embedding_values  # noqa: E402
from stream.feast_sink import FEATURE_VIEW, EmbeddingRows, FeatureSink, embedding_frame  # noqa: E402

RESULTS = REPO / "bench" / "results" / "feast_write.json"


def rate(write: Callable[[EmbeddingRows], object], rows: list[EmbeddingRows]) -> dict:
    start = time.perf_counter()
    for batch in rows:
        write(batch)
    seconds = time.perf_counter() - start
    n = sum(len(b.user_id) for b in rows)
    return {"rows": n, "seconds": round(seconds, 3), "rows_per_s": round(n / seconds)}


def run_store(store: str, args: argparse.Namespace) -> dict[str, dict]:
    settings = bench_settings(store, "write")
    sink = FeatureSink(settings)
    from feast.data_source import PushMode

    def feast_write(rows: EmbeddingRows) -> None:
        sink.store.write_to_online_store(FEATURE_VIEW, embedding_frame(rows))

    def feast_push(rows: EmbeddingRows) -> None:
        sink.store.push("user_embedding_push", embedding_frame(rows), to=PushMode.ONLINE)

    results = {
        # each path writes rows newer than the previous one's (Redis keeps only newer rows)
        "feast write_to_online_store": rate(feast_write, batches(args.feast_rows, args.batch, 1)),
        "feast push (online)": rate(feast_push, batches(args.feast_rows, args.batch, 2)),
        "ours (FeatureSink.write)": rate(sink.write, batches(args.rows, args.batch, 3)),
        "ours, rows already stored": rate(sink.write, batches(args.rows, args.batch, 4)),
    }
    if store == "redis":
        client = sink.writer.client
        keys = list(client.scan_iter(match=b"*" + settings.feast_project.encode(), count=10_000))
        results["redis memory per user"] = redis_bytes_per_key(client, keys)
        for start in range(0, len(keys), 10_000):
            client.delete(*keys[start : start + 10_000])
    return results


def redis_bytes_per_key(client: object, keys: list[bytes], sample: int = 1_000) -> dict:
    """Redis's own MEMORY USAGE of a sample of the users' keys (a hash per user holding
    the view's fields): the online store's size per user, whatever else the server holds."""
    sizes = [client.memory_usage(key, samples=0) for key in keys[:sample]]
    per_user = float(np.mean(sizes))
    return {"keys_sampled": len(sizes), "bytes": round(per_user),
            "gib_per_million_users": round(per_user * 1e6 / 2**30, 2)}


def publish_encoding(args: argparse.Namespace) -> dict[str, dict]:
    codec = AvroCodec("user_embedding", "beat.embeddings")
    header = codec.framing.header()

    def per_record(rows: EmbeddingRows) -> None:
        for i in range(len(rows.user_id)):
            codec.encode({
                "user_id": rows.user_id[i], "model_version": rows.model_version,
                "embedding": rows.embedding[i].tolist(), "event_count": int(rows.event_count[i]),
                "last_event_time": int(rows.last_event_time_ms[i]),
                "updated_at": int(rows.as_of_ms[i]),
            })

    return {
        "fastavro per record": rate(per_record, batches(args.feast_rows, args.batch, 6)),
        "ours (embedding_values)": rate(lambda r: embedding_values(header, r),
                                        batches(args.rows, args.batch, 5)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=30_720)
    parser.add_argument("--feast-rows", type=int, default=3_072)
    parser.add_argument("--batch", type=int, default=1_024)
    parser.add_argument("--stores", default="redis,sqlite")
    args = parser.parse_args()

    results = {"load_average_before": os.getloadavg()}
    for store in args.stores.split(","):
        results[store] = run_store(store, args)
    results["beat.embeddings encoding"] = publish_encoding(args)
    results["load_average_after"] = os.getloadavg()

    print(f"{'target':<26} {'path':<30} {'rows':>8} {'rows/s':>10} {'ratio':>9}")
    for target in [*args.stores.split(","), "beat.embeddings encoding"]:
        paths = {path: r for path, r in results[target].items() if "rows_per_s" in r}
        baseline = next(iter(paths.values()))["rows_per_s"]
        for path, r in paths.items():
            ratio = r["rows_per_s"] / baseline
            print(f"{target:<26} {path:<30} {r['rows']:>8,} {r['rows_per_s']:>10,} {ratio:>8.1f}x")
    if "redis" in results:
        memory = results["redis"]["redis memory per user"]
        print(f"Redis memory per user: {memory['bytes']:,} bytes "
              f"({memory['gib_per_million_users']} GiB per million users)")
    save_results(results, RESULTS)


if __name__ == "__main__":
    main()
