"""Soak: a stream worker and an encoder worker at a fixed event rate, watched over time.

    .venv/bin/python bench/soak.py [--rate 2000] [--duration 120] [--users 20000]
    .venv/bin/python bench/soak.py --rate 10000 --duration 600   # issue 12's soak

Starts an embedded Tansu broker, one stream worker and one encoder worker as processes (an
untrained `small` model, one torch thread, the online store of --store), then sends live
synthetic events at --rate for --duration seconds, paced by the wall clock as `beat
produce` paces them. Every --sample seconds it records each worker's RSS (/proc), each
group's lag (messages read here that the group has not committed: stream.demo.Monitor),
the events sent in the interval, and the freshness of the embeddings written in it (the
Kafka timestamp of the beat.embeddings message minus the window's newest event time, as in
bench/freshness.py). Once the producer stops, it waits for both groups to drain.

The baseline column is the run just after its warm-up (--warmup, a quarter of the run by
default), which is what the soak's criteria compare against: RSS at the first sample after
the warm-up against the last (growth under 5 %); the largest lag and the freshness p99 of
the first half after the warm-up against the second (bounded: not growing). Prints the
samples and the summary and writes bench/results/soak.json. The load average is recorded:
on a shared machine freshness follows the CPU the encoder gets.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from model import BeatConfig, init_model_dir  # noqa: E402
from stream.broker import EmbeddedBroker, ensure_topics  # noqa: E402
from stream.config import Settings, load_settings  # noqa: E402
from stream.demo import Monitor, _spawn, _stop  # noqa: E402
from stream.producer import produce  # noqa: E402
from stream.synthetic import SyntheticEvents  # noqa: E402

RESULTS = REPO / "bench" / "results" / "soak.json"
WORKERS = ("stream", "encode")


@dataclass
class Sample:
    at_s: float  # since the producer started
    events_per_s: float  # sent in the interval
    stream_rss_mb: float
    encoder_rss_mb: float
    stream_lag: int  # beat.events not committed by the stream workers
    encoder_lag: int  # beat.windows not committed by the encoders
    embeddings: int  # written in the interval
    freshness_p50_ms: float
    freshness_p99_ms: float
    load_average: float


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class Watch:
    """Samples the workers and the topics through one Monitor."""

    def __init__(self, settings: Settings, workers: dict[str, subprocess.Popen]) -> None:
        self.settings = settings
        self.workers = workers
        self.monitor = Monitor(settings)
        self.started = time.monotonic()
        self.last = (self.started, 0, 0)  # time, events seen, embeddings seen

    def sample(self) -> Sample:
        observed = self.monitor.poll()
        for name, process in self.workers.items():
            if process.poll() is not None:
                raise SystemExit(f"{name} worker exited with code {process.returncode}")
        now, events = time.monotonic(), observed.messages.get(self.settings.events_topic, 0)
        fresh = np.array(observed.freshness_ms[self.last[2] :])
        p50, p99 = np.percentile(fresh, [50, 99]) if len(fresh) else (np.nan, np.nan)
        sample = Sample(
            at_s=round(now - self.started, 1),
            events_per_s=round((events - self.last[1]) / (now - self.last[0])),
            stream_rss_mb=round(rss_mb(self.workers["stream"].pid), 1),
            encoder_rss_mb=round(rss_mb(self.workers["encode"].pid), 1),
            stream_lag=self.lag(self.settings.stream_group, self.settings.events_topic),
            encoder_lag=self.lag(self.settings.encoder_group, self.settings.windows_topic),
            embeddings=len(fresh),
            freshness_p50_ms=round(float(p50), 1),  # NaN (kept) when none was written
            freshness_p99_ms=round(float(p99), 1),
            load_average=round(os.getloadavg()[0], 1),
        )
        self.last = (now, events, len(observed.freshness_ms))
        return sample

    def lag(self, group: str, topic: str) -> int:
        """The group's lag behind what was read here: 0 while this reader is the one behind."""
        return max(0, self.monitor.lag(group, topic))

    def drained(self) -> bool:
        self.monitor.poll()
        settings = self.settings
        return (
            self.lag(settings.stream_group, settings.events_topic) == 0
            and self.lag(settings.encoder_group, settings.windows_topic) == 0
        )


