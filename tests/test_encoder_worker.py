"""The encoder worker loses nothing: SIGKILLs, an online-store outage; what it publishes; and
it gives the memory its encodes freed back to the OS.

Windows are produced straight to beat.windows (the encoder's input) while the faults
happen; at the end every user's row in Feast and on beat.embeddings must describe the
user's final window (event_count and last_event_time).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import redis
from confluent_kafka import Consumer, Message, Producer, TopicPartition

from model import EventWindow, init_model_dir
from stream import encoder_worker
from stream.broker import client_config, producer_config
from stream.codec import AvroCodec
from stream.config import Settings
from stream.encoder_worker import (
    DecodeAhead,
    EncoderWorker,
    Pending,
    decode_window,
    embedding_values,
    load_worker,
)
from stream.feast_sink import EmbeddingRows, FeatureSink
from stream.window import Window, pack_rows

from conftest import (
    ACTIONS,
    REPO,
    WindowFeed,
    all_final_in_feast,
    read_topic,
    running,
    wait_for,
)


def test_published_values_are_what_the_avro_codec_writes() -> None:
    rng = np.random.default_rng(1)
    rows = EmbeddingRows(
        user_id=["a", "ü-2", "x" * 300], embedding=rng.standard_normal((3, 16)).astype(np.float32),
        model_version="m-1", event_count=np.array([1, 64, 256]),
        last_event_time_ms=np.array([0, 1_700_000_000_123, 2**40]),
        as_of_ms=np.array([5, 1_700_000_000_999, 2**41]),
    )
    codec = AvroCodec("user_embedding", "beat.embeddings")
    expected = [codec.encode({
        "user_id": rows.user_id[i], "model_version": "m-1", "embedding": rows.embedding[i].tolist(),
        "event_count": int(rows.event_count[i]), "last_event_time": int(rows.last_event_time_ms[i]),
        "updated_at": int(rows.as_of_ms[i]),
    }) for i in range(3)]
    assert embedding_values(codec.framing.header(), rows) == expected


def window_message(partition: int, offset: int, user: str | None) -> Message:
    """A record of beat.windows as the consumer gives it (user None: a seal, a tombstone)."""
    return Message(topic="beat.windows", partition=partition, offset=offset,
                   key=(user or "seal").encode(), value=None if user is None else b"window")


def test_pending_users_go_oldest_first_and_commits_stop_at_the_oldest_pending_window() -> None:
    pending = Pending()
    pending.add([window_message(0, 0, "a"), window_message(0, 1, "b"),
                 window_message(1, 0, "c"), window_message(0, 2, "a"),
                 window_message(1, 1, None)])
    batch, _ = pending.take_oldest(1)
    assert [(m.key(), m.offset()) for m in batch.latest.values()] == [(b"a", 2)]  # its newest
    assert (batch.ends, batch.messages, batch.windows) == ({0: 1, 1: 0}, 5, 4)  # b, c pending
    batch, taken = pending.take_oldest(5)
    assert list(batch.latest) == [b"b", b"c"] and batch.ends == {0: 3, 1: 2}  # the seal: done
    assert not pending

    # A step given up: its users go first again, a window read meanwhile kept as theirs.
    pending.add([window_message(1, 2, "c"), window_message(0, 3, "d")])
    pending.put_back(taken)
    assert [(k, m.offset(), first) for k, (m, first) in pending.users.items()] == [
        (b"b", 1, 1), (b"c", 2, 0), (b"d", 3, 3)]
    assert pending.committable() == {0: 1, 1: 0}

    pending.drop({1})  # moved to another member, which reads it again from the commit
    assert list(pending.users) == [b"b", b"d"] and pending.committable() == {0: 1}
    pending.put_back({b"e": (window_message(1, 5, "e"), 5)})
    assert list(pending.users) == [b"b", b"d"]  # partition 1 is no longer held


def test_the_windows_decoded_ahead_are_the_next_steps_and_what_it_would_decode() -> None:
    codec = AvroCodec("user_window", "beat.windows")

    def window_value(user: str, events: int) -> bytes:
        times = 1_700_000_000_000 + 1000 * np.arange(events)
        rows = pack_rows(times, np.arange(events) % 2, np.arange(events), np.full(events, 2.5))
        window = Window.from_strings(user, rows, ACTIONS[:2], ["web", None])
        return codec.encode(window.to_record(int(times[-1])))

    def message(offset: int, user: str, value: bytes) -> Message:
        return Message(topic="beat.windows", partition=0, offset=offset, key=user.encode(),
                       value=value)

    values = [window_value(f"u{i}", 3 + i) for i in range(4)]
    pending = Pending()
    pending.add([message(i, f"u{i}", v) for i, v in enumerate(values)] + [
        message(4, "bad", b"\x7bnot a window")])
    pending.take_oldest(1)
    ahead = DecodeAhead(codec)
    try:
        ahead.start(pending.peek_oldest(3))
        pending.add([message(5, "u2", values[0])])  # u2's newest window: not the one decoded
        batch, _ = pending.take_oldest(4)
        decoded = ahead.take()
    finally:
        ahead.close()
    assert sorted(decoded) == [(0, 1), (0, 2), (0, 3)]
    assert [(m.key(), m.offset()) for m in batch.latest.values()] == [
        (b"u1", 1), (b"u2", 5), (b"u3", 3), (b"bad", 4)]
    for (_, offset), (user, window) in decoded.items():
        again = decode_window(codec, values[offset])
        assert user == again[0] == f"u{offset}" and len(window) == 3 + offset
        assert window.event_time_ms.tolist() == again[1].event_time_ms.tolist()
        assert window.action.tolist() == again[1].action.tolist()
    assert "not Avro single-object encoded" in decode_window(codec, b"\x7bnot a window")
    assert ahead.take() == {}  # taken once


# Run in a fresh interpreter: in a process that earlier tests filled with threads and freed
# blocks, malloc places the blocks in old holes and the measure says little.
FREED_HEAP = """
import ctypes, os
from pathlib import Path
from stream.encoder_worker import release_freed_heap

