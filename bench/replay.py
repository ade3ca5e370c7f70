"""Replay and produce throughput on the embedded broker, ours vs baselines, same run.

    .venv/bin/python bench/replay.py [--events 300000] [--users 100000]

Starts an embedded Tansu broker and produces synthetic history, timing the producer
(the vectorized encoder of stream/event_encoding.py) against the same producer fed one
fastavro record per event (EventProducer.send, dicts) on a slice, both warmed up. Then reads the
topic
(1) with stream.replay.replay (batched consume, vectorized decode, column sorts), (2)
bare: the replay's consumer settings, consume() and the values as bytes, nothing
decoded, the limit of reading through confluent-kafka, (3) the baseline: one poll() per
message, AvroCodec.decode into a dict per record, a pandas sort and groupby into lists,
(4) ours again under cProfile. Prints tables and writes bench/results/replay.json. The
machine is shared: quote ratios, and CPU seconds next to wall seconds.
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
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pandas as pd  # noqa: E402
import pyarrow as pa  # noqa: E402
from confluent_kafka import Consumer, Message, TopicPartition  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from stream.broker import EmbeddedBroker, client_config, ensure_topics, records_in  # noqa: E402
from stream.codec import AvroCodec  # noqa: E402
from stream.config import Settings, load_settings  # noqa: E402
from stream.producer import EventProducer  # noqa: E402
from stream.replay import ReplayConfig, replay, replay_consumer_config  # noqa: E402
from stream.synthetic import SyntheticEvents  # noqa: E402

RESULTS = REPO / "bench" / "results"


def timed(run: Callable[[], dict]) -> dict:
    """run's result with the wall and process CPU seconds it took (CPU: every thread of
    this process, librdkafka's included, not the broker's)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = run()
    return {
        **result,
        "seconds": time.perf_counter() - wall,
        "cpu_seconds": time.process_time() - cpu,
    }


def ours(settings: Settings) -> dict:
    table, summary = replay(settings, ReplayConfig(progress=False))
    return {"events": summary.messages, "bytes": summary.bytes, "users": table.num_rows}


def bare(settings: Settings) -> dict:
    """The replay's consumer and batch size, every value as bytes, nothing else; done at
    the end-of-partition reports, as the replay."""
    consumer = Consumer(replay_consumer_config(settings))
    consumer.assign(
        [TopicPartition(settings.events_topic, p, 0) for p in range(settings.partitions)]
    )
    events, size, ended = 0, 0, {}
    while len(ended) < settings.partitions:
        messages = records_in(consumer.consume(ReplayConfig().batch_messages, 0.02), ended)
        values = list(map(Message.value, messages))
        events, size = events + len(values), size + sum(map(len, values))
    consumer.close()
    return {"events": events, "bytes": size, "users": 0}


def baseline(settings: Settings, expected: int) -> dict:
    """Per-message consume, a dict per event, pandas groupby."""
    codec = AvroCodec("behavior_event", settings.events_topic)
    consumer = Consumer(client_config(settings, **{"group.id": f"baseline-{uuid.uuid4().hex}"}))
    consumer.assign(
        [TopicPartition(settings.events_topic, p, 0) for p in range(settings.partitions)]
    )
    records, size = [], 0
    while len(records) < expected:
        message = consumer.poll(1.0)
        if message is None or message.error():
            continue
        size += len(message.value())
        records.append(codec.decode(message.value()))
    consumer.close()
    frame = pd.DataFrame.from_records(
        records, columns=["user_id", "event_id", "event_time", "action", "property", "value"]
    )
    frame = frame.drop_duplicates(["user_id", "event_id"]).sort_values(
        ["user_id", "event_time", "event_id"]
    )
    users = frame.groupby("user_id", sort=True).agg(list)
    return {"events": len(records), "bytes": size, "users": len(users)}


def first_events(batches: Iterator[pa.RecordBatch], n: int) -> list[pa.RecordBatch]:
    """Batches holding the first n events (generated before any timing starts)."""
    out, count = [], 0
    for batch in batches:
        out.append(batch.slice(0, n - count))
        count += out[-1].num_rows
        if count >= n:
            break
    return out


def warm_producer(settings: Settings, first: pa.RecordBatch) -> EventProducer:
    """A producer that has sent one event: the idempotent producer's start (about 1 s of
    waiting for a producer id) is not what the encoders are compared on."""
    producer = EventProducer(settings)
    producer.send_batch(first.slice(0, 1))
    producer.flush()
    return producer


