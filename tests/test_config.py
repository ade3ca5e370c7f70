"""Config errors name the setting and the fix; --loglevel sets the log level. No broker."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from model import init_model_dir
from model.config import EMBEDDING_SIZE, BeatConfig
from stream.cli import log_handler, main
from stream.config import ConfigError, check_model_fits, load_settings


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No beatstream variables from the caller's environment; Feast files and the data dir
    (where `beat broker` records a broker) under tmp_path."""
    for name in ("KAFKA_BOOTSTRAP_SERVERS", "SCHEMA_REGISTRY_URL", "BEAT_MODEL_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BEAT_FEAST_DATA_DIR", str(tmp_path / "feast"))
    monkeypatch.setenv("BEAT_DATA_DIR", str(tmp_path / "data"))
    return monkeypatch


@pytest.fixture
def root_level() -> Iterator[None]:
    level = logging.getLogger().level
    yield
    logging.getLogger().setLevel(level)


@pytest.mark.parametrize(
    "variable, value, says",
    [
        ("BEAT_PARTITIONS", "0", "greater than or equal to 1"),
        ("BEAT_STATE_STORE", "disk", "'memory' or 'rocksdb'"),
        ("BEAT_MAX_EVENTS", "many", "valid integer"),
        ("BEAT_FEATURE_REPO", "/nowhere", "point BEAT_FEATURE_REPO at the beatstream"),
        ("BEAT_REPLICATION_FACTOR", "0", "greater than or equal to 1"),
        ("BEAT_SYMBOL_TABLE_PAIRS", "10", "greater than or equal to 1000"),
        ("KAFKA_BOGUS_PROPERTY", "1", 'No such configuration property: "bogus.property"'),
        ("KAFKA_SECURITY_PROTOCOL", "SASL", 'Invalid value "SASL"'),
        ("BEAT_KAFKA_PROPERTIES_FILE", "/nowhere.properties", "Java .properties file"),
        ("BEAT_REDIS_KEY_TTL_SECONDS", "0", "greater than or equal to 1"),
        ("BEAT_REDIS_KEY_TTL_SECONDS", "1d", "valid integer"),
        ("BEAT_REDIS_KEY_TTL_SECONDS", "86400", "applies to BEAT_ONLINE_STORE=redis only"),
    ],
)
def test_a_bad_setting_is_named_with_what_is_wrong(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, variable: str, value: str,
    says: str,
) -> None:
    clean_env.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert variable in str(caught.value) and says in str(caught.value)
    assert main(["feast-config"]) == 2
    assert variable in capsys.readouterr().err


def test_commands_that_need_a_broker_say_which_variable_is_missing(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    assert main(["produce", "--synthetic", "--limit", "1"]) == 2
    assert "KAFKA_BOOTSTRAP_SERVERS is not set" in capsys.readouterr().err


def test_an_encoder_without_a_model_names_beat_model_dir(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    clean_env.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")  # never reached
    assert main(["refresh"]) == 2
    assert "BEAT_MODEL_DIR" in capsys.readouterr().err


def test_the_model_must_read_the_windows_the_workers_keep(clean_env: pytest.MonkeyPatch) -> None:
    settings = load_settings()  # 256 events, 90 days
    check_model_fits(settings, BeatConfig.preset("small"))  # the same window: fits
    with pytest.raises(ConfigError) as caught:
        check_model_fits(settings, BeatConfig.preset("tiny"))  # 64 events
    assert "BEAT_MAX_EVENTS is 256" in str(caught.value)
    assert "set BEAT_MAX_EVENTS=64" in str(caught.value)
    assert "BEAT_WINDOW_DAYS" not in str(caught.value)
    with pytest.raises(ConfigError, match="set BEAT_WINDOW_DAYS=30 "):
        check_model_fits(settings, BeatConfig(window_days=30.0))
    wider = BeatConfig(embedding_size=EMBEDDING_SIZE * 2)
    with pytest.raises(ConfigError, match=f"user_embedding stores {EMBEDDING_SIZE}"):
        check_model_fits(settings, wider)


def test_beat_refresh_stops_on_a_model_that_does_not_fit(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    init_model_dir(tmp_path / "model", "tiny", ["login"], ["web"])
    clean_env.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")  # never reached
    assert main(["refresh", "--model-dir", str(tmp_path / "model")]) == 2
    assert "set BEAT_MAX_EVENTS=64" in capsys.readouterr().err


@pytest.mark.parametrize("name, level", [("debug", logging.DEBUG), ("warn", logging.WARNING),
                                         ("crit", logging.CRITICAL)])  # fmt: skip
def test_loglevel_sets_the_level_of_the_command(
    clean_env: pytest.MonkeyPatch, root_level: None, name: str, level: int,
    capsys: pytest.CaptureFixture,
) -> None:
    assert main(["feast-config", "--loglevel", name]) == 0
    assert logging.getLogger().level == level
    assert "online_store" in capsys.readouterr().out


def test_json_log_lines_are_one_object_each_with_the_exception() -> None:
    handler = log_handler("json")
    try:
        raise ValueError("bad window")
    except ValueError:
        record = logging.LogRecord(
            "stream.encoder_worker", logging.ERROR, __file__, 1, "gave up on %d users", (3,),
            sys.exc_info(),
        )
    line = json.loads(handler.format(record))
    assert line["levelname"] == "ERROR" and line["name"] == "stream.encoder_worker"
    assert line["message"] == "gave up on 3 users" and "ValueError: bad window" in line["exc_info"]
    assert line["timestamp"].endswith("+00:00")
    assert log_handler("text").format(record).split(" ", 2)[2].startswith(
        "ERROR stream.encoder_worker: gave up on 3 users"
    )


def test_every_model_preset_writes_the_feature_views_embedding(
    clean_env: pytest.MonkeyPatch,
) -> None:
    from model.config import PRESETS
    from stream.feast_sink import FEATURE_VIEW, feast_objects

    sizes = {name: BeatConfig.preset(name).embedding_size for name in PRESETS}
    assert set(sizes.values()) == {EMBEDDING_SIZE}, sizes
    view = next(o for o in feast_objects(load_settings()) if o.name == FEATURE_VIEW)
    assert view.tags["embedding_size"] == str(EMBEDDING_SIZE)


def test_live_synthetic_events_without_a_rate_say_which_option(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    clean_env.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")  # never reached
    assert main(["produce", "--synthetic", "--limit", "100"]) == 2
    assert "add --rate EVENTS_PER_S" in capsys.readouterr().err


@pytest.mark.parametrize("broken", ["empty", "corrupt"])
def test_a_broken_model_directory_is_said_in_a_line(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path, broken: str
) -> None:
    model_dir = tmp_path / "model"
    init_model_dir(model_dir, "tiny", ["a"], ["p"])
    if broken == "empty":
        for file in model_dir.iterdir():
            file.unlink()
    else:
        (model_dir / "model.safetensors").write_bytes(b"not safetensors")
    clean_env.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")  # never reached
    assert main(["encode", "--model-dir", str(model_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"BEAT_MODEL_DIR={model_dir} is not a usable")
