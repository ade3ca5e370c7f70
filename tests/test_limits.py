"""Limits of one event: an event over one is dead-lettered with the setting that limits it,
a window always fits in a broker message, and a dead letter too big to send is cut."""

from __future__ import annotations

import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import Producer

from stream import event_columns
from stream.broker import dead_letter, producer_config
from stream.codec import AvroCodec
from stream.config import ConfigError, Settings, load_settings
from stream.event_columns import EventDecoder
from stream.window import ROW, SYMBOLS, Window, encode_window_body

from conftest import read_topic, stream_worker
from reference_windows import login_event

NOW = datetime.now(UTC).replace(microsecond=0)
CODEC = AvroCodec("behavior_event", "beat.events")


def event(user: str, n: int, **fields: object) -> dict:
    return login_event(user, n, NOW, **fields)


def many_blocks(entries: int) -> bytes:
    """An event whose attributes map holds `entries` one-entry blocks (empty key and value)."""
    encoded = CODEC.encode(event("u", 0))
    return encoded[:-1] + b"\x02\x00\x00" * entries + b"\x00"  # count 1, "", ""; then the end


def declared(count: int) -> bytes:
    """An event whose map declares `count` entries and then ends: malformed, but the count
    alone puts it over the limit, without reading an entry."""
    zigzag = count << 1
    varint = bytearray()
    while zigzag > 0x7F:
        varint.append((zigzag & 0x7F) | 0x80)
        zigzag >>= 7
    varint.append(zigzag)
    return CODEC.encode(event("u", 0))[:-1] + bytes(varint)


@pytest.mark.parametrize("scalar_rows", [0, event_columns._SCALAR_ROWS])
def test_events_over_a_limit_are_rejected_with_the_setting(
    scalar_rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        event_columns, "_SCALAR_ROWS", scalar_rows
    )  # maps read in passes, or one by one
    limits = load_settings().event_limits
    payloads = [
        CODEC.encode(
            event(
                "u",
                0,
                action="a" * limits.max_action_bytes,
                attributes={str(i): "" for i in range(limits.max_attributes)},
            )
        ),  # at the limits: kept
        CODEC.encode(event("u", 1, action="a" * (limits.max_action_bytes + 1))),
        CODEC.encode(event("u", 2, property="p" * (limits.max_property_bytes + 1))),
        CODEC.encode(event("u" * (limits.max_id_bytes + 1), 3)),
        CODEC.encode(
            event("u", 4, attributes={str(i): "" for i in range(limits.max_attributes + 1)})
        ),
        CODEC.encode(event("u", 5, attributes={"k": "v" * limits.max_attribute_bytes})),
        CODEC.encode(event("u", 6, action="a" * limits.max_event_bytes)),
        many_blocks(limits.max_attributes + 1),
        declared(10**12),
        CODEC.encode(event("u", 9)),
    ]
    out = EventDecoder(CODEC, limits).decode(payloads)
    assert out.row.tolist() == [0, 9]
    reasons = dict(out.rejected)
    assert (
        reasons[1]
        == f"an action of {limits.max_action_bytes + 1} bytes is over BEAT_MAX_ACTION_BYTES=256"
    )
    assert "is over BEAT_MAX_PROPERTY_BYTES=1,024" in reasons[2]
    assert reasons[3].startswith("a user_id of 257 bytes is over BEAT_MAX_ID_BYTES")
    assert reasons[4] == "65 attributes is over BEAT_MAX_ATTRIBUTES=64"
    assert "is over BEAT_MAX_ATTRIBUTE_BYTES=16,384" in reasons[5]
    assert "is over BEAT_MAX_EVENT_BYTES=65,536" in reasons[6]
    assert reasons[7] == "65 attributes is over BEAT_MAX_ATTRIBUTES=64"
    # the walk stopped at the count: the missing entries were never read
    assert reasons[8] == "1,000,000,000,000 attributes is over BEAT_MAX_ATTRIBUTES=64"
    # without limits the decoder takes every well-formed event
    assert EventDecoder(CODEC).decode(payloads).row.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 9]