def soak(args: argparse.Namespace, settings: Settings, workdir: Path) -> tuple[list[Sample], float]:
    """Run the workers and the producer; the samples, and the drain time in seconds."""
    env = {**os.environ, **settings.to_env()}
    ready = {name: workdir / f"{name}.ready" for name in WORKERS}
    workers = {
        name: _spawn([name, "--ready-file", str(ready[name])], env, workdir / f"{name}.log")
        for name in WORKERS
    }
    try:
        deadline = time.monotonic() + 120
        while not all(path.exists() for path in ready.values()):
            if time.monotonic() > deadline or any(p.poll() is not None for p in workers.values()):
                raise SystemExit(f"workers did not start: see the logs in {workdir}")
            time.sleep(0.5)
        watch = Watch(settings, workers)
        events = SyntheticEvents(n_users=args.users).live(args.rate)
        producer = threading.Thread(
            target=produce, args=(settings, events, args.rate, args.duration),
            kwargs={"live": True}, daemon=True,
        )
        producer.start()
        samples = []
        while producer.is_alive():
            time.sleep(args.sample)
            if not producer.is_alive():
                break  # a part interval: its rate would read as a drop
            samples.append(watch.sample())
            print(" ".join(f"{k}={v}" for k, v in asdict(samples[-1]).items()), flush=True)
        produced = time.monotonic()
        while not watch.drained() and time.monotonic() - produced < max(60, args.duration):
            time.sleep(0.5)
        return samples, time.monotonic() - produced
    finally:
        for process in workers.values():
            _stop(process)


def summary(samples: list[Sample], warmup_s: float) -> list[dict]:
    """Each criterion: its baseline (just after the warm-up), its end, and the ratio."""
    steady = [s for s in samples if s.at_s >= warmup_s]
    if len(steady) < 2:
        raise SystemExit(f"{len(steady)} samples after the {warmup_s:g} s warm-up: run longer")
    first, second = steady[: len(steady) // 2], steady[len(steady) // 2 :]

    def freshness_p99(part: list[Sample]) -> float:
        return np.nanmax([s.freshness_p99_ms for s in part])  # the worst interval's

    rows = [
        ("stream worker RSS MB (first, last sample)", steady[0].stream_rss_mb,
         steady[-1].stream_rss_mb),
        ("encoder worker RSS MB (first, last sample)", steady[0].encoder_rss_mb,
         steady[-1].encoder_rss_mb),
        ("stream lag, largest (first, second half)", max(s.stream_lag for s in first),
         max(s.stream_lag for s in second)),
        ("encoder lag, largest (first, second half)", max(s.encoder_lag for s in first),
         max(s.encoder_lag for s in second)),
        ("freshness p99 ms, worst interval (halves)", freshness_p99(first),
         freshness_p99(second)),
        ("events/s sent, mean (halves)", np.mean([s.events_per_s for s in first]),
         np.mean([s.events_per_s for s in second])),
    ]  # fmt: skip
    return [
        {"measure": name, "baseline": float(base), "end": float(end),
         "end_over_baseline": float(end / base) if base else None}
        for name, base, end in rows
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=2_000, help="events/s")
    parser.add_argument("--duration", type=float, default=120, help="seconds of producing")
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--sample", type=float, default=5, help="seconds between samples")
    parser.add_argument("--warmup", type=float, help="seconds; default: a quarter of the run")
    parser.add_argument("--store", choices=["sqlite", "redis"], default="sqlite")
    args = parser.parse_args()
    warmup_s = args.duration / 4 if args.warmup is None else args.warmup

    config = BeatConfig.preset("small")
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory(prefix="beat_soak_") as tmp:
        workdir = Path(tmp)
        catalogue = SyntheticEvents(n_users=1)
        init_model_dir(workdir / "model", "small", catalogue.actions, catalogue.properties)
        settings = load_settings(
            bootstrap_servers=broker.bootstrap_servers,
            data_dir=workdir / "data",
            feast_data_dir=workdir / "feast",
            feast_project=f"soak_{int(time.time())}",
            online_store=args.store,
            model_dir=workdir / "model",
            torch_threads=1,
            max_events=config.max_events,
            window_days=config.window_days,
        )
        ensure_topics(settings)
        samples, drain_s = soak(args, settings, workdir)

    rows = summary(samples, warmup_s)
    print(f"\n{'measure':44} {'baseline':>10} {'end':>10} {'end/base':>9}")
    for row in rows:
        ratio = row["end_over_baseline"]
        print(f"{row['measure']:44} {row['baseline']:>10,.0f} {row['end']:>10,.0f} "
              f"{'-' if ratio is None else f'{ratio:.3f}':>9}")  # fmt: skip
    print(f"drain after the producer stopped: {drain_s:.1f} s; warm-up {warmup_s:g} s")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "args": vars(args), "warmup_s": warmup_s, "drain_s": round(drain_s, 1),
        "summary": rows, "samples": [asdict(s) for s in samples],
    }, indent=2))  # fmt: skip
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
