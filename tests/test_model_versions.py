"""Model versions that never mix: publish, switch under load, shadow, backfill.

Two tiny models (different seeds, so different versions and vectors) against the real
broker and the real Feast stores. Windows flow into beat.windows from a WindowFeed while
versions are published and switched; at the end every view holds rows of its own version
only, each user's row describes its final window, and the service readers pin returns the
current version's vectors.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from model import init_model_dir
from stream.broker import SEAL_KEY, PartitionReader, client_config, producer_config
from stream.cli import main
from stream.codec import AvroCodec
from stream.config import Settings, load_settings
from stream.encoder_worker import load_worker
from stream.feast_sink import FeatureSink
from stream.model_versions import (
    CURRENT_SERVICE,
    ModelVersions,
    slug,
    version_group,
    view_name,
)
from stream.publish import publish, switch
from stream.refresh import latest_windows

from conftest import ACTIONS, WindowFeed, all_final_in_feast, running, wait_for

USERS = 24


@pytest.fixture
def versioned(settings: Settings, tmp_path: Path) -> tuple[Settings, Path, Path]:
    """Settings with no BEAT_MODEL_DIR (encoders serve published versions), and two models."""
    one, two = tmp_path / "one", tmp_path / "two"
    init_model_dir(one, "tiny", ACTIONS, ["web"], seed=1)
    init_model_dir(two, "tiny", ACTIONS, ["web"], seed=2)
    return settings.model_copy(update={
        "max_wait_ms": 20, "torch_threads": 1, "max_events": 64,  # the tiny preset reads 64
    }), one, two


def view_rows(settings: Settings, version: str, users: list[str]) -> dict[str, list]:
    return FeatureSink(settings, view_name(version), deploy=False).read(users)


def service_rows(settings: Settings, users: list[str]) -> dict[str, list]:
    """What a reader pinned to the current service gets (a fresh store: no cached registry)."""
    store = FeatureSink(settings, deploy=False).store
    return store.get_online_features(
        features=store.get_feature_service(CURRENT_SERVICE),
        entity_rows=[{"user_id": u} for u in users],
    ).to_dict()


def assert_only(rows: dict[str, list], version: str) -> None:
    assert set(rows["model_version"]) == {version}
    assert all(e is not None for e in rows["embedding"])


def test_publish_while_encoding_switches_between_batches_and_never_mixes(versioned) -> None:
    settings, one, two = versioned
    with WindowFeed(settings, users=USERS) as feed:
        first = publish(settings, one, progress=False)
        assert first.current and first.backfill.users == USERS
        assert first.backfill.refreshed == USERS  # every user's newest window, once
        worker = load_worker(settings)  # follows the current version
        users = sorted(feed.times)
        with running(worker):
            wait_for(lambda: worker.stats.users > 2 * USERS, 60, "v1 encoding live windows")
            assert set(service_rows(settings, users)["model_version"]) == {first.version}
            second = publish(settings, two, progress=False)  # while windows flow
            assert second.current and second.backfill.users == USERS
            wait_for(lambda: worker.encoder.model_version == second.version, 30,
                     "the running worker switched")
            assert worker.group == version_group(settings, second.version)
            written = worker.stats.users
            wait_for(lambda: worker.stats.users > written + USERS, 60, "v2 encoding live windows")
            feed.__exit__()
            final = feed.final()
            v2 = FeatureSink(settings, view_name(second.version), deploy=False)
            wait_for(lambda: all_final_in_feast(v2, final), 60, "every final window in v2's view")
    assert_only(view_rows(settings, first.version, users), first.version)
    assert_only(view_rows(settings, second.version, users), second.version)
    served = service_rows(settings, users)
    assert_only(served, second.version)
    np.testing.assert_array_equal(
        np.array(served["embedding"]), np.array(v2.read(users)["embedding"])
    )
    assert ModelVersions(settings).current() == second.version
    # publishing the current version again changes nothing (a backfill would race its encoders)
    assert publish(settings, two, progress=False).backfill is None


def test_shadow_runs_beside_the_current_version_and_switch_is_one_command(
    versioned, redis_url: str
) -> None:
    settings, one, two = versioned
    settings = settings.model_copy(update={"online_store": "redis", "redis_url": redis_url})
    with WindowFeed(settings, users=USERS) as feed:
        first = publish(settings, one, progress=False)
        shadow = publish(settings, two, shadow=True, progress=False)
        assert not shadow.current and ModelVersions(settings).current() == first.version
        users = sorted(feed.times)
        assert set(service_rows(settings, users)["model_version"]) == {first.version}
        live = load_worker(settings)
        pinned = load_worker(settings.model_copy(update={"model_version": shadow.version}))
        assert pinned.follow is None
        with running(live), running(pinned):
            for worker in (live, pinned):
                wait_for(lambda w=worker: w.stats.users > USERS, 60, "both versions encoding")
            feed.__exit__()
            final = feed.final()
            for version in (first.version, shadow.version):
                sink = FeatureSink(settings, view_name(version), deploy=False)
                wait_for(lambda s=sink: all_final_in_feast(s, final), 60, f"{version} caught up")
            assert switch(settings, slug(shadow.version)) == shadow.version
            wait_for(lambda: live.encoder.model_version == shadow.version, 30, "the switch")
    assert_only(view_rows(settings, first.version, users), first.version)
    assert_only(view_rows(settings, shadow.version, users), shadow.version)
    assert_only(service_rows(settings, users), shadow.version)


def test_backfill_reads_each_users_newest_window_once_and_commits_the_versions_group(
    versioned,
) -> None:
    settings, one, _ = versioned
    feed = WindowFeed(settings, users=0)
    codec = AvroCodec("user_window", settings.windows_topic)
    producer = Producer(producer_config(settings))
    now_ms = int(time.time() * 1000)
    for step in range(3):  # three windows per user, the newest last; Tansu never compacts
        for i in range(10):
            user = f"user-{i}"
            feed.times[user] = [now_ms - 10_000 + k for k in range(step + i % 3 + 1)]
            producer.produce(settings.windows_topic, codec.encode(
                feed.window(user).to_record(now_ms)), user.encode(), partition=i % 2)
    producer.produce(settings.windows_topic, None, b"user-9", partition=1)  # deleted
    producer.produce(settings.windows_topic, None, SEAL_KEY, partition=0)
    producer.flush(10)
    del feed.times["user-9"]

    with PartitionReader(settings) as reader:
        batches = list(latest_windows(reader, settings.windows_topic, 0, step=2))
    assert [len(b.latest) for b in batches] == [2, 2, 1]  # a step at a time, newest only
    assert batches[-1].ends == {0: 16}  # 15 windows and the seal read
    # Two users a step, each step's successor decoded while it encodes (as on a GPU).
    ahead = settings.model_copy(update={"max_batch": 2, "decode_ahead": True})
    done = publish(ahead, one, shadow=True, progress=False)

    assert (done.backfill.users, done.backfill.refreshed) == (9, 9)
    final = feed.final()
    stored = view_rows(settings, done.version, sorted(final))
    assert stored["event_count"] == [final[u][0] for u in sorted(final)]
    assert_only(stored, done.version)
    group = version_group(settings, done.version)
    reader = Consumer(client_config(settings, **{"group.id": group}))
    try:
        committed = reader.committed(
            [TopicPartition(settings.windows_topic, p) for p in (0, 1)], timeout=10
        )
    finally:
        reader.close()
    assert [tp.offset for tp in committed] == [16, 16]  # where its encoders carry on


def test_a_versions_view_refuses_rows_of_another_version(versioned) -> None:
    settings, one, two = versioned
    done = publish(settings, one, shadow=True, progress=False)
    sink = FeatureSink(settings, view_name(done.version), deploy=False)
    feed = WindowFeed(settings, users=0)
    feed.times = {"x": [1_000, 2_000]}
    other = load_worker(settings.model_copy(update={"model_dir": two}))
    rows = other.encode([feed.window("x").event_window()], ["x"], np.array([3_000]))
    with pytest.raises(ValueError, match="cannot go to the feature view"):
        sink.write(rows)


def test_version_names_that_cannot_be_told_apart_are_refused(tmp_path: Path) -> None:
    versions = ModelVersions(load_settings(data_dir=tmp_path))
    (tmp_path / "model").mkdir()
    with pytest.raises(ValueError, match="cannot name a folder"):
        versions.add(tmp_path / "model", "../v1")
    versions.add(tmp_path / "model", "Beat-V1")
    with pytest.raises(ValueError, match="would share the feature view user_embedding_beat_v1"):
        versions.add(tmp_path / "model", "beat.v1")
    assert versions.published() == ["Beat-V1"] and versions.current() is None


def test_switching_to_a_version_not_published_is_said_in_a_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    monkeypatch.setenv("BEAT_DATA_DIR", str(tmp_path))
    assert main(["model", "switch", "beat-tiny-00000000"]) == 2
    err = capsys.readouterr().err.strip()
    where = tmp_path / "models"
    assert err == (f"model version 'beat-tiny-00000000' is not published here ({where}); "
                   "published: none")