def test_the_largest_window_the_limits_allow_fits_in_a_message() -> None:
    settings = load_settings()
    n = settings.max_events
    action_width, property_width = settings.max_action_bytes - 1, settings.max_property_bytes - 1
    symbols = [(f"a{i:0{action_width}d}", f"p{i:0{property_width}d}") for i in range(n)]
    rows = np.zeros(n, ROW)
    rows["symbol"] = np.arange(n)
    window = Window("u" * settings.max_id_bytes, rows, SYMBOLS.ids(*zip(*symbols)))
    size = len(encode_window_body(window, 2**47)) + settings.max_id_bytes  # value and key
    assert size <= settings.largest_window_bytes <= settings.max_message_bytes


def test_limits_that_would_let_a_window_outgrow_a_message_are_refused() -> None:
    with pytest.raises(ConfigError, match="BEAT_MAX_MESSAGE_BYTES=1,000,000"):
        load_settings(max_events=4096)
    assert (
        load_settings(max_events=4096, max_property_bytes=100, max_action_bytes=100).max_events
        == 4096
    )


def test_a_dead_letter_too_big_to_send_is_cut_with_a_marker() -> None:
    letter = dead_letter(b"k", b"x" * 1_500_000, "why", ("beat.events", 3, 42), 1_000_000)
    headers = dict(letter.headers)
    assert len(letter.key) + len(letter.value) + sum(len(v) for v in headers.values()) < 1_000_000
    assert letter.value == b"x" * len(letter.value) and letter.key == b"k"
    assert headers["dlq.truncated"] == b"key=1,value=1500000"
    assert headers["dlq.reason"] == b"why" and headers["dlq.offset"] == b"42"
    small = dead_letter(b"k", b"v", "why", ("beat.events", 3, 42), 1_000_000)
    assert small.value == b"v" and "dlq.truncated" not in dict(small.headers)


def test_huge_events_are_dead_lettered_and_the_worker_goes_on(
    settings: Settings, tmp_path: Path
) -> None:
    """The crash loop of issue 12: two 600 KB actions of one user made a window over 1 MB,
    and a 1.5 MB garbage message made a dead letter over 1 MB; both failed produce()."""
    sends = [
        (b"alice", CODEC.encode(event("alice", 0, action="a" * 600_000))),
        (b"alice", CODEC.encode(event("alice", 1, action="b" * 600_000))),
        (b"alice", b"\x7b" * 1_500_000),
        (b"alice", CODEC.encode(event("alice", 2))),
    ]
    producer = Producer(producer_config(settings, **{"message.max.bytes": 2_000_000}))
    for key, value in sends:
        producer.produce(settings.events_topic, key=key, value=value)
    assert producer.flush(10) == 0

    with stream_worker(settings, tmp_path / "stream.log") as worker:
        dead = read_topic(
            settings, settings.dead_letter_topic, until=lambda m: len(m) >= 3, timeout_s=60
        )
        windows = read_topic(
            settings, settings.windows_topic, until=lambda m: any(x.key() == b"alice" for x in m)
        )
        time.sleep(0.5)
        assert worker.poll() is None, (tmp_path / "stream.log").read_text()[-2000:]

    reasons = Counter(dict(m.headers())["dlq.reason"].decode() for m in dead)
    assert reasons == {
        f"an event of {len(sends[0][1]):,} bytes is over BEAT_MAX_EVENT_BYTES=65,536": 2,
        "an event of 1,500,000 bytes is over BEAT_MAX_EVENT_BYTES=65,536": 1,
    }
    cut = next(m for m in dead if len(m.value()) > 600_200)
    assert dict(cut.headers())["dlq.truncated"] == b"key=5,value=1500000"
    alice = [m for m in windows if m.key() == b"alice"][-1]
    window = Window.from_record(
        AvroCodec("user_window", settings.windows_topic).decode(alice.value())
    )
    assert window.actions == ["login"] and len(window) == 1
