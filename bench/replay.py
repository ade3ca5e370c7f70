"""Replay throughput: stream/replay.py vs a per-message baseline, same broker, same run.

    .venv/bin/python bench/replay.py [--events 300000] [--users 100000]

Starts an embedded Tansu broker, produces synthetic history (producing is not timed),
then replays it (1) with stream.replay.replay (batched consume, vectorized decode, column
sorts), (2) with the baseline: one poll() per message, AvroCodec.decode into a dict per
record, a pandas sort and groupby into lists, (3) ours again under cProfile. Prints a
table and writes bench/results/replay.json. The machine is shared: quote ratios.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pandas as pd  # noqa: E402
from confluent_kafka import Consumer, TopicPartition  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from stream.broker import EmbeddedBroker, client_config, ensure_topics  # noqa: E402
from stream.codec import AvroCodec  # noqa: E402
from stream.config import Settings, load_settings  # noqa: E402
from stream.events import SyntheticEvents  # noqa: E402
from stream.producer import produce  # noqa: E402
from stream.replay import ReplayConfig, replay  # noqa: E402

RESULTS = REPO / "bench" / "results"


def ours(settings: Settings) -> dict:
    began = time.perf_counter()
    table, summary = replay(settings, ReplayConfig(progress=False))
    return {"seconds": time.perf_counter() - began, "events": summary.messages, "bytes": summary.bytes,
            "users": table.num_rows}  # fmt: skip


def baseline(settings: Settings, expected: int) -> dict:
    """Per-message consume, a dict per event, pandas groupby."""
    began = time.perf_counter()
    codec = AvroCodec("behavior_event", settings.events_topic)
    consumer = Consumer(client_config(settings, **{"group.id": f"baseline-{uuid.uuid4().hex}"}))
    consumer.assign([TopicPartition(settings.events_topic, p, 0) for p in range(settings.partitions)])
    records, size = [], 0
    while len(records) < expected:
        message = consumer.poll(1.0)
        if message is None or message.error():
            continue
        size += len(message.value())
        records.append(codec.decode(message.value()))
    consumer.close()
    frame = pd.DataFrame.from_records(records, columns=["user_id", "event_id", "event_time", "action", "property", "value"])
    frame = frame.drop_duplicates(["user_id", "event_id"]).sort_values(["user_id", "event_time", "event_id"])
    users = frame.groupby("user_id", sort=True).agg(list)
    return {"seconds": time.perf_counter() - began, "events": len(records), "bytes": size, "users": len(users)}


def profile(settings: Settings, top: int = 12) -> str:
    profiler = cProfile.Profile()
    profiler.runcall(replay, settings, ReplayConfig(progress=False))
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--users", type=int, default=100_000)
    args = parser.parse_args()
    console = Console()
    with EmbeddedBroker() as broker:
        run = uuid.uuid4().hex[:8]
        settings = load_settings(bootstrap_servers=broker.bootstrap_servers, events_topic=f"bench.events.{run}",
                                 windows_topic=f"bench.windows.{run}", embeddings_topic=f"bench.embeddings.{run}",
                                 dead_letter_topic=f"bench.dlq.{run}")  # fmt: skip
        ensure_topics(settings)
        began = time.perf_counter()
        history = SyntheticEvents(n_users=args.users).history(datetime(2024, 1, 1, tzinfo=UTC), datetime(2025, 1, 1, tzinfo=UTC))
        sent = produce(settings, history, limit=args.events)
        console.print(f"produced {sent:,} events in {time.perf_counter() - began:,.1f} s (not timed below)")
        results = {"ours": ours(settings), "baseline": baseline(settings, sent)}
        profile_text = profile(settings)

    table = Table(title=f"replay of {sent:,} events, {args.users:,} users (Tansu, one process)")
    for column in ("path", "seconds", "events/s", "MB/s", "users"):
        table.add_column(column, justify="right")
    for name, r in results.items():
        r["events_per_s"] = r["events"] / r["seconds"]
        r["mb_per_s"] = r["bytes"] / 1e6 / r["seconds"]
        table.add_row(name, f"{r['seconds']:.2f}", f"{r['events_per_s']:,.0f}", f"{r['mb_per_s']:.1f}", f"{r['users']:,}")
    ratio = results["ours"]["events_per_s"] / results["baseline"]["events_per_s"]
    console.print(table)
    console.print(f"ours / baseline: {ratio:.1f}x")
    console.print(profile_text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "replay.json").write_text(json.dumps(
        {"events": sent, "users": args.users, **results, "ratio": ratio, "profile": profile_text}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
