"""Benchmark BEAT inference: users/s and events/s, micro-batched vs one user at a time.

    .venv/bin/python bench/encoder.py            # CPU section; the GPU section too where CUDA is
    .venv/bin/python bench/encoder.py --no-cpu   # GPU section only (H100: --peak-tflops 989)

CPU: the same windows encoded with BeatEncoder.encode in micro-batches (length-sorted, padded
per batch) and one user per call, in the same run, so the ratio is meaningful on a busy machine.
GPU: the default model in bf16 at batch sizes 64..1024, on realistic mixed-length windows and on
full 256-event windows; "model" times the forward passes of pre-tokenized batches already on the
GPU, "end-to-end" adds host-side tokenization and transfers (BeatEncoder.encode). MFU is the
useful model FLOPs (real events only, counted analytically) per second over --peak-tflops.

Window lengths ("mixed"): log-normal with median 64 events, clipped to 1..256, so about a tenth of
the users have a full window, like a live population with a Zipf-distributed activity.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as bench/encoder.py

from model import Beat, BeatConfig, BeatEncoder, EventBatch, EventWindow, Vocabulary  # noqa: E402
from model.inference import length_batches  # noqa: E402

if TYPE_CHECKING:
    from stream.config import Settings

RESULTS = Path(__file__).resolve().parent / "results" / "encoder.json"
ACTIONS = [f"action_{i}" for i in range(40)]
PROPERTIES = [f"property_{i}" for i in range(600)]
T0 = 1_735_689_600_000  # 2025-01-01 UTC, unix ms
HOUR_MS = 3_600_000


def window_lengths(n: int, rng: np.random.Generator, mixed: bool, max_events: int) -> np.ndarray:
    if not mixed:
        return np.full(n, max_events)
    return np.clip(rng.lognormal(np.log(64), 1.0, n).astype(int), 1, max_events)


def make_windows(lengths: np.ndarray, rng: np.random.Generator) -> list[EventWindow]:
    windows = []
    for n in lengths:
        gaps = rng.exponential(6 * HOUR_MS, n).astype(np.int64)
        windows.append(EventWindow(
            event_time_ms=T0 + np.cumsum(gaps),
            action=rng.choice(np.array(ACTIONS, dtype=object), n),
            property=rng.choice(np.array(PROPERTIES + [None], dtype=object), n),
        ))
    return windows


def make_encoder(preset: str, device: str, max_batch: int, compile: bool) -> BeatEncoder:
    config = BeatConfig.preset(preset)
    torch.manual_seed(0)
    with torch.device(device):
        model = Beat(config)
    actions = Vocabulary.build(ACTIONS, config.action_vocab_size)
    properties = Vocabulary.build(PROPERTIES, config.property_vocab_size)
    return BeatEncoder(model, actions, properties, "bench", device, max_batch, compile)


def forward_flops(config: BeatConfig, lengths: np.ndarray) -> float:
    """Multiply-adds × 2 of one forward over windows of these lengths (real events only).

    Per block and token: qkv + proj (4 H²) and the MLP (2 r H²) matmuls; per block and row:
    scores and weighted values (2 T² H); plus the output head on the summary token. Embedding
    lookups, norms and softmax are negligible and not counted.
    """
    H, r = config.hidden_size, config.mlp_ratio
    tokens = lengths.astype(np.float64) + 1  # + the summary token
    per_block = 2 * tokens * (4 + 2 * r) * H * H + 2 * 2 * tokens**2 * H
    return float(config.num_layers * per_block.sum() + 2 * len(lengths) * H * config.embedding_size)


def fastest(
    runs: dict[str, Callable[[], object]], repeats: int, synchronize: Callable[[], None]
) -> dict[str, float]:
    """Seconds of the fastest of `repeats` runs of each, after one warm-up each. The runs are
    interleaved, so that load from other processes hits every one alike."""
    seconds = {name: float("inf") for name in runs}
    for attempt in range(repeats + 1):
        for name, run in runs.items():
            began = time.perf_counter()
            run()
            synchronize()
            if attempt:  # the first round warms up
                seconds[name] = min(seconds[name], time.perf_counter() - began)
    return seconds


def cpu_section(users: dict[str, int], max_batch: int, repeats: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for preset, n in users.items():
        encoder = make_encoder(preset, "cpu", max_batch, compile=False)
        windows = make_windows(window_lengths(n, rng, True, encoder.model.config.max_events), rng)
        events = sum(len(w) for w in windows)
        modes = {
            f"micro-batched ({max_batch})": lambda: encoder.encode(windows),
            "one at a time": lambda: [encoder.encode([w]) for w in windows],
        }
        seconds = fastest(modes, repeats, lambda: None)
        # The fixed cost of one call (tokenizing, op dispatch, a 1-event forward): all that
        # batching can save on CPU, where the matmuls of even one window keep the cores busy.
        one_event = make_windows(np.array([1]), rng)
        floor = fastest({"floor": lambda: encoder.encode(one_event)}, 20, lambda: None)["floor"]
        one = seconds["one at a time"]
        for mode, s in seconds.items():
            rows.append({
                "device": "cpu", "config": preset, "mode": mode, "users": n, "events": events,
                "seconds": s, "users_per_s": n / s, "events_per_s": events / s,
                "ms_per_user": 1e3 * s / n, "per_call_floor_ms": 1e3 * floor,
                "speedup_vs_one_at_a_time": one / s,
            })
    return rows


def gpu_section(
    batch_sizes: list[int], peak_tflops: float, compile: bool, repeats: int
) -> list[dict]:
    rng = np.random.default_rng(1)
    rows = []
    for batch_size in batch_sizes:
        encoder = make_encoder("default", "cuda", batch_size, compile)
        config = encoder.model.config
        for mixed in (True, False):
            label = "mixed" if mixed else f"full {config.max_events}"
            n = 8 * batch_size
            lengths = window_lengths(n, rng, mixed, config.max_events)
            windows = make_windows(lengths, rng)
            batches = [  # what encode() builds: length-aware batches, each padded to its longest
                EventBatch.from_windows([windows[i] for i in members], encoder.actions,
                                        encoder.properties).to("cuda")
                for members in length_batches(lengths, batch_size, encoder.bucket_width)
            ]
            flops = forward_flops(config, lengths)
            modes = {
                "model": lambda: [encoder.embed(b) for b in batches],
                "end-to-end": lambda: encoder.encode(windows),
            }
            for mode, s in fastest(modes, repeats, torch.cuda.synchronize).items():
                rows.append({
                    "device": torch.cuda.get_device_name(), "config": "default", "mode": mode,
                    "batch_size": batch_size, "windows": label,
                    "users": n, "events": int(lengths.sum()), "seconds": s,
                    "users_per_s": n / s, "events_per_s": lengths.sum() / s,
                    "tflops": flops / s / 1e12, "mfu": flops / s / (peak_tflops * 1e12),
                })
    return rows


def end_to_end_section(users: int, store: str, threads: int) -> list[dict]:
    """Windows from a topic through an EncoderWorker to the online store and beat.embeddings
    (on CUDA the default preset, 256 a forward pass; else small, 32), twice on the same
    topic: decoding the next step's windows ahead (the CUDA default) and not (the CPU's);
    against BeatEncoder.encode alone on the same windows (the compute bound). The worker's
    time per stage says where the rest goes."""
    import uuid

    from confluent_kafka import Producer

    from stream.broker import EmbeddedBroker, ensure_topics, producer_config
    from stream.codec import AvroCodec
    from stream.config import load_settings
    from stream.window import Window, pack_rows

    torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    preset, encode_batch = ("default", 256) if device == "cuda" else ("small", 32)
    rng = np.random.default_rng(2)
    encoder = make_encoder(preset, device, encode_batch, compile=False)
    lengths = window_lengths(users, rng, True, encoder.model.config.max_events)
    windows = make_windows(lengths, rng)
    now_ms = int(time.time() * 1000)
    shift = now_ms - max(int(w.event_time_ms[-1]) for w in windows)  # live windows
    run = uuid.uuid4().hex[:8]
    rows = []
    with EmbeddedBroker() as broker:
        settings = load_settings(
            bootstrap_servers=broker.bootstrap_servers, windows_topic=f"bench.windows.{run}",
            embeddings_topic=f"bench.embeddings.{run}", group_prefix=f"bench-{run}",
            feast_project=f"bench_e2e_{run}", feast_data_dir=Path("/tmp") / f"bench_e2e_{run}",
            online_store=store, session_timeout_ms=2000, device=device,
        )
        ensure_topics(settings)
        codec, producer = AvroCodec("user_window", settings.windows_topic), Producer(
            producer_config(settings))
        for i, w in enumerate(windows):
            symbols = sorted(set(zip(w.action.tolist(), w.property.tolist())), key=str)
            index = {pair: k for k, pair in enumerate(symbols)}
            packed = pack_rows(w.event_time_ms + shift,
                               np.array([index[p] for p in zip(w.action, w.property)]),
                               np.arange(len(w), dtype=np.uint32), np.full(len(w), np.nan))
            window = Window.from_strings(f"u{i:07d}", packed, [a for a, _ in symbols],
                                         [p for _, p in symbols])
            producer.produce(settings.windows_topic, codec.encode(window.to_record(now_ms)),
                             window.user_id.encode())
        producer.flush(30)
        encoder.encode(windows[:256])  # warm: neither run pays the first forward passes
        for decode_ahead in (True, False):
            mode = "ahead" if decode_ahead else "inline"
            rows.append(worker_run(settings.model_copy(update={
                "group_prefix": f"{settings.group_prefix}-{mode}", "decode_ahead": decode_ahead,
            }), encoder, users))
    bound = fastest({"encode": lambda: encoder.encode(windows)}, 1, sync_of(device))["encode"]
    common = {"device": device, "config": preset, "users": users,
              "events": int(lengths.sum())}  # fmt: skip
    for row in rows:
        row.update(common, events_per_s=common["events"] / row["seconds"])
    rows.append({**common, "mode": "BeatEncoder.encode alone", "seconds": bound,
                 "users_per_s": users / bound, "events_per_s": lengths.sum() / bound,
                 "ms_per_user": 1e3 * bound / users})
    return rows


def worker_run(settings: Settings, encoder: BeatEncoder, users: int) -> dict:
    """One EncoderWorker over the topic's users, from the start to the last one written."""
    from stream.encoder_worker import EncoderWorker
    from stream.feast_sink import FeatureSink

    worker = EncoderWorker(settings, encoder, FeatureSink(settings))
    thread = threading.Thread(target=worker.run, kwargs={"report_every_s": 1e9}, daemon=True)
    began = time.perf_counter()
    thread.start()
    while worker.stats.users < users:
        time.sleep(0.05)
    seconds = time.perf_counter() - began
    worker.stop()
    thread.join(30)
    stages = dict(worker.runtime.stages.seconds)
    busy = sum(stages.values())
    mode = (f"end-to-end ({settings.online_store}, "
            f"{'decode ahead' if settings.decode_ahead else 'decode inline'})")  # fmt: skip
    row = {"mode": mode, "seconds": seconds, "users_per_s": users / seconds,
           "ms_per_user": 1e3 * seconds / users,
           "stage_share": {k: round(v / busy, 3) for k, v in stages.items()},
           "decode_us_per_user": round(1e6 * stages.get("decode", 0.0) / users, 1),
           "join_and_idle_s": round(seconds - busy, 2)}  # fmt: skip
    print(f"{mode}: share of the worker's busy time per stage: "
          + ", ".join(f"{k} {100 * v:.0f} %" for k, v in row["stage_share"].items())
          + f"; decode {row['decode_us_per_user']} us a user on the worker's thread"
          + f"; group join and waits {row['join_and_idle_s']} s")
    return row


