"""`beat demo`: the whole platform on one machine for about a minute.

Starts the embedded broker and creates the topics. On the first run (no model directory
yet) it produces four weeks of synthetic history to a topic of its own and pretrains the
`small` preset from that topic for about two minutes (DemoModel); the model is cached under
data/, so later runs skip this. Then it runs the producer, a stream worker and an encoder
worker as child processes, and watches the system the way an operator would: by reading the
topics and the consumer groups' committed offsets. At the end it reads every user back
through the Feast SDK and checks that the embeddings mean something: how many of each
user's nearest neighbours (cosine) share its planted persona, next to chance. Every child
is stopped on exit, Ctrl-C included.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient
from rich.console import Console
from rich.live import Live
from rich.table import Table

from stream.broker import EmbeddedBroker, client_config, ensure_topics, records_in
from stream.codec import AvroCodec
from stream.config import Settings

console = Console()


@dataclass
class Observed:
    """What the demo has seen of the system so far."""

    messages: dict[str, int] = field(default_factory=dict)  # per topic
    event_ms: list[int] = field(
        default_factory=lambda: [2**63, 0]
    )  # first and last event's Kafka timestamp
    freshness_ms: list[float] = field(default_factory=list)
    users: dict[str, int] = field(default_factory=dict)  # user_id -> event_count last seen
    encoded_events: list[int] = field(default_factory=list)  # event_count of each embedding
    written_ms: list[int] = field(default_factory=list)  # when each embedding was written

    def rate_per_s(self, topic: str) -> float:
        """Rate at which the producer wrote, from the events' own Kafka timestamps."""
        span_s = (self.event_ms[1] - self.event_ms[0]) / 1000
        return self.messages.get(topic, 0) / span_s if span_s > 0 else 0.0

    def freshness(self) -> tuple[float, float]:
        if not self.freshness_ms:
            return (float("nan"), float("nan"))
        p50, p99 = np.percentile(self.freshness_ms, [50, 99])
        return float(p50), float(p99)

    def warm_freshness_p99(self, warm_up_ms: int = 5_000) -> float:
        """p99 of the embeddings written warm_up_ms or more after the first event: what is
        left of a cold start shows as the difference (it was up to 1.7 s for the first
        second's events, the producer's id and the decoder's first import; now none)."""
        written = np.array(self.written_ms, np.int64)
        warm = np.array(self.freshness_ms)[written >= self.event_ms[0] + warm_up_ms]
        return float(np.percentile(warm, 99)) if len(warm) else float("nan")


