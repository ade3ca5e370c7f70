"""The `beat` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from stream.broker import BrokerError, check_reachable
from stream.config import ConfigError, Settings, load_settings
from stream.local_broker import MEMORY_ONLY, with_recorded_broker

if TYPE_CHECKING:
    import pyarrow as pa

# Some synthetic users are churners who stay silent, and light users may not act within a
# minute: 3,000 users give over 2,000 active ones.
DEMO_USERS = 3_000
DEMO_MODEL_DIR = Path("data/demo-model")
LOGLEVELS = {"crit": logging.CRITICAL, "error": logging.ERROR, "warn": logging.WARNING,
             "info": logging.INFO, "debug": logging.DEBUG}  # fmt: skip
LOG_FIELDS = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_handler(log_format: str) -> logging.Handler:
    """A stderr handler writing plain lines, or one JSON object per line (`--log-format json`:
    timestamp, levelname, name, message, and exc_info when there is one) for log collectors."""
    handler = logging.StreamHandler()
    if log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        # an ISO-8601 UTC "timestamp" instead of asctime, which has no time zone
        handler.setFormatter(JsonFormatter("%(levelname)s %(name)s %(message)s", timestamp=True))
    else:
        handler.setFormatter(logging.Formatter(LOG_FIELDS))
    return handler


def _synthetic(users: int, seed: int, **population: object):  # noqa: ANN202
    from stream.synthetic import SyntheticEvents

    return SyntheticEvents(n_users=users, seed=seed, **population)


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from stream.demo import DemoModel, run_demo

    model = DemoModel(args.model_dir or settings.data_dir / "demo-model", args.preset,
                      args.users, args.seed)
    summary = run_demo(settings, args.duration, args.rate, args.users, model)
    return 0 if summary.get("interrupted") or summary.get("users_encoded") else 1


def cmd_produce(args: argparse.Namespace, settings: Settings) -> int:
    from stream.producer import produce

    if args.synthetic and not args.history_days and not args.rate:
        print("beat produce --synthetic makes live events at a pace: add --rate EVENTS_PER_S "
              "(e.g. --rate 1000), or --history-days N for history as fast as possible",
              file=sys.stderr)  # fmt: skip
        return 2
    check_reachable(settings)
    try:
        batches = _event_batches(args)
        live = args.synthetic and not args.history_days  # batches stamped with the clock
        sent = produce(settings, batches, args.rate, args.duration, args.limit, live=live)
    except (ValueError, FileNotFoundError) as err:  # a file that does not fit: said, no traceback
        print(err, file=sys.stderr)
        return 2
    print(f"produced {sent} events to {settings.events_topic}")
    return 0


def _event_batches(args: argparse.Namespace) -> Iterator[pa.RecordBatch]:
    """The events `beat produce` sends: from a file or data set, or synthetic."""
    if args.file or args.dataset:
        from stream.event_files import dataset_path, read_event_file

        if any("=" not in pair for pair in args.column):
            raise ValueError(f"--column takes FIELD=COLUMN, e.g. --column user_id=customer, "
                             f"not {args.column}")  # fmt: skip
        mapping = dict(pair.split("=", 1) for pair in args.column)
        return read_event_file(args.file or dataset_path(args.dataset), mapping or None)
    if args.history_days:
        from datetime import UTC, datetime, timedelta

        # The population's churn clock starts with the history, so churners fade inside it.
        start = datetime.now(UTC) - timedelta(days=args.history_days)
        population = _synthetic(
            args.users, args.seed, origin=start, churn_horizon_days=args.history_days
        )
        return population.history(start, start + timedelta(days=args.history_days))
    return _synthetic(args.users, args.seed).live(args.rate)


def cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    from model.sequences import write_sequences
    from stream.replay import ReplayConfig, replay

    check_reachable(settings)
    table, summary = replay(settings, ReplayConfig(start_ms=args.start, end_ms=args.end))
    write_sequences(table, args.out)
    print(summary)
    print(f"wrote {table.num_rows:,} users' sequences to {args.out}")
    return 0


def cmd_pretrain(args: argparse.Namespace, settings: Settings) -> int:
    import dataclasses

    from model.config import BeatConfig
    from model.evaluation import EvalConfig
    from model.pretraining import PretrainConfig
    from model.train import TrainConfig, given
    from stream.pretrain import PretrainJob, run_pretrain

    if not args.sequences and not settings.bootstrap_servers:
        print("KAFKA_BOOTSTRAP_SERVERS is not set and no `beat broker` runs: point it at the "
              "cluster holding beat.events, or pass --sequences FILE.parquet (from `beat export`)",
              file=sys.stderr)
        return 2
    try:
        beat = dataclasses.replace(BeatConfig.preset(args.preset), **given(args, BeatConfig))
        if args.no_temporal:
            beat = dataclasses.replace(
                beat, use_age_encoding=False, use_gap_encoding=False, use_periodic_encoding=False
            )
        objectives = PretrainConfig(**given(args, PretrainConfig))
        if args.no_contrastive:
            objectives = dataclasses.replace(objectives, contrastive_weight=0.0)
        job = PretrainJob(
            args.out,
            beat,
            objectives,
            TrainConfig(**given(args, TrainConfig)),
            EvalConfig(churn_days=args.churn_days, seed=args.eval_seed),
            sequences_file=args.sequences,
            start_ms=args.start,
            end_ms=args.end,
            cutoff_ms=args.cutoff,
            resume=not args.no_resume,
        )
        run_pretrain(settings, job)
    except ValueError as err:  # a bad option or data that cannot be split: said plainly
        print(err, file=sys.stderr)
        return 2
    return 0


def _iso_ms(text: str) -> int:
    """Epoch ms of an ISO time (no zone: UTC), for --start / --end."""
    from datetime import UTC, datetime

    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO time such as 2026-01-31 or 2026-01-31T12:00:00+01:00"
        ) from None
    return int((moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp() * 1000)


def cmd_stream(args: argparse.Namespace, settings: Settings) -> int:
    from stream.stream_worker import run_worker

    check_reachable(settings)
    run_worker(settings, ready_file=args.ready_file)
    return 0


def cmd_encode(args: argparse.Namespace, settings: Settings) -> int:
    from stream.encoder_worker import run_worker

    # run_worker checks the broker once the model is loaded (a bad model is said first)
    run_worker(settings, ready_file=args.ready_file)
    return 0


def cmd_refresh(args: argparse.Namespace, settings: Settings) -> int:
    from stream.encoder_worker import load_worker
    from stream.refresh import refresh_idle

    worker = load_worker(settings)  # a bad model is said before the broker is tried
    check_reachable(settings)
    try:
        summary = refresh_idle(settings, worker, int(args.idle_hours * 3_600_000))
    finally:
        worker.close()
    print(
        f"re-encoded {summary.refreshed:,} of {summary.users:,} users "
        f"(idle over {args.idle_hours:g} h) "
        f"as of now in {summary.seconds:.1f}s"
    )
    return 0


def cmd_broker(args: argparse.Namespace, settings: Settings) -> int:
    from stream import local_broker

    if args.action == "run":
        local_broker.run_foreground(settings, args.port)
        return 0
    if args.action == "start":
        record, started = local_broker.start(settings, args.port)
        print(f"broker {'started' if started else 'already running'} at "
              f"{record.bootstrap_servers} (pid {record.pid}); {MEMORY_ONLY}")
        return 0
    if args.action == "stop":
        record, running = local_broker.stop(settings)
        if record is None:
            print("no broker recorded: nothing to stop")
        else:
            print(f"{'stopped' if running else 'forgot'} the broker at {record.bootstrap_servers}"
                  + ("" if running else " (it was not running)"))
        return 0
    return _broker_status(settings)


def _broker_status(settings: Settings) -> int:
    """0 when the recorded broker runs, 1 when there is none or it is gone."""
    from stream import local_broker

    record = local_broker.read_record(settings)
    if record is None:
        print(f"no broker recorded in {local_broker.record_path(settings)}: "
              "`beat broker start` starts one")
        return 1
    if not local_broker.is_running(record):
        print(local_broker.stale_message(settings, record))
        return 1
    print(f"broker running at {record.bootstrap_servers} (pid {record.pid}); memory-only")
    return 0


def cmd_topics(args: argparse.Namespace, settings: Settings) -> int:
    from stream.broker import ensure_topics

    check_reachable(settings)
    ensure_topics(settings)
    print(f"topics ready on {settings.bootstrap_servers}")
    return 0


def cmd_feast_config(args: argparse.Namespace, settings: Settings) -> int:
    import yaml

    from stream.feast_sink import feature_store_yaml

    print(yaml.safe_dump(feature_store_yaml(settings), sort_keys=False), end="")
    return 0


def cmd_similar(args: argparse.Namespace, settings: Settings) -> int:
    from feast import FeatureStore

    from stream.feast_sink import repo_config
    from stream.lookalike import current_view, similar_users

    if settings.online_store == "redis":
        print("BEAT_ONLINE_STORE=redis has no vector search (Feast's Redis online store does "
              "not implement it): lookalike search needs BEAT_ONLINE_STORE=postgres (pgvector) "
              "or sqlite; README \"Lookalike search\"", file=sys.stderr)
        return 2
    store = FeatureStore(config=repo_config(settings))
    try:
        found = similar_users(store, args.user_id, args.k)
    except LookupError as err:
        print(err, file=sys.stderr)
        return 1
    print(f"users like {args.user_id} in {current_view(store)}, by cosine similarity:")
    print(f"{'rank':>4}  {'user_id':<24} {'cosine':>7}  model_version")
    for rank, user in enumerate(found, 1):
        print(f"{rank:>4}  {user.user_id:<24} {user.similarity:>7.4f}  {user.model_version}")
    return 0


def cmd_model_init(args: argparse.Namespace, settings: Settings) -> int:
    from model import BeatConfig, Vocabulary, init_model_dir

    if args.synthetic:
        catalog = _synthetic(DEMO_USERS, args.seed)
        actions, properties = catalog.actions, catalog.properties
    else:  # the vocabularies of the user's own events, most frequent first
        if not args.sequences and not settings.bootstrap_servers:
            print("no events to build vocabularies from: pass --sequences FILE.parquet (from "
                  "`beat export`), set KAFKA_BOOTSTRAP_SERVERS (or run `beat broker`) to read "
                  "beat.events, or pass "
                  "--synthetic for the synthetic catalogue", file=sys.stderr)
            return 2
        sequences = _sequences(args, settings)
        config = BeatConfig.preset(args.preset)
        actions = Vocabulary.from_column(sequences["action"], config.action_vocab_size)
        properties = Vocabulary.from_column(sequences["property"], config.property_vocab_size)
        print(f"vocabularies from {sequences.num_rows:,} users: {len(actions.tokens)} actions, "
              f"{len(properties.tokens)} properties")
    print(init_model_dir(args.dir, args.preset, actions, properties, seed=args.seed))
    return 0


def _sequences(args: argparse.Namespace, settings: Settings):  # noqa: ANN202 (pa.Table)
    """The users' sequences of --sequences FILE, or replayed from the events topic."""
    if args.sequences:
        from model.sequences import read_sequences

        return read_sequences(args.sequences)
    from stream.replay import ReplayConfig, replay

    return replay(settings, ReplayConfig())[0]