def produce_vectorized(producer: EventProducer, batches: list[pa.RecordBatch]) -> dict:
    for batch in batches:
        producer.send_batch(batch)
    producer.flush()
    return {"events": sum(b.num_rows for b in batches)}


def produce_per_record(producer: EventProducer, batches: list[pa.RecordBatch]) -> dict:
    """The same producer fed dicts: fastavro, one record per call (the encoder before)."""
    for batch in batches:
        producer.send({**row, "attributes": dict(row["attributes"])} for row in batch.to_pylist())
    producer.flush()
    return {"events": sum(b.num_rows for b in batches)}


def profile(settings: Settings, top: int = 12) -> str:
    profiler = cProfile.Profile()
    profiler.runcall(replay, settings, ReplayConfig(progress=False))
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def rates(results: dict[str, dict]) -> None:
    for r in results.values():
        r["events_per_s"] = r["events"] / r["seconds"]
        r["mb_per_s"] = r.get("bytes", 0) / 1e6 / r["seconds"]


def rate_table(title: str, results: dict[str, dict], columns: tuple[str, ...]) -> Table:
    table = Table(title=title)
    for column in ("path", "events", "seconds", "CPU s", "events/s", *columns):
        table.add_column(column, justify="right")
    for name, r in results.items():
        extra = {"MB/s": f"{r['mb_per_s']:.1f}", "users": f"{r.get('users', 0):,}"}
        table.add_row(name, f"{r['events']:,}", f"{r['seconds']:.2f}", f"{r['cpu_seconds']:.2f}",
                      f"{r['events_per_s']:,.0f}", *(extra[c] for c in columns))  # fmt: skip
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument(
        "--per-record-events", type=int, default=50_000, help="size of the slow producer's slice"
    )
    args = parser.parse_args()
    console = Console()
    with EmbeddedBroker() as broker:
        run = uuid.uuid4().hex[:8]

        def topic_settings(name: str) -> Settings:
            return load_settings(
                bootstrap_servers=broker.bootstrap_servers, events_topic=f"bench.{name}.{run}",
                windows_topic=f"bench.windows.{run}", embeddings_topic=f"bench.embeddings.{run}",
                dead_letter_topic=f"bench.dlq.{run}",
            )  # fmt: skip

        settings, slow_settings = topic_settings("events"), topic_settings("events-per-record")
        ensure_topics(settings)
        ensure_topics(slow_settings)
        year = datetime(2024, 1, 1, tzinfo=UTC), datetime(2025, 1, 1, tzinfo=UTC)
        history = SyntheticEvents(n_users=args.users).history(*year)
        batches = first_events(history, args.events)
        slow = (
            pa.Table.from_batches(batches)
            .slice(0, args.per_record_events)
            .to_batches(max_chunksize=50_000)
        )
        fast_producer, slow_producer = (
            warm_producer(settings, batches[0]),
            warm_producer(slow_settings, batches[0]),
        )
        producing = {
            # The producers as default arguments: the names are deleted below.
            "vectorized encode": timed(lambda p=fast_producer: produce_vectorized(p, batches)),
            "fastavro per record": timed(lambda p=slow_producer: produce_per_record(p, slow)),
        }
        sent = fast_producer.sent  # the warm-up event too
        del fast_producer, slow_producer  # their connections would hold up the broker's shutdown
        reading = {
            "ours (replay)": timed(lambda: ours(settings)),
            "bare consume": timed(lambda: bare(settings)),
            "baseline": timed(lambda: baseline(settings, sent)),
        }
        profile_text = profile(settings)

    rates(producing)
    rates(reading)
    produce_ratio = (
        producing["vectorized encode"]["events_per_s"]
        / producing["fastavro per record"]["events_per_s"]
    )
    console.print(rate_table("produce: encode, send, flush (warm producers)", producing, ()))
    console.print(f"vectorized / per record: {produce_ratio:.1f}x")
    title = f"replay of {sent:,} events, {args.users:,} users (Tansu, one process)"
    console.print(rate_table(title, reading, ("MB/s", "users")))
    ours_rate = reading["ours (replay)"]["events_per_s"]
    ratio = ours_rate / reading["baseline"]["events_per_s"]
    of_bare = ours_rate / reading["bare consume"]["events_per_s"]
    console.print(f"ours / baseline: {ratio:.1f}x   ours / bare consume: {of_bare:.0%}")
    console.print(profile_text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "replay.json").write_text(json.dumps(
        {"events": sent, "users": args.users, "produce": producing, "produce_ratio": produce_ratio,
         **reading, "ratio": ratio, "ours_of_bare": of_bare, "profile": profile_text},
        indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
