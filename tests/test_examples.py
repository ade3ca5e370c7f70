"""The examples/ other teams copy, run against the real broker, stream worker and stores."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import ModuleType

import pyarrow as pa

from stream.codec import AvroCodec
from stream.config import Settings
from stream.window import Window, event_id_hashes

from conftest import REPO, read_topic, stream_worker

EXAMPLES = REPO / "examples"
NOW = datetime.now(timezone.utc).replace(microsecond=0)


def example(name: str) -> ModuleType:
    """examples/<name>.py as a module (examples/ is not a package: teams copy single files)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def imported_modules(path: Path) -> set[str]:
    """The top-level names of every module a file imports."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_the_producer_needs_only_confluent_kafka_and_fastavro() -> None:
    outside = imported_modules(EXAMPLES / "producer.py") - set(sys.stdlib_module_names)
    assert outside == {"confluent_kafka", "fastavro"}


def test_the_producer_writes_the_bytes_beatstream_writes() -> None:
    """Its framing and body are byte for byte the platform's own codec's."""
    event = {"user_id": "u1", "event_id": "e1", "event_time": "2026-11-30T09:15:00Z",
             "action": "purchase", "property": "books", "value": 12.5,
             "attributes": {"app": "ios"}}
    producer = example("producer")
    ours = AvroCodec("behavior_event", "beat.events")
    encoded = producer.EventEncoder().encode(event)
    assert encoded == ours.encode(producer.as_record(event))
    assert ours.decode(encoded)["event_time"] == datetime(2026, 11, 30, 9, 15, tzinfo=timezone.utc)
    epoch_ms = int(datetime(2026, 11, 30, 9, 15, tzinfo=timezone.utc).timestamp() * 1000)
    assert producer.EventEncoder().encode({**event, "event_time": epoch_ms}) == encoded


def run_producer(settings: Settings, events: list[dict]) -> subprocess.CompletedProcess:
    """examples/producer.py as a team runs it: JSON lines on stdin."""
    properties = [f"-X{name}={value}" for name, value in settings.kafka_properties.items()]
    return subprocess.run(
        [sys.executable, str(EXAMPLES / "producer.py"), "--bootstrap-servers",
         settings.bootstrap_servers, "--topic", settings.events_topic, *properties],
        input="".join(json.dumps(e) + "\n" for e in events), capture_output=True, text=True,
        timeout=60,
    )


def shop_event(user: str, n: int) -> dict:
    """A valid event n minutes into the last hour, times in both forms the producer takes."""
    at = NOW - timedelta(minutes=60 - n)
    return {"user_id": user, "event_id": f"{user}-{n}",
            "event_time": at.isoformat() if n % 2 else int(at.timestamp() * 1000),
            "action": ["page_view", "add_to_cart", "purchase"][n % 3],
            **({"property": "books", "value": 9.5} if n % 3 == 2 else {})}


def test_producer_events_are_windowed_and_bad_ones_dead_lettered(
    settings: Settings, tmp_path: Path
) -> None:
    users = [f"user-{u}" for u in range(6)]
    good = [shop_event(user, n) for user in users for n in range(4)]
    no_action = {**shop_event("user-0", 10), "event_id": "bad-1", "action": ""}
    tomorrow = {**shop_event("user-1", 11), "event_id": "bad-2",
                "event_time": int((NOW + timedelta(days=1)).timestamp() * 1000)}
    sent = run_producer(settings, good + [no_action, tomorrow])
    assert sent.returncode == 0, sent.stderr
    assert f"26 of 26 events delivered to {settings.events_topic}" in sent.stderr

    window_codec = AvroCodec("user_window", settings.windows_topic)

    def latest(messages: list) -> dict[str, Window]:
        windows = (Window.from_record(window_codec.decode(m.value()))
                   for m in messages if m.value() is not None)
        return {w.user_id: w for w in windows}

    with stream_worker(settings, tmp_path / "stream.log"):
        windows = read_topic(settings, settings.windows_topic, timeout_s=60,
                             until=lambda m: {u: len(w) for u, w in latest(m).items()}
                             == dict.fromkeys(users, 4))
        dead = read_topic(settings, settings.dead_letter_topic, until=lambda m: len(m) >= 2)
        moved = read_topic(settings, settings.repartition_topic)

    for user, window in latest(windows).items():  # exactly the user's four events
        ids = [e["event_id"] for e in good if e["user_id"] == user]
        assert sorted(window.rows["id_hash"].tolist()) == sorted(
            event_id_hashes(pa.array(ids)).tolist())
    reasons = {m.key(): dict(m.headers())["dlq.reason"].decode() for m in dead}
    assert reasons.keys() == {b"user-0", b"user-1"}
    assert reasons[b"user-0"] == "missing action"
    assert re.fullmatch(r"event_time is 8\d{4}s in the future", reasons[b"user-1"])
    assert all(dict(m.headers())["dlq.topic"].decode() == settings.events_topic for m in dead)
    assert moved == []  # murmur2_random put every event on its key's partition


def test_the_producer_stops_at_a_line_that_is_not_an_event(settings: Settings) -> None:
    lines = [shop_event("user-0", 1), {"user_id": "user-0", "event_id": "x", "action": "login"}]
    sent = run_producer(settings, lines)
    assert sent.returncode == 2
    assert "line 2: not a behavior_event (KeyError('event_time'))" in sent.stderr