def cmd_model_publish(args: argparse.Namespace, settings: Settings) -> int:
    from stream.model_versions import CURRENT_SERVICE, view_name
    from stream.publish import publish

    check_reachable(settings)
    try:
        done = publish(settings, args.dir, shadow=args.shadow)
    except ValueError as err:  # a version that cannot name a folder, or shares a slug
        print(err, file=sys.stderr)
        return 2
    if done.backfill is None:
        print(f"{done.version} is the current version already; nothing to do")
        return 0
    b = done.backfill
    print(f"published {done.version}: feature view {view_name(done.version)}, backfilled "
          f"{b.refreshed:,} of {b.users:,} users in {b.seconds:.1f} s ({b.users_per_s:,.0f}/s)")
    print(f"{CURRENT_SERVICE} now serves it" if done.current else
          f"shadow: run `beat encode --model-version {done.version}` beside the current "
          f"encoders, then `beat model switch {done.version}`")
    return 0


def cmd_model_switch(args: argparse.Namespace, settings: Settings) -> int:
    from stream.model_versions import CURRENT_SERVICE, view_name
    from stream.publish import switch

    try:
        version = switch(settings, args.version)
    except ValueError as err:  # not published: said with the published ones
        print(err, file=sys.stderr)
        return 2
    print(f"{version} is current: {CURRENT_SERVICE} serves {view_name(version)}")
    return 0