def rss_bytes():
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
freed, live = [], []
for _ in range(1_000):  # 100 KB blocks: below the mmap threshold, so on the heap
    freed.append(libc.malloc(100_000))
    ctypes.memset(freed[-1], 1, 100_000)
    live.append(libc.malloc(1_000))  # each keeps the block before it from the heap's top
for block in freed:
    libc.free(block)
before = rss_bytes()
release_freed_heap()
print(before - rss_bytes())
"""


@pytest.mark.skipif(encoder_worker._MALLOC_TRIM is None, reason="glibc's malloc_trim only")
def test_freed_heap_goes_back_to_the_os() -> None:
    """What a soak's encoder lost: blocks freed between blocks that live on stay mapped
    (glibc returns only the heap's top) until release_freed_heap()."""
    done = subprocess.run([sys.executable, "-c", FREED_HEAP], capture_output=True, text=True,
                          check=True, cwd=Path(__file__).parent.parent)
    assert int(done.stdout.split()[-1]) > 80 << 20  # of the 100 MB freed


def test_the_worker_releases_the_freed_heap_after_each_encode(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    released = []
    monkeypatch.setattr(encoder_worker, "release_freed_heap", lambda: released.append(True))
    model = SimpleNamespace(
        encode=lambda windows, as_of_ms: np.zeros((len(windows), 4), np.float32),
        model_version="m-1",
    )
    worker = SimpleNamespace(encoder=model, runtime=SimpleNamespace(stage=lambda _: nullcontext()))
    window = EventWindow(np.array([5]), ["view"], [None])
    for _ in range(3):
        EncoderWorker.encode(worker, [window], ["u"], np.array([6]))
    assert len(released) == 3


def assert_published_final(settings: Settings, final: dict[str, tuple[int, int]]) -> None:
    codec = AvroCodec("user_embedding", settings.embeddings_topic)

    def done(messages: list) -> bool:
        newest = {r["user_id"]: r for r in (codec.decode(m.value()) for m in messages)}
        return all(
            u in newest and newest[u]["event_count"] == count
            and int(newest[u]["last_event_time"].timestamp() * 1000) == last
            for u, (count, last) in final.items()
        )

    read_topic(settings, settings.embeddings_topic, until=done, timeout_s=60)


@pytest.fixture
def model_settings(settings: Settings, tmp_path: Path, redis_url: str) -> Settings:
    init_model_dir(tmp_path / "model", "tiny", ACTIONS, ["web"], seed=2)
    return settings.model_copy(update={
        "model_dir": tmp_path / "model", "online_store": "redis", "redis_url": redis_url,
        "max_wait_ms": 20, "torch_threads": 1, "max_events": 64,  # the tiny preset reads 64
    })


@contextmanager
def encoder_process(
    settings: Settings, log_path: Path, ready_file: Path
) -> Iterator[subprocess.Popen]:
    ready_file.unlink(missing_ok=True)
    env = {**os.environ, **settings.to_env()}
    command = [sys.executable, "-m", "stream.cli", "encode", "--ready-file", str(ready_file)]
    with open(log_path, "a") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def test_sigkilled_encoder_restarts_and_every_user_ends_with_its_final_window(
    model_settings: Settings, tmp_path: Path
) -> None:
    settings = model_settings
    sink = FeatureSink(settings)
    log_path, ready = tmp_path / "encoder.log", tmp_path / "ready"
    rng = random.Random(3)
    with WindowFeed(settings, users=60) as feed:
        for _ in range(3):
            with encoder_process(settings, log_path, ready) as encoder:
                wait_for(lambda: ready.exists() or encoder.poll() is not None, 90, "encoder ready")
                assert encoder.poll() is None, log_path.read_text()[-3000:]
                sent = feed.sent
                wait_for(lambda: feed.sent > sent + 40, 30, "windows sent meanwhile")
                time.sleep(rng.uniform(0.2, 1.0))
                encoder.send_signal(signal.SIGKILL)
        with encoder_process(settings, log_path, ready) as encoder:
            wait_for(lambda: ready.exists(), 90, "encoder ready")
            time.sleep(1)
            feed.__exit__()
            final = feed.final()
            wait_for(lambda: all_final_in_feast(sink, final), 90, "every final window in Feast")
            # while the encoder runs: it publishes a batch after writing it to Feast
            assert_published_final(settings, final)
    assert feed.sent > 400


@contextmanager
def own_redis(directory: Path) -> Iterator[tuple[str, callable]]:
    """A redis-server of this test's own on a spare port, saving to directory when stopped;
    yields its URL and a function that stops it for some seconds and starts it again."""
    server = shutil.which("redis-server")
    if not server:
        pytest.skip("no redis-server binary")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [server, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(directory),
               "--save", "", "--appendonly", "no"]
    client = redis.Redis(port=port)

    def start() -> subprocess.Popen:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        wait_for(lambda: _answers(client), 20, "redis-server up")
        return process

    processes = [start()]

    def outage(seconds: float) -> None:
        client.shutdown(save=True)  # its data survives, like a restarted production Redis
        processes[0].wait(10)
        time.sleep(seconds)
        processes[0] = start()

    try:
        yield f"127.0.0.1:{port}", outage
    finally:
        processes[0].terminate()
        processes[0].wait(10)


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def committed(settings: Settings) -> list[int]:
    consumer = Consumer(client_config(settings, **{"group.id": settings.encoder_group}))
    try:
        partitions = [TopicPartition(settings.windows_topic, p) for p in range(settings.partitions)]
        return [tp.offset for tp in consumer.committed(partitions, timeout=10)]
    finally:
        consumer.close()


def test_online_store_outage_waits_commits_nothing_and_catches_up(
    model_settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with own_redis(tmp_path) as (url, outage):
        settings = model_settings.model_copy(update={"redis_url": url})
        worker = load_worker(settings)
        caplog.set_level(logging.WARNING, logger="stream.encoder_worker")
        with WindowFeed(settings, users=60) as feed, running(worker):
            wait_for(lambda: worker.stats.users > 100, 60, "encoding under way")
            stopper = threading.Thread(target=outage, args=(20.0,))
            stopper.start()
            time.sleep(3)  # the outage has begun, the worker holds a batch
            during = committed(settings)
            sent_before = feed.sent
            time.sleep(15)
            assert committed(settings) == during  # nothing committed while the store is down
            assert feed.sent > sent_before + 100
            stopper.join()
            time.sleep(2)
            feed.__exit__()
            final = feed.final()
            sink = FeatureSink(settings)
            wait_for(lambda: all_final_in_feast(sink, final), 60, "caught up after the outage")
    waits = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
    assert waits and url in waits[0] and "uncommitted" in waits[0]
    assert any("back after" in r.getMessage() for r in caplog.records)
    assert_published_final(settings, final)


def test_a_window_from_the_past_is_as_of_its_partition_and_a_live_one_as_of_now(
    model_settings: Settings,
) -> None:
    settings = model_settings
    codec = AvroCodec("user_window", settings.windows_topic)
    producer = Producer(producer_config(settings))
    now_ms = int(time.time() * 1000)
    history_ms = now_ms - 200 * 86_400_000
    feed = WindowFeed(settings, users=0)
    feed.times = {"live": [now_ms - 2_000, now_ms - 1_000],
                  "replayed": [history_ms - 5, history_ms]}
    for user, partition in (("live", 0), ("replayed", 1)):
        producer.produce(settings.windows_topic, codec.encode(feed.window(user).to_record(now_ms)),
                         user.encode(), partition=partition)
    producer.flush(10)
    started_ms = int(time.time() * 1000)
    with running(load_worker(settings)):
        messages = read_topic(settings, settings.embeddings_topic, until=lambda m: len(m) >= 2)
    records = {r["user_id"]: r for r in map(AvroCodec("user_embedding", "x").decode,
                                             (m.value() for m in messages))}
    as_of = {u: int(r["updated_at"].timestamp() * 1000) for u, r in records.items()}
    assert as_of["replayed"] == history_ms
    assert started_ms <= as_of["live"] <= int(time.time() * 1000)
