"""Hostile input interleaved with valid events: every kind goes to the dead-letter topic,
nothing is lost or counted twice (in = windowed + duplicates + too old + dead letters),
and every valid event is in its user's window."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

from confluent_kafka import Producer

from stream.broker import producer_config
from stream.codec import AvroCodec
from stream.config import Settings
from stream.producer import EventProducer
from stream.window import Window

from conftest import read_topic, stream_worker
from reference_windows import T0, event, expected_windows, window_columns

USERS = [f"u{i}" for i in range(8)]


def hostile(codec: AvroCodec) -> list[tuple[bytes | None, bytes | None, str]]:
    """(key, value, what the dead-letter reason says) of each kind of bad message."""
    good = codec.encode(event("u0", 900, T0))
    header = codec.framing.header()

    def bad(**fields: object) -> bytes:
        return codec.encode({**event("u1", 901, T0), **fields})

    return [
        (b"u0", bytes(range(256)) * 3, "not Avro single-object encoded"),
        (b"u0", good[: len(good) // 2], ""),  # truncated body
        (b"u0", good[:2] + b"\x99" * 8 + good[10:], "fingerprint"),
        (b"u0", header + b"\x80" * 11, ""),  # a varint that never ends
        (b"u0", None, "empty message value"),
        (None, good, "message key None is not the event's user_id"),
        (b"mallory", good, "is not the event's user_id 'u0'"),
        (b"", bad(user_id=""), "missing user_id"),
        (b"u1", bad(event_id=""), "missing event_id"),
        (b"u1", bad(action=""), "missing action"),
        (b"u1", bad(event_time=T0 + timedelta(days=3650)), "in the future"),
        (b"u1", bad(event_time=T0 - timedelta(days=365 * 60)), "before 1970"),
        (b"u1", bad(action="a" * 300), "BEAT_MAX_ACTION_BYTES"),
        (b"u1", bad(property="p" * 2_000), "BEAT_MAX_PROPERTY_BYTES"),
        (b"u1", bad(attributes={str(i): "" for i in range(100)}), "BEAT_MAX_ATTRIBUTES"),
        (b"u1", bad(attributes={"k": "v" * 20_000}), "BEAT_MAX_ATTRIBUTE_BYTES"),
        (b"u1", bad(action="a" * 100_000), "BEAT_MAX_EVENT_BYTES"),
        (b"u1", codec.encode(event("u1", 902, T0)).replace(b"u1-902", b"u1-\xff\xfe2"), "utf-8"),
    ]


def counts_at_stop(log: Path) -> dict[str, int]:
    line = [x for x in log.read_text().splitlines() if "stream worker: stopping" in x][-1]
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}


def test_hostile_messages_among_valid_ones(settings: Settings, tmp_path: Path) -> None:
    codec = AvroCodec("behavior_event", settings.events_topic)
    first = [event(u, n, T0 + timedelta(hours=n)) for u in USERS for n in range(30)]
    late = [event(u, 100 + n, T0 + timedelta(hours=n, minutes=30)) for u in USERS
            for n in range(10)]  # fmt: skip
    too_old = [event(u, 200 + n, T0 - timedelta(days=120 + n)) for u in USERS for n in range(3)]
    resent = first[::7]
    last = [event(u, 999, T0 + timedelta(days=2)) for u in USERS]
    producer = EventProducer(settings)
    producer.send(first)
    producer.flush()
    raw = Producer(producer_config(settings, **{"message.max.bytes": 2_000_000}))
    window_codec = AvroCodec("user_window", settings.windows_topic)
    log = tmp_path / "stream.log"
    with stream_worker(settings, log):
        read_topic(settings, settings.windows_topic, until=lambda m: len({x.key() for x in m}) > 8)
        bad = hostile(codec)
        for i, (key, value, _) in enumerate(bad):  # interleaved with valid events
            producer.send(late[i * 4 : i * 4 + 4] + too_old[i * 2 : i * 2 + 2] + resent[i : i + 1])
            producer.flush()
            raw.produce(settings.events_topic, value, key)
            raw.flush(10)
        producer.send(late[len(bad) * 4 :] + too_old[len(bad) * 2 :] + resent[len(bad) :])
        producer.flush()
        # Each user's last event, sent after all others: once every window holds its own,
        # everything before it on the user's partition has been read.
        producer.send(last)
        producer.flush()
        dead = read_topic(settings, settings.dead_letter_topic, until=lambda m: len(m) >= len(bad))
        valid = first + late + too_old + last
        expected = {u: window_columns(w) for u, w in expected_windows(valid).items()}

        def done(messages: list) -> bool:
            latest = {}
            for message in messages:
                if message.value() is not None:
                    window = Window.from_record(window_codec.decode(message.value()))
                    latest[window.user_id] = window.columns()
            return latest == expected

        read_topic(settings, settings.windows_topic, until=done, timeout_s=60)

    reasons = [dict(m.headers())["dlq.reason"].decode() for m in dead]
    assert len(dead) == len(bad)
    for key, value, says in bad:
        assert any(says in r for r in reasons), f"no dead letter says {says!r}: {reasons}"
    counts = counts_at_stop(log)
    sent = len(valid) + len(resent) + len(bad)
    windowed = sum(len(w["id_hash"]) for w in expected.values())
    assert counts["events"] == sent
    assert counts["too_old"] == len(too_old) and counts["duplicates"] == len(resent)
    assert counts["dead_letters"] == len(bad)
    assert sent == windowed + counts["duplicates"] + counts["too_old"] + counts["dead_letters"]