def cmd_model_list(args: argparse.Namespace, settings: Settings) -> int:
    from stream.model_versions import ModelVersions, view_name

    versions = ModelVersions(settings)
    current = versions.current()
    for version in versions.published():
        print(f"{'*' if version == current else ' '} {version:32} {view_name(version)}")
    return 0


def cmd_model_info(args: argparse.Namespace, settings: Settings) -> int:
    import torch

    from model import Beat, BeatConfig

    try:
        if args.dir:
            model = Beat.from_pretrained(args.dir)
        else:
            with torch.device("meta"):  # shapes only: no memory, no random init
                model = Beat(BeatConfig.preset(args.preset))
    except ValueError as err:  # a broken model directory or an unknown preset, said plainly
        print(err, file=sys.stderr)
        return 2
    for key, value in model.config.to_dict().items():
        print(f"{key:24} {value}")
    print(f"{'parameters':24} {model.num_parameters():,}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from model.config import PRESETS, BeatConfig  # these three import no torch
    from model.pretrain_config import PretrainConfig
    from model.train_config import TrainConfig, add_options

    parser = argparse.ArgumentParser(
        prog="beat", description="beatstream: fresh BEAT user embeddings in Feast"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo", help="the whole platform on the embedded stack for about a minute"
    )
    demo.add_argument(
        "--duration", type=float, default=60.0, help="seconds of producing (default 60)"
    )
    demo.add_argument(
        "--rate", type=float, default=1_000.0, help="events per second (default 1000)"
    )
    demo.add_argument("--users", type=int, default=DEMO_USERS)
    demo.add_argument("--preset", default="small",
                      help="preset the demo pretrains when its model directory does not exist yet")
    demo.add_argument("--model-dir", type=Path)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=cmd_demo)

    produce = sub.add_parser("produce", help="write events to beat.events")
    source = produce.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--synthetic", action="store_true", help="generated users with planted personas"
    )
    source.add_argument(
        "--file", type=Path, help="CSV, Parquet, JSONL or whitespace-separated .txt events"
    )
    source.add_argument(
        "--dataset",
        choices=["cdnow"],
        help="a public event log shipped in an installed package "
        "(cdnow: CDNOW purchases, from lifetimes)",
    )
    produce.add_argument("--column", action="append", default=[], metavar="FIELD=COLUMN",
                         help="map a schema field to a file column, e.g. --column user_id=customer")
    produce.add_argument("--users", type=int, default=DEMO_USERS)
    produce.add_argument(
        "--rate", type=float, help="events per second (default: as fast as possible)"
    )
    produce.add_argument("--duration", type=float, help="stop after this many seconds")
    produce.add_argument("--limit", type=int, help="stop after this many events")
    produce.add_argument("--seed", type=int, default=0)
    produce.add_argument(
        "--history-days",
        type=float,
        help="with --synthetic: the last N days of history, "
        "as fast as possible, instead of live events",
    )
    produce.set_defaults(run=cmd_produce)

    export = sub.add_parser(
        "export", help="replay beat.events into users' sequences (Parquet, model/sequences.py)"
    )
    export.add_argument("--out", type=Path, required=True, help="the Parquet file to write")
    export.add_argument(
        "--start", type=_iso_ms, help="ISO time (log time); default: the oldest retained message"
    )
    export.add_argument(
        "--end", type=_iso_ms, help="ISO time, exclusive; default: the end of the log now"
    )
    export.set_defaults(run=cmd_export)

    pretrain = sub.add_parser(
        "pretrain",
        help="pretrain BEAT on topic history (or a `beat export` file) and write the evaluation "
        "report",
        description="Replays beat.events (or reads --sequences), trains on the events before "
        "--cutoff, evaluates on each user's events after it, and writes OUT/model, checkpoints, "
        "train_log.jsonl, report.json and PNG plots. Rerunning the same command resumes from the "
        "newest checkpoint.",
    )
    pretrain.add_argument("--out", type=Path, required=True, help="output directory")
    pretrain.add_argument(
        "--sequences", type=Path, help="a Parquet file from `beat export` instead of the topic"
    )
    pretrain.add_argument(
        "--start", type=_iso_ms, help="replay from this ISO time (log time); default: all history"
    )
    pretrain.add_argument(
        "--end", type=_iso_ms, help="replay up to this ISO time, exclusive; default: now"
    )
    pretrain.add_argument(
        "--cutoff",
        type=_iso_ms,
        help="train/evaluation split in event time; default: the newest event minus --churn-days",
    )
    pretrain.add_argument(
        "--churn-days",
        type=float,
        default=30.0,
        help="churned = inactive this long after the cutoff",
    )
    pretrain.add_argument("--preset", default="small", choices=sorted(PRESETS))
    pretrain.add_argument(
        "--no-contrastive", action="store_true", help="ablation: contrastive loss weight 0"
    )
    pretrain.add_argument(
        "--no-temporal", action="store_true", help="ablation: no age, gap or periodic time signals"
    )
    pretrain.add_argument(
        "--no-resume", action="store_true", help="start over, deleting OUT's checkpoints"
    )
    pretrain.add_argument("--eval-seed", type=int, default=0)
    add_options(pretrain, TrainConfig, "training (TrainConfig)")
    add_options(pretrain, PretrainConfig, "objectives (PretrainConfig)")
    add_options(pretrain, BeatConfig, "architecture (BeatConfig, over the preset)", skip=("name",))
    pretrain.set_defaults(run=cmd_pretrain)

    stream = sub.add_parser("stream", help="run a stream worker (rolling windows)")
    stream.add_argument("--ready-file", type=Path, help="created once the worker holds partitions")
    stream.set_defaults(run=cmd_stream)

    encode = sub.add_parser("encode", help="run an encoder worker (BEAT embeddings to Feast)")
    encode.add_argument("--model-dir", type=Path, help="overrides BEAT_MODEL_DIR")
    encode.add_argument("--model-version",
                        help="a published version to serve (a shadow); default: the current one")
    encode.add_argument("--ready-file", type=Path, help="created once the worker holds partitions")
    encode.set_defaults(run=cmd_encode)

    refresh = sub.add_parser(
        "refresh", help="re-encode users idle for a while, as of now (run it on a schedule)"
    )
    refresh.add_argument(
        "--idle-hours", type=float, default=24.0, help="re-encode users whose newest event is older"
    )
    refresh.add_argument("--model-dir", type=Path, help="overrides BEAT_MODEL_DIR")
    refresh.add_argument("--model-version",
                         help="a published version to refresh; default: the current one")
    refresh.set_defaults(run=cmd_refresh)

    broker = sub.add_parser(
        "broker",
        help="the embedded broker (Tansu) for the other commands; memory-only storage",
        description="Starts the embedded Kafka-protocol broker (Tansu) on a loopback port and "
        "records its address in BEAT_DATA_DIR/broker.json: the other beat commands use it when "
        f"KAFKA_BOOTSTRAP_SERVERS is not set. Its {MEMORY_ONLY}.",
    )
    broker.add_argument(
        "action", nargs="?", default="run", choices=["run", "start", "stop", "status"],
        help="run: in the foreground until Ctrl-C (default); start: in the background; "
        "stop: stop the background one; status: whether the recorded one runs (exit 1 if not)",
    )
    broker.add_argument("--port", type=int, help="loopback port (default: a free one)")
    broker.set_defaults(run=cmd_broker)

    topics = sub.add_parser("topics", help="create beatstream's topics")
    topics.set_defaults(run=cmd_topics)

    feast_config = sub.add_parser(
        "feast-config", help="print this deployment's feature_store.yaml, for `feast -f`"
    )
    feast_config.set_defaults(run=cmd_feast_config)

    similar = sub.add_parser(
        "similar", help="the users most like USER_ID: cosine similarity of the current model "
        "version's embeddings in the Feast online store (lookalike search)")
    similar.add_argument("user_id")
    similar.add_argument("-k", type=int, default=10, help="how many users (default: 10)")
    similar.set_defaults(run=cmd_similar)

    model = sub.add_parser("model", help="BEAT model directories")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    init = model_sub.add_parser(
        "init", help="write a randomly initialised model directory, its vocabularies built from "
        "your events (beat.events, or --sequences)")
    init.add_argument("dir", type=Path)
    init.add_argument("--sequences", type=Path, help="a Parquet file from `beat export` instead "
                      "of replaying the topic")
    init.add_argument("--synthetic", action="store_true",
                      help="vocabularies of the synthetic catalogue instead of real events")
    init.add_argument("--preset", default="small")
    init.add_argument("--seed", type=int, default=0)
    init.set_defaults(run=cmd_model_init)
    publish = model_sub.add_parser(
        "publish", help="make a model directory the current version: copy it to "
        "BEAT_DATA_DIR/models/, register its feature view, backfill it from beat.windows, "
        "then switch the encoders and the feature service user_embedding_current to it")
    publish.add_argument("dir", type=Path)
    publish.add_argument("--shadow", action="store_true",
                         help="publish and backfill, but leave the current version serving")
    publish.set_defaults(run=cmd_model_publish)
    switch = model_sub.add_parser(
        "switch", help="make a published version current (encoders and feature service)")
    switch.add_argument("version", help="a published version, or its slug")
    switch.set_defaults(run=cmd_model_switch)
    listing = model_sub.add_parser("list", help="published versions; * marks the current one")
    listing.set_defaults(run=cmd_model_list)
    info = model_sub.add_parser("info", help="configuration and parameter count")
    info.add_argument("dir", type=Path, nargs="?")
    info.add_argument("--preset", default="default", help="when no dir is given")
    info.set_defaults(run=cmd_model_info)
    for command in sub.choices.values():
        command.add_argument(
            "--loglevel", default="info", choices=list(LOGLEVELS), help="default: info"
        )
        command.add_argument(
            "--log-format", default="text", choices=["text", "json"],
            help="text lines (default), or one JSON object per line",
        )
    return parser


