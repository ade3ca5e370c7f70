"""Replaying beat.events from a real broker into the sequences table."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from model.sequences import SEQUENCE_SCHEMA, read_sequences
from stream.broker import client_config, producer_config
from stream.cli import main
from stream.config import Settings
from stream.producer import EventProducer, produce
from stream.replay import ReplayConfig, replay
from stream.synthetic import SyntheticEvents

QUIET = ReplayConfig(progress=False, idle_s=0.3)


def history(users: int, day: int, limit: int) -> pa.Table:
    batches = SyntheticEvents(n_users=users, seed=day).history(
        datetime(2024, 3, day, tzinfo=UTC), datetime(2024, 3, day + 2, tzinfo=UTC)
    )
    return pa.Table.from_batches(list(batches)).slice(0, limit)


def send(settings: Settings, events: pa.Table) -> None:
    produce(settings, iter(events.to_batches()))


def expected_sequences(events: pa.Table) -> list[dict]:
    """The sequences table as Python rows, built the slow obvious way."""
    rows = events.to_pylist()
    seen, users = set(), {}
    for e in rows:  # log order: the first of a repeated (user, event_id) wins
        if (e["user_id"], e["event_id"]) not in seen:
            seen.add((e["user_id"], e["event_id"]))
            users.setdefault(e["user_id"], []).append(e)
    out = []
    for user in sorted(users):
        events_ = sorted(users[user], key=lambda e: (e["event_time"], e["event_id"]))
        out.append({
            "user_id": user,
            "event_time": [int(e["event_time"].timestamp() * 1000) for e in events_],
            "action": [e["action"] for e in events_],
            "property": [e["property"] for e in events_],
            "value": [e["value"] for e in events_],
        })  # fmt: skip
    return out


def test_replays_every_partition_with_duplicates_ties_and_dead_letters(settings: Settings) -> None:
    events = history(300, 1, 3_000)
    repeats = events.slice(100, 50)
    # One user, one instant: order by event_id; a repeated id sent later with another time is
    # ignored.
    ties = pa.Table.from_pylist(
        [{**events.slice(0, 1).to_pylist()[0], "user_id": "u-ties", "event_id": eid,
          "event_time": when}
         for eid, when in [("c", 5_000), ("a", 5_000), ("b", 5_000), ("a", 1_000)]],
        schema=events.schema,
    )  # fmt: skip
    send(settings, events)
    send(settings, repeats)
    send(settings, ties)
    junk = Producer(producer_config(settings))
    for value in (b"not avro", None, b"\xc3\x01" + bytes(8)):
        junk.produce(settings.events_topic, key=b"u-junk", value=value)
    junk.flush(10)

    table, summary = replay(settings, QUIET)

    assert table.schema.equals(SEQUENCE_SCHEMA)
    assert table.to_pylist() == expected_sequences(pa.concat_tables([events, repeats, ties]))
    ties_row = table.filter(pa.compute.equal(table["user_id"], "u-ties")).to_pylist()[0]
    assert ties_row["event_time"] == [5_000, 5_000, 5_000]
    assert summary.messages == len(events) + len(repeats) + len(ties) + 3
    assert (summary.duplicates, summary.dead_letters) == (len(repeats) + 1, 3)
    assert summary.events == len(events) + 3 and summary.users == table.num_rows
    assert "empty message value" in {reason for _, _, reason in summary.dead_letter_examples}


def test_time_range_selects_by_log_time(settings: Settings) -> None:
    before, after = history(100, 1, 400), history(100, 5, 300)
    send(settings, before)
    time.sleep(0.2)
    middle_ms = int(time.time() * 1000)
    time.sleep(0.2)
    send(settings, after)

    early, early_summary = replay(settings, ReplayConfig(end_ms=middle_ms, progress=False))
    late, late_summary = replay(
        settings, ReplayConfig(start_ms=middle_ms, progress=False, idle_s=0.3)
    )
    nothing, _ = replay(
        settings,
        ReplayConfig(start_ms=middle_ms - 300_000, end_ms=middle_ms - 200_000, progress=False),
    )

    assert early.to_pylist() == expected_sequences(before) and early_summary.messages == len(before)
    assert late.to_pylist() == expected_sequences(after) and late_summary.messages == len(after)
    assert nothing.num_rows == 0


def test_the_last_batch_of_a_partition_is_not_lost(settings: Settings) -> None:
    """Sent in one go, a user's events form one record batch at the end of its partition;
    Tansu's watermark stops at that batch's first record."""
    events = history(50, 1, 400)
    one_user = pa.Table.from_pylist(
        [{**e, "user_id": "u-last"} for e in events.to_pylist()], schema=events.schema
    )
    producer = EventProducer(settings)
    producer.send_batch(one_user.combine_chunks().to_batches()[0])
    producer.flush()

    consumer = Consumer(client_config(settings, **{"group.id": "watermarks"}))
    highs = [consumer.get_watermark_offsets(TopicPartition(settings.events_topic, p), timeout=10)[1]
             for p in range(settings.partitions)]  # fmt: skip
    consumer.close()
    table, summary = replay(settings, QUIET)

    assert summary.messages == len(one_user) and len(table["event_time"][0]) == len(one_user)
    # On Tansu the watermarks sum to 1 here (the batch's first offset + 1), on Kafka to 400.
    assert sum(highs) in (1, len(one_user))


def test_ends_at_the_reported_partition_ends_without_an_idle_wait(settings: Settings) -> None:
    """The broker's end-of-partition reports end the replay; idle_s is only a fallback,
    so a long one must not be waited for (Tansu's last batch included)."""
    events = history(100, 3, 1_500)
    send(settings, events)

    began = time.monotonic()
    table, summary = replay(settings, ReplayConfig(progress=False, idle_s=30.0))

    assert time.monotonic() - began < 10.0
    assert summary.messages == len(events) and table.to_pylist() == expected_sequences(events)


def test_export_round_trip(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = history(200, 2, 1_000)
    send(settings, events)
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "sequences.parquet"

    assert main(["export", "--out", str(out), "--start", "2000-01-01"]) == 0

    assert read_sequences(out).to_pylist() == expected_sequences(events)


def test_cdnow_arrives_whole_and_replays_to_its_customers(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)

    assert main(["produce", "--dataset", "cdnow"]) == 0
    table, summary = replay(settings, QUIET)

    assert summary.messages == 69_659 and summary.duplicates == 0 and summary.dead_letters == 0
    assert table.num_rows == 23_570
    first = table.slice(0, 1).to_pylist()[0]
    assert (
        first["user_id"] == "00001"
        and first["action"][0] == "purchase"
        and first["value"][0] == 11.77
    )