class Monitor:
    """Watches the system as an operator would: reads every topic from the start (counting
    messages, decoding embeddings for freshness) and compares the groups' committed
    offsets with what it has read. It counts messages rather than trusting high
    watermarks, which Tansu reports short (stream/broker.py)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = [
            settings.events_topic,
            settings.windows_topic,
            settings.embeddings_topic,
            settings.dead_letter_topic,
        ]
        # Not on the events' path: a longer fetch wait spares the broker and the CPU.
        self.consumer = Consumer(
            client_config(settings, **{"group.id": "beat-demo-monitor", "fetch.wait.max.ms": 200})
        )
        self.admin = AdminClient(client_config(settings))
        # Everything but the 768 floats, which the reader skips.
        self.codec = AvroCodec(
            "user_embedding",
            settings.embeddings_topic,
            settings.schema_registry,
            fields=("user_id", "event_count", "last_event_time", "updated_at"),
        )
        self.observed = Observed()
        self.next_offset: dict[tuple[str, int], int] = {}
        metadata = self.consumer.list_topics(timeout=10).topics
        self.consumer.assign(
            [TopicPartition(t, p, 0) for t in self.topics for p in metadata[t].partitions]
        )

    def poll(self) -> Observed:
        while messages := self.consumer.consume(10_000, 0.05):
            for message in records_in(messages):
                topic = message.topic()
                self.next_offset[(topic, message.partition())] = message.offset() + 1
                if message.value() is None:  # a seal of beat.windows: an offset, not a window
                    continue
                self.observed.messages[topic] = self.observed.messages.get(topic, 0) + 1
                if topic == self.settings.events_topic:
                    timestamp = message.timestamp()[1]
                    self.observed.event_ms = [
                        min(self.observed.event_ms[0], timestamp),
                        max(self.observed.event_ms[1], timestamp),
                    ]
                elif topic == self.settings.embeddings_topic:
                    record = self.codec.decode(message.value())
                    # The embedding is produced after its row is in the online store, so its
                    # Kafka timestamp is when the row was readable there (or a little later).
                    written_ms = message.timestamp()[1]
                    newest_ms = record["last_event_time"].timestamp() * 1000
                    self.observed.freshness_ms.append(written_ms - newest_ms)
                    self.observed.users[record["user_id"]] = record["event_count"]
                    self.observed.encoded_events.append(record["event_count"])
                    self.observed.written_ms.append(written_ms)
        return self.observed

    def lag(self, group: str, topic: str) -> int:
        """Messages of topic read here that group has not committed yet."""
        partitions = [TopicPartition(topic, p) for (t, p) in self.next_offset if t == topic]
        if not partitions:
            return 0
        committed = self.admin.list_consumer_group_offsets(
            [ConsumerGroupTopicPartitions(group, partitions)]
        )
        return sum(
            self.next_offset[(topic, tp.partition)] - max(tp.offset, 0)
            for tp in committed[group].result(10).topic_partitions
        )

    def close(self) -> None:
        self.consumer.close()


def _progress_table(observed: Observed, settings: Settings, phase: str, elapsed_s: float) -> Table:
    m = observed.messages
    events = m.get(settings.events_topic, 0)
    p50, p99 = observed.freshness()
    table = Table(title=f"beat demo: {phase} ({elapsed_s:.0f}s)", show_header=False, min_width=44)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("events in", f"{events:,}")
    table.add_row("events/s", f"{observed.rate_per_s(settings.events_topic):,.0f}")
    table.add_row("windows emitted", f"{m.get(settings.windows_topic, 0):,}")
    table.add_row("users encoded", f"{m.get(settings.embeddings_topic, 0):,}")
    table.add_row("distinct users in Feast", f"{len(observed.users):,}")
    table.add_row("dead letters", f"{m.get(settings.dead_letter_topic, 0):,}")
    table.add_row(
        "freshness p50 / p99", f"{p50:,.0f} / {p99:,.0f} ms" if observed.freshness_ms else "-"
    )
    return table


def _spawn(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    log = open(log_path, "w")
    # Own sessions: a Ctrl-C reaches only the demo, which then stops the children in order.
    # -P: the working directory stays off sys.path, so a folder there named model/ or
    # stream/ (`beat model init model`) does not shadow the installed packages.
    return subprocess.Popen(
        [sys.executable, "-P", "-m", "stream.cli", *args],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _stop(process: subprocess.Popen, timeout_s: float = 20.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _raise_interrupt(*_: object) -> None:
    raise KeyboardInterrupt


@dataclass
class DemoModel:
    """The model the demo serves: model_dir when it exists, else pretrained there first."""

    model_dir: Path
    preset: str = "small"
    users: int = 3_000  # the live producer's population (cli.DEMO_USERS)
    seed: int = 0
    history_days: float = 28.0
    steps: int = 150  # about two minutes of training on two CPU cores
    batch_size: int = 32
    neighbours: int = 10  # of the persona-agreement check

    def ensure(self, settings: Settings) -> None:
        """Pretrain into model_dir unless it holds a model: synthetic history (the live
        producer's population) to the `<events topic>.history` topic, replayed and trained on
        like `beat pretrain`, without the evaluation."""
        from model import BeatConfig, PretrainConfig
        from model.model_dir import CONFIG_FILE
        from model.train import TrainConfig, train
        from stream.producer import produce
        from stream.replay import ReplayConfig, replay
        from stream.synthetic import SyntheticEvents

        if (self.model_dir / CONFIG_FILE).exists():
            return
        history = settings.model_copy(update={"events_topic": f"{settings.events_topic}.history"})
        ensure_topics(history)
        end = datetime.now(UTC)
        population = SyntheticEvents(n_users=self.users, seed=self.seed)  # as `beat produce`
        console.print(
            f"first run: {self.history_days:g} days of synthetic history to "
            f"{history.events_topic}, then pretraining the {self.preset} preset"
        )
        produce(history, population.history(end - timedelta(days=self.history_days), end))
        sequences, _ = replay(history, ReplayConfig())
        run = self.model_dir.parent / f"{self.model_dir.name}-training"
        result = train(
            sequences,
            run,
            BeatConfig.preset(self.preset),
            PretrainConfig(),
            TrainConfig(
                steps=self.steps,
                batch_size=self.batch_size,
                warmup_steps=self.steps // 10,
                checkpoint_every=self.steps,
            ),
            resume=False,
        )
        shutil.rmtree(self.model_dir, ignore_errors=True)
        shutil.copytree(result.model_dir, self.model_dir)
        console.print(
            f"pretrained {result.model_version} in {result.wall_seconds:.0f} s; "
            f"cached in {self.model_dir}"
        )

    def config(self):  # noqa: ANN201 (model.BeatConfig)
        from model.model_dir import load_model_dir

        return load_model_dir(self.model_dir).config

    def persona_agreement(self, user_ids: list[str], embeddings: np.ndarray) -> dict:
        """Share of each user's nearest neighbours (cosine, among the users read back) with
        the user's planted persona, against chance (the same share for random neighbours)."""
        from stream.synthetic import SyntheticEvents

        planted = SyntheticEvents(n_users=self.users, seed=self.seed).personas()
        persona_of = dict(zip(planted["user_id"].to_pylist(), planted["persona"].to_pylist()))
        personas = np.array([persona_of[user] for user in user_ids])
        unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
        similarity = unit @ unit.T  # [U, U]
        np.fill_diagonal(similarity, -np.inf)  # a user is not its own neighbour
        k = min(self.neighbours, len(user_ids) - 1)
        nearest = np.argpartition(-similarity, k, axis=1)[:, :k]  # [U, k]
        _, counts = np.unique(personas, return_counts=True)
        shares = counts / len(personas)
        return {
            "users": len(user_ids),
            "neighbours": k,
            "agreement": round(float((personas[nearest] == personas[:, None]).mean()), 3),
            "chance": round(float((shares * (counts - 1) / max(len(personas) - 1, 1)).sum()), 3),
        }


def run_demo(
    settings: Settings, duration_s: float, rate_per_s: float, users: int, model: DemoModel
) -> dict:
    """Run the demo; returns the summary it prints (also written to data/demo/summary.json)."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    workdir = settings.data_dir / "demo"
    workdir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        try:
            return _run(stack, settings, duration_s, rate_per_s, users, model, workdir)
        except KeyboardInterrupt:
            console.print("[yellow]interrupted: stopping workers and broker[/yellow]")
            return {"interrupted": True}


def _run(
    stack: ExitStack,
    settings: Settings,
    duration_s: float,
    rate_per_s: float,
    users: int,
    model: DemoModel,
    workdir: Path,
) -> dict:
    if not settings.bootstrap_servers:
        broker = stack.enter_context(EmbeddedBroker())
        settings = settings.model_copy(update={"bootstrap_servers": broker.bootstrap_servers})
        console.print(f"embedded Tansu broker on {broker.bootstrap_servers}")
    ensure_topics(settings)
    model.ensure(settings)
    # The demo's workers keep the windows its model reads, whatever the preset; five processes
    # share this machine's cores: one torch thread unless told otherwise.
    config = model.config()
    worker_settings = settings.model_copy(
        update={
            "model_dir": model.model_dir,
            "torch_threads": settings.torch_threads or 1,
            "max_events": config.max_events,
            "window_days": config.window_days,
        }
    )
    env = {**os.environ, **worker_settings.to_env()}
    # Two workers on one host cannot share a metrics port: the encoder takes the next one.
    port = settings.metrics_port
    encoder_env = {**env, "BEAT_METRICS_PORT": str(port + 1)} if port else env

    ready = {name: workdir / f"{name}.ready" for name in ("stream", "encode")}
    for path in ready.values():
        path.unlink(missing_ok=True)
    workers = {
        "stream worker": _spawn(
            ["stream", "--ready-file", str(ready["stream"])], env, workdir / "stream-worker.log"
        ),
        "encoder worker": _spawn(
            ["encode", "--ready-file", str(ready["encode"])], encoder_env,
            workdir / "encoder-worker.log",
        ),
    }
    for process in workers.values():
        stack.callback(_stop, process)
    monitor = Monitor(settings)
    stack.callback(monitor.close)

    dashboard = Dashboard(monitor, settings, workers)
    with Live(console=console, refresh_per_second=2) as dashboard.live:
        dashboard.wait(
            "starting workers", lambda: all(p.exists() for p in ready.values()), timeout_s=120
        )
        producer = _spawn(
            [
                "produce",
                "--synthetic",
                "--users",
                str(users),
                "--seed",
                str(model.seed),
                "--rate",
                str(rate_per_s),
                "--duration",
                str(duration_s),
            ],
            env,
            workdir / "producer.log",
        )
        stack.callback(_stop, producer)
        dashboard.wait("producing", lambda: producer.poll() is not None, timeout_s=duration_s + 60)
        if producer.returncode:
            raise SystemExit(
                f"producer exited with code {producer.returncode}; see {workdir / 'producer.log'}"
            )
        produced = time.monotonic()
        dashboard.wait(
            "draining",
            lambda: (
                monitor.lag(settings.stream_group, settings.events_topic) == 0
                and monitor.lag(settings.encoder_group, settings.windows_topic) == 0
            ),
            timeout_s=max(60, duration_s),
        )
        drain_s = time.monotonic() - produced
        observed = monitor.poll()
    for process in workers.values():
        _stop(process)

    summary = _summary(observed, settings)
    summary["drain_s"] = round(drain_s, 1)
    user_ids = sorted(observed.users)
    read_back, embeddings = _read_back(settings, user_ids)
    summary["read_back"] = read_back[:3]
    summary["persona_agreement"] = model.persona_agreement(user_ids, embeddings)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print_json(data=summary)
    agreement = summary["persona_agreement"]
    console.print(
        f"embeddings that mean something: {agreement['agreement']:.1%} of each user's "
        f"{agreement['neighbours']} nearest neighbours (cosine, read back through Feast) "
        f"share its planted persona; chance is {agreement['chance']:.1%}"
    )
    console.print(f"logs and summary in {workdir}")
    return summary


@dataclass
class Dashboard:
    """The live progress table, refreshed while waiting for each phase of the demo."""

    monitor: Monitor
    settings: Settings
    workers: dict[str, subprocess.Popen]
    live: Live | None = None
    start: float = field(default_factory=time.monotonic)

    def wait(self, phase: str, done: Callable[[], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            for name, process in self.workers.items():
                if process.poll() is not None:
                    logs = self.settings.data_dir / "demo"
                    raise SystemExit(f"{name} exited with code {process.returncode}; see {logs}")
            if time.monotonic() > deadline:
                raise SystemExit(f"demo: '{phase}' did not finish within {timeout_s:.0f}s")
            self.refresh(phase)
            time.sleep(0.5)
        self.refresh(phase)

    def refresh(self, phase: str) -> None:
        self.live.update(
            _progress_table(
                self.monitor.poll(), self.settings, phase, time.monotonic() - self.start
            )
        )


def _summary(observed: Observed, settings: Settings) -> dict:
    p50, p99 = observed.freshness()
    o = observed.messages
    return {
        "events": o[settings.events_topic],
        "events_per_s": round(observed.rate_per_s(settings.events_topic), 1),
        "windows_emitted": o[settings.windows_topic],
        "users_encoded": o[settings.embeddings_topic],
        "distinct_users": len(observed.users),
        "dead_letters": o.get(settings.dead_letter_topic, 0),
        "coalescing_ratio": round(o[settings.events_topic] / max(1, o[settings.windows_topic]), 2),
        "freshness_p50_ms": round(p50, 1),
        "freshness_p99_ms": round(p99, 1),
        "freshness_p99_after_5s_ms": round(observed.warm_freshness_p99(), 1),
        # Events per window encoded, every 5th percentile: what an encode costs depends on
        # it, and the active users, with the longest windows, are encoded most often.
        "encoded_events_percentiles": np.percentile(
            observed.encoded_events or [0], np.arange(0, 101, 5)
        ).round().astype(int).tolist(),
    }


def _read_back(settings: Settings, user_ids: list[str]) -> tuple[list[dict], np.ndarray]:
    """Read users through the Feast SDK, as another team would: a summary row per user, and
    the embeddings [users, E] (zeros where a user has none yet)."""
    from stream.feast_sink import FeatureSink

    values = FeatureSink(settings).read(user_ids)
    size = next((len(e) for e in values["embedding"] if e is not None), 1)
    embeddings = np.array([np.zeros(size) if e is None else e for e in values["embedding"]])
    rows = []
    for i, user_id in enumerate(user_ids):
        embedding = values["embedding"][i]
        rows.append(
            {
                "user_id": user_id,
                "model_version": values["model_version"][i],
                "event_count": values["event_count"][i],
                "embedding_norm": None
                if embedding is None
                else round(float(np.linalg.norm(embedding)), 4),
            }
        )
    return rows, embeddings