def sync_of(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def print_table(rows: list[dict]) -> None:
    columns = [c for c in ("device", "config", "mode", "batch_size", "windows", "users",
                           "users_per_s", "events_per_s", "ms_per_user", "per_call_floor_ms",
                           "speedup_vs_one_at_a_time", "mfu")
               if any(c in row for row in rows)]

    def cell(row: dict, column: str) -> str:
        value = row.get(column, "")
        if column == "mfu" and value != "":
            return f"{100 * value:.1f} %"
        if isinstance(value, float):
            return f"{value:,.1f}"
        return f"{value:,}" if isinstance(value, int) else str(value)

    table = [columns] + [[cell(row, c) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for k, line in enumerate(table):
        print("  ".join(text.rjust(w) if k else text.ljust(w) for text, w in zip(line, widths)))
        if k == 0:
            print("  ".join("-" * w for w in widths))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small-users", type=int, default=512)
    parser.add_argument("--default-users", type=int, default=48)
    parser.add_argument("--max-batch", type=int, default=64, help="CPU micro-batch size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-gpu", action="store_true", help="skip the GPU section")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU section")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="dense bf16 peak of the GPU (H100 SXM: 989)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (GPU)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--end-to-end", type=int, default=0, metavar="USERS",
                        help="also run windows of USERS users from a topic through the worker")
    parser.add_argument("--store", default="redis", help="online store of --end-to-end")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of --end-to-end")
    args = parser.parse_args(argv)

    rows = []
    if args.end_to_end:
        rows += end_to_end_section(args.end_to_end, args.store, args.threads)
    if not args.no_cpu:
        users = {"small": args.small_users, "default": args.default_users}
        rows += cpu_section(users, args.max_batch, args.repeats)
    if not torch.cuda.is_available():
        print("CUDA is not available: GPU section skipped", file=sys.stderr)
    elif not args.no_gpu:
        rows += gpu_section(args.batch_sizes, args.peak_tflops, args.compile, args.repeats)
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    document = {"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
