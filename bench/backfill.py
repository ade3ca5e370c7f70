"""Benchmark re-encoding every user from beat.windows: `beat model publish`'s backfill and
`beat refresh`, against BeatEncoder.encode alone on the same windows (the compute bound).

    .venv/bin/python bench/backfill.py                            # 2,000 users, 3 windows each
    .venv/bin/python bench/backfill.py --baseline-tree /work/main # also that tree's refresh

The topic holds --windows-per-user messages per user (each a longer window than the last, as
an uncompacted beat.windows does; Tansu never compacts), of mixed lengths (bench/encoder.py).
Each command runs as its own process, as an operator runs it, with one torch thread; its
users/s is what the command itself reports (start-up and imports left out), and its peak
RSS comes from the kernel (wait4). `beat refresh --idle-hours 0` re-encodes every user too, so
--baseline-tree measures another checkout's refresh (before the streaming rewrite: one
partition's windows in a dict, each window message decoded) on the same topic.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as bench/backfill.py

from confluent_kafka import Producer  # noqa: E402

from bench.encoder import ACTIONS, PROPERTIES, make_windows, window_lengths  # noqa: E402
from model import BeatEncoder, EventWindow, init_model_dir  # noqa: E402
from stream.broker import EmbeddedBroker, ensure_topics, producer_config  # noqa: E402
from stream.codec import AvroCodec  # noqa: E402
from stream.config import Settings, load_settings  # noqa: E402
from stream.window import Window, pack_rows  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "backfill.json"


def produce_windows(settings: Settings, windows: list[EventWindow], copies: int) -> int:
    """copies window messages per user, growing to its whole window; the messages sent."""
    codec, producer = AvroCodec("user_window", settings.windows_topic), Producer(
        producer_config(settings))
    now_ms = int(time.time() * 1000)
    shift = now_ms - max(int(w.event_time_ms[-1]) for w in windows)  # live windows
    sent = 0
    for copy in range(copies, 0, -1):
        for i, w in enumerate(windows):
            n = max(1, len(w) - copy + 1)  # the last copy is the whole window
            symbols = sorted(set(zip(w.action[:n].tolist(), w.property[:n].tolist())), key=str)
            index = {pair: k for k, pair in enumerate(symbols)}
            rows = pack_rows(w.event_time_ms[:n] + shift,
                             np.array([index[p] for p in zip(w.action[:n], w.property[:n])]),
                             np.arange(n, dtype=np.uint32), np.full(n, np.nan))
            window = Window.from_strings(f"u{i:07d}", rows, [a for a, _ in symbols],
                                         [p for _, p in symbols])
            producer.produce(settings.windows_topic, codec.encode(window.to_record(now_ms)),
                             window.user_id.encode())
            sent += 1
        producer.flush(60)
    return sent


def run_command(tree: Path, settings: Settings, args: list[str], pattern: str) -> dict:
    """`beat ARGS` from tree's checkout: the users and seconds it reports, its peak RSS."""
    env = {**os.environ, **settings.to_env(), "PYTHONPATH": str(tree),
           "BEAT_FEATURE_REPO": str(tree / "feature_repo")}
    with tempfile.TemporaryFile("w+") as out:
        process = subprocess.Popen([sys.executable, "-m", "stream.cli", *args], cwd=tree,
                                   env=env, stdout=out, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    found = re.search(pattern, text)
    if process.returncode or not found:
        raise RuntimeError(f"beat {' '.join(args)} in {tree}: exit {process.returncode}\n{text}")
    users, seconds = int(found["users"].replace(",", "")), float(found["seconds"])
    return {"users": users, "seconds": seconds, "users_per_s": users / seconds,
            "peak_rss_mb": usage.ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--windows-per-user", type=int, default=3)
    parser.add_argument("--store", choices=["sqlite", "redis"], default="sqlite")
    parser.add_argument("--baseline-tree", type=Path, help="another checkout's `beat refresh`")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rng = np.random.default_rng(3)
    work = Path(tempfile.mkdtemp(prefix="bench-backfill-"))
    model_dir = work / "model"
    init_model_dir(model_dir, "small", ACTIONS, PROPERTIES, seed=1)
    encoder = BeatEncoder.from_pretrained(model_dir, device="cpu", max_batch=32)
    windows = make_windows(window_lengths(args.users, rng, True, 256), rng)
    began = time.perf_counter()
    encoder.encode(windows)
    bound = time.perf_counter() - began
    rows = [{"what": "BeatEncoder.encode alone", "users": args.users, "seconds": bound,
             "users_per_s": args.users / bound}]
    run = uuid.uuid4().hex[:8]
    with EmbeddedBroker() as broker:
        settings = load_settings(
            bootstrap_servers=broker.bootstrap_servers, windows_topic=f"bench.windows.{run}",
            embeddings_topic=f"bench.embeddings.{run}", group_prefix=f"bench-{run}",
            feast_project=f"bench_backfill_{run}", feast_data_dir=work / "feast",
            data_dir=work / "data", online_store=args.store, torch_threads=1,
            session_timeout_ms=2000,
        )
        ensure_topics(settings)
        messages = produce_windows(settings, windows, args.windows_per_user)
        refresh = ["refresh", "--idle-hours", "0", "--model-dir", str(model_dir)]
        said = r"re-encoded (?P<users>[\d,]+) of [\d,]+ users .* in (?P<seconds>[\d.]+)s"
        trees = [("baseline refresh", args.baseline_tree)] if args.baseline_tree else []
        for what, tree in [*trees, ("refresh", REPO)]:
            rows.append({"what": f"{what} ({tree})", **run_command(tree, settings, refresh, said)})
        publish = ["model", "publish", str(model_dir), "--shadow"]
        said = r"backfilled (?P<users>[\d,]+) of [\d,]+ users in (?P<seconds>[\d.]+) s"
        rows.append({"what": "model publish backfill",
                     **run_command(REPO, settings, publish, said)})
    print(f"{args.users:,} users, {messages:,} window messages, small preset, one thread, "
          f"{args.store}; load average {os.getloadavg()[0]:.1f}")
    for row in rows:
        rss = f"{row['peak_rss_mb']:,.0f} MB" if "peak_rss_mb" in row else ""
        print(f"  {row['what']:60} {row['users_per_s']:8,.0f} users/s  {row['seconds']:6.1f} s"
              f"  {rss}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"users": args.users, "messages": messages, "rows": rows},
                                  indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
