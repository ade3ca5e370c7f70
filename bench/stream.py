"""Stream-worker throughput: our worker process vs a naive faust agent, same broker, same run.

    .venv/bin/python bench/stream.py [--events 1000000] [--naive-events 20000] [--users 100000]

Starts an embedded Tansu broker, pre-produces synthetic events (100k users, Zipf
activity) so producing is not measured, then runs, one after the other and each in its
own process: (1) the stream worker (stream.stream_worker.StreamWorker) with its memory
store, (1b) the same with its RocksDB store, (2) a naive faust agent that decodes one event
at a time and appends it to a list-valued table (the baseline), (3) the stream worker again
with its batch processing under cProfile. Each process samples its own event counter and
CPU time every 50 ms, so start-up and group join are not timed; the rate is events / (time
of the last event - time of the first). The broker's CPU time over each run is read from
/proc. Prints a table and writes bench/results/stream.json. Timings on a shared machine are
noisy: quote ratios.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import faust  # noqa: E402

from bench.faust_transport import broker_url  # noqa: E402
from stream.broker import EmbeddedBroker, ensure_topics  # noqa: E402
from stream.codec import AvroCodec  # noqa: E402
from stream.config import Settings, load_settings  # noqa: E402
from stream.producer import produce  # noqa: E402
from stream.stream_worker import StreamWorker, WindowStats  # noqa: E402
from stream.synthetic import SyntheticEvents  # noqa: E402

RESULTS = REPO / "bench" / "results"
SAMPLE_S = 0.05
STATE_STORES = {"rocksdb": "rocksdb"}  # roles whose worker keeps its windows in RocksDB
HISTORY_START = datetime(2026, 1, 1, tzinfo=timezone.utc)


def naive_app(settings: Settings, counter: dict[str, int]) -> faust.App:
    """The baseline: one event at a time, decoded to a dict, appended to a list in a table."""
    app = faust.App(
        f"{settings.group_prefix}-naive",
        broker=broker_url(settings.bootstrap_servers, settings.fetch_max_wait_ms),
        store="memory://",
        datadir=str(settings.data_dir / "naive"),
        web_enabled=False,
        topic_partitions=settings.partitions,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.session_timeout_ms / 1000,
    )
    events = app.topic(settings.events_topic, key_serializer="raw", value_serializer="raw")
    table = app.Table("naive-windows", default=list, partitions=settings.partitions)
    codec = AvroCodec("behavior_event", settings.events_topic)

    @app.agent(events)
    async def append(stream: faust.StreamT) -> None:
        async for value in stream:
            event = codec.decode(value)
            event["event_time"] = int(event["event_time"].timestamp() * 1000)
            table[event["user_id"]] = (table[event["user_id"]] + [event])[-settings.max_events:]
            counter["events"] += 1

    return app


def run_child(role: str, target: int, out: Path) -> None:
    """Run one worker until it has processed target events; write its timings to out."""
    settings = load_settings()
    if role == "naive":
        run_naive(settings, target, out)
        return
    worker = StreamWorker(settings)
    profiler = cProfile.Profile() if role == "profile" else None
    if profiler:  # the batch processing only, not the waits in consume()
        process = worker.process
        worker.process = lambda batch: profiler.runcall(process, batch)  # type: ignore[method-assign]
    samples: list[tuple[float, float, int]] = []
    take_batch = worker.runtime.take_batch

    def take_and_mark_start() -> bool:
        # The run starts when the worker starts taking its first batch.
        before = (time.monotonic(), time.process_time(), 0)
        took = take_batch()
        if worker.pending and not samples:
            samples.append(before)
        return took

    worker.runtime.take_batch = take_and_mark_start  # type: ignore[method-assign]

    def sample() -> None:
        while worker.stats.counts["events"] < target:
            if samples:
                samples.append(
                    (time.monotonic(), time.process_time(), worker.stats.counts["events"])
                )
            time.sleep(SAMPLE_S)
        samples.append((time.monotonic(), time.process_time(), worker.stats.counts["events"]))
        worker.stop()

    threading.Thread(target=sample, daemon=True).start()
    worker.run()
    _write_result(out, samples, profiler, worker.stats, worker.runtime.stages.seconds)


def run_naive(settings: Settings, target: int, out: Path) -> None:
    counter: dict[str, int] = {"events": 0}
    (settings.data_dir / "naive").mkdir(parents=True, exist_ok=True)
    app = naive_app(settings, counter)
    samples: list[tuple[float, float, int]] = []

    @app.timer(SAMPLE_S)
    async def sample() -> None:
        samples.append((time.monotonic(), time.process_time(), counter["events"]))
        if counter["events"] >= target:
            _write_result(out, samples, None, None)
            # The measurement is done; a graceful faust shutdown would only add seconds.
            os._exit(0)

    worker = faust.Worker(app, loglevel="warn", quiet=True)
    worker.spinner = None
    worker.execute_from_commandline()


def _write_result(
    out: Path,
    samples: list[tuple[float, float, int]],
    profiler: cProfile.Profile | None,
    stats: WindowStats | None,
    stage_seconds: dict[str, float] | None = None,
) -> None:
    # The naive agent's first sample with events starts its run (the one before is partly
    # idle); ours marks its start itself.
    first = 0 if stats else next(i for i, s in enumerate(samples) if s[2] > 0)
    (t0, c0, n0), (t1, c1, n1) = samples[first], samples[-1]
    result = {"events": n1 - n0, "seconds": t1 - t0, "cpu_seconds": c1 - c0}
    if stats:  # the naive agent emits no windows
        result["coalescing"] = stats.counts["events"] / stats.counts["windows"]
        result["stage_ms_per_batch"] = {
            k: 1000 * v / stats.counts["batches"] for k, v in stage_seconds.items()
        }
        result["batches"] = stats.counts["batches"]
    if profiler:
        profiler.dump_stats(out.with_suffix(".pstats"))
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(18)
        result["profile_tottime"] = text.getvalue()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(25)
        result["profile_cumulative"] = text.getvalue()
    out.write_text(json.dumps(result))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_role(
    settings: Settings, role: str, target: int, workdir: Path, broker_pid: int, batch_events: int
) -> dict:
    out = workdir / f"{role}.json"
    env = {
        **os.environ,
        **settings.to_env(),
        "BEAT_GROUP_PREFIX": f"{settings.group_prefix}-{role}",
        "BEAT_MAX_BATCH_EVENTS": str(batch_events),
        "BEAT_STATE_STORE": STATE_STORES.get(role, "memory"),
    }
    command = [
        sys.executable,
        __file__,
        "--child",
        role,
        "--target",
        str(target),
        "--out",
        str(out),
    ]
    broker_cpu = cpu_seconds(broker_pid)
    with open(workdir / f"{role}.log", "w") as log:
        subprocess.run(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, check=True, timeout=1800
        )
    result = json.loads(out.read_text())
    result["broker_cpu_seconds"] = (
        cpu_seconds(broker_pid) - broker_cpu
    )  # start-up and join included
    result["events_per_s"] = result["events"] / result["seconds"]
    result["cpu_us_per_event"] = 1e6 * result["cpu_seconds"] / result["events"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="events our worker processes")
    parser.add_argument(
        "--naive-events", type=int, default=20_000, help="events the naive agent processes"
    )
    parser.add_argument("--users", type=int, default=100_000)
    # A pre-loaded topic lets a worker take huge batches (catch-up mode, which coalesces
    # more); 10,000 is one 100-ms flush interval at the 100,000 events/s target.
    parser.add_argument(
        "--batch-events", type=int, default=10_000, help="BEAT_MAX_BATCH_EVENTS of our worker"
    )
    parser.add_argument(
        "--child", choices=["ours", "rocksdb", "naive", "profile"], help=argparse.SUPPRESS
    )
    parser.add_argument("--target", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args.child, args.target, args.out)
        return

    RESULTS.mkdir(parents=True, exist_ok=True)
    workdir = RESULTS / "stream-run"
    workdir.mkdir(exist_ok=True)
    with EmbeddedBroker() as broker:
        settings = load_settings(
            bootstrap_servers=broker.bootstrap_servers,
            group_prefix=f"bench-{uuid.uuid4().hex[:6]}",
            data_dir=workdir / "data",
            session_timeout_ms=2000,
        )
        ensure_topics(settings)
        history = SyntheticEvents(n_users=args.users).history(
            HISTORY_START, HISTORY_START + timedelta(days=365), 20_000
        )
        started = time.monotonic()
        sent = produce(settings, history, limit=args.events)
        print(
            f"produced {sent} events for {args.users} users in "
            f"{time.monotonic() - started:.1f}s (not measured)"
        )
        pid = broker._process.pid
        results = {
            "ours": run_role(settings, "ours", sent, workdir, pid, args.batch_events),
            "rocksdb": run_role(settings, "rocksdb", sent, workdir, pid, args.batch_events),
            "naive": run_role(
                settings, "naive", min(sent, args.naive_events), workdir, pid, args.batch_events
            ),
        }
        profile = run_role(settings, "profile", sent, workdir, pid, args.batch_events)
    results["speedup"] = results["ours"]["events_per_s"] / results["naive"]["events_per_s"]
    results["profile"] = {
        "tottime": profile["profile_tottime"],
        "cumulative": profile["profile_cumulative"],
    }
    print(f"{'worker':<8}{'events':>10}{'seconds':>9}{'events/s':>11}{'CPU us/event':>14}")
    for role in ("ours", "rocksdb", "naive"):
        r = results[role]
        print(f"{role:<8}{r['events']:>10}{r['seconds']:>9.2f}{r['events_per_s']:>11,.0f}{r['cpu_us_per_event']:>14.1f}")
    print(
        f"ours / naive: {results['speedup']:.1f}x; coalescing (events in / windows out): "
        f"{results['ours']['coalescing']:.2f}; "
        f"broker CPU: {results['ours']['broker_cpu_seconds']:.1f}s during ours"
    )
    print(
        "ours, ms per batch by stage:",
        {k: round(v, 1) for k, v in results["ours"]["stage_ms_per_batch"].items()},
        f"over {results['ours']['batches']} batches\n\n"
        "profile of our worker's batch processing (by own time):",
    )
    print(profile["profile_tottime"])
    (RESULTS / "stream.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {RESULTS / 'stream.json'}")


if __name__ == "__main__":
    main()
