"""Windows stay exact when stream workers crash or hand partitions over.

The final window of a user is what a downstream consumer of ``beat.windows`` sees: the
latest message per user (the topic is compacted to exactly that). It is compared with
the window computed independently from every event sent (tests/test_pipeline.py's
``expected_windows``), so a lost event, an event counted twice, or a window that was
changed in the state but never re-emitted after a crash all show up as mismatches.
"""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import numpy as np

from stream.codec import AvroCodec
from stream.config import Settings
from stream.producer import EventProducer
from stream.window import Window

from conftest import read_topic, stream_worker, wait_for
from reference_windows import expected_windows, traffic, window_columns

KILLS = 4
COMMITTED_S = 1.0  # a worker commits every batch (flush interval)


def assert_final_windows_exact(
    settings: Settings, events: list[dict], timeout_s: float = 60
) -> int:
    """Wait until the latest window per user equals the expected one; on timeout,
    fail listing the users that differ. Returns the number of window messages."""
    expected = {user: window_columns(w) for user, w in expected_windows(events).items()}
    codec = AvroCodec("user_window", settings.windows_topic)
    latest: dict[str, dict[str, list]] = {}
    read = windows = 0

    def exact(messages: list) -> bool:
        nonlocal read, windows
        for message in messages[read:]:
            if message.value() is not None:  # None: a seal (see StreamWorker.seal)
                window = Window.from_record(codec.decode(message.value()))
                latest[window.user_id] = window.columns()
                windows += 1
        read = len(messages)
        return latest == expected

    try:
        read_topic(settings, settings.windows_topic, until=exact, timeout_s=timeout_s)
    except AssertionError:
        pass
    mismatched = sorted(u for u in expected if latest.get(u) != expected[u])
    missing_events = sum(
        len(set(expected[u]["id_hash"]) - set(latest.get(u, {"id_hash": []})["id_hash"]))
        for u in mismatched
    )
    assert not mismatched and set(latest) == set(expected), (
        f"{len(mismatched)} of {len(expected)} users' final windows differ "
        f"({missing_events} expected events missing), e.g. {mismatched[:5]}; "
        f"unexpected users: {sorted(set(latest) - set(expected))}"
    )
    return windows


def test_sigkilled_worker_restarts_with_exact_windows(settings: Settings, tmp_path: Path) -> None:
    events = traffic(4000, seed=11)
    chunks = np.array_split(np.arange(len(events)), 4 * (KILLS + 1))
    producer = EventProducer(settings)
    log = tmp_path / "stream.log"
    rng = random.Random(5)

    def send_chunk() -> None:
        producer.send(events[i] for i in chunks.pop(0))
        producer.flush()

    kills = 0
    for attempt in range(KILLS):
        send_chunk()  # events that wait for the worker while it is down
        ready = tmp_path / f"ready-{attempt}"
        with stream_worker(settings, log, ready_file=ready) as worker:
            wait_for(ready.exists, 60, "stream worker joining the group")
            for _ in range(3):  # events flow while the worker runs, then it dies mid-batch
                send_chunk()
                time.sleep(rng.uniform(0.05, 0.4))
            if attempt == KILLS - 1:
                # Once, die idle after a commit: replaying uncommitted events cannot then
                # hide state that recovery failed to read back from the changelog.
                time.sleep(COMMITTED_S)
            assert worker.poll() is None, log.read_text()[-3000:]
            worker.send_signal(signal.SIGKILL)
            worker.wait()
            kills += 1

    while chunks:
        send_chunk()
    with stream_worker(settings, log, ready_file=tmp_path / "ready-last"):
        windows = assert_final_windows_exact(settings, events)
    print(
        f"\nSIGKILL recovery: kills={kills} events={len(events)} "
        f"window messages={windows} mismatches=0"
    )


def test_second_worker_takes_over_stopped_workers_partitions(
    settings: Settings, tmp_path: Path
) -> None:
    events = traffic(3000, seed=23)
    first_half, second_half = events[: len(events) // 2], events[len(events) // 2 :]
    producer = EventProducer(settings)
    ready = [tmp_path / "ready-a", tmp_path / "ready-b"]

    with stream_worker(settings, tmp_path / "a.log", ready_file=ready[0]) as a, \
            stream_worker(settings, tmp_path / "b.log", ready_file=ready[1]):
        wait_for(
            lambda: all(r.exists() for r in ready), 60, "both stream workers joining the group"
        )
        producer.send(first_half)
        producer.flush()
        expected_first = expected_windows(first_half)
        codec = AvroCodec("user_window", settings.windows_topic)
        # Both workers have processed their share: every user of the first half has a window.
        read_topic(
            settings,
            settings.windows_topic,
            timeout_s=60,
            until=lambda messages: (
                {codec.decode(m.value())["user_id"] for m in messages if m.value()}
                >= set(expected_first)
            ),
        )
        # Stop one worker while the second half flows; the other takes over its partitions.
        producer.send(second_half[: len(second_half) // 2])
        a.terminate()
        producer.send(second_half[len(second_half) // 2 :])
        producer.flush()
        assert a.wait(30) == 0, (tmp_path / "a.log").read_text()[-3000:]
        assert_final_windows_exact(settings, events)