EXIT_BROKER = 3  # the broker is unreachable or failed; a config error is 2
# What the `train` extra adds (pyproject.toml): the serving images leave it out.
TRAINING_MODULES = {"sklearn", "matplotlib", "lifetimes"}
NEEDS_BROKER = {cmd_produce, cmd_export, cmd_stream, cmd_encode, cmd_refresh, cmd_topics,
                cmd_model_publish}


def _reads_kafka(args: argparse.Namespace) -> bool:
    """Whether the command talks to Kafka; pretrain and model init do unless given a file
    (or the synthetic catalogue). The demo starts a broker of its own."""
    if args.run in (cmd_pretrain, cmd_model_init):
        return not (args.sequences or getattr(args, "synthetic", False))
    return args.run in NEEDS_BROKER


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(handlers=[log_handler(args.log_format)])
    logging.getLogger().setLevel(LOGLEVELS[args.loglevel])  # also where handlers exist already
    logging.getLogger("feast").setLevel(logging.WARNING)  # it logs every registry refresh
    try:
        settings = load_settings(model_dir=getattr(args, "model_dir", None),
                                 model_version=getattr(args, "model_version", None))
        if _reads_kafka(args):
            settings = with_recorded_broker(settings)  # `beat broker`'s, when none is set
    except ConfigError as err:  # a bad setting, or a recorded broker that is gone
        print(err, file=sys.stderr)
        return 2
    if args.run in NEEDS_BROKER and not settings.bootstrap_servers:
        print("KAFKA_BOOTSTRAP_SERVERS is not set: point it at your Kafka cluster, or start "
              "the embedded broker with `beat broker start` (memory-only)", file=sys.stderr)
        return 2
    try:
        return args.run(args, settings)
    except ConfigError as err:  # a setting that does not fit (the model's window...): said plainly
        print(err, file=sys.stderr)
        return 2
    except BrokerError as err:  # unreachable, or a fatal client error: a supervisor restarts us
        print(err, file=sys.stderr)
        return EXIT_BROKER
    except ModuleNotFoundError as err:
        if err.name not in TRAINING_MODULES:
            raise
        print(f"`beat {args.command}` needs {err.name}, from the training extra: "
              "pip install 'beatstream[train]' (the serving images leave it out)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
