"""Any Kafka: librdkafka properties from the environment or a properties file reach every
client, secrets never show, and topics get the replication factor and retention set."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource

from stream.broker import (
    BrokerError,
    EmbeddedBroker,
    check_reachable,
    client_config,
    consumer_config,
    ensure_topics,
    producer_config,
)
from stream.config import ConfigError, Settings, load_settings

SECRET = "hunter2-do-not-print"


def with_environment(settings: Settings) -> Settings:
    """The same settings, read again with the environment as it is now."""
    return load_settings(**settings.model_dump(exclude={"kafka_properties"}))


def test_a_kafka_variable_reaches_every_client_and_messages_still_flow(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAFKA_CLIENT_ID", "beat-platform-team")
    monkeypatch.setenv("KAFKA_SOCKET_KEEPALIVE_ENABLE", "true")
    settings = with_environment(settings)
    wanted = {"client.id": "beat-platform-team", "socket.keepalive.enable": "true"}
    assert settings.kafka_properties == wanted
    for config in (client_config(settings), producer_config(settings),
                   consumer_config(settings, "some-group")):
        assert wanted.items() <= config.items()
    # ... but beatstream's own settings of a kind of client still win.
    assert producer_config(settings)["enable.idempotence"] is True

    producer = Producer(producer_config(settings))
    producer.produce(settings.events_topic, b"value", key=b"user", partition=0)
    assert producer.flush(10) == 0
    consumer = Consumer(consumer_config(settings, f"reader-{uuid.uuid4().hex}"))
    try:
        consumer.assign([TopicPartition(settings.events_topic, 0, 0)])
        message = consumer.poll(10)
        assert message is not None and message.error() is None
        assert (message.key(), message.value()) == (b"user", b"value")
    finally:
        consumer.close()
    # Child processes (workers) get the same properties.
    assert '"client.id": "beat-platform-team"' in settings.to_env()["BEAT_KAFKA_PROPERTIES"]


def test_a_properties_file_is_read_and_a_variable_wins_over_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = tmp_path / "client.properties"
    file.write_text(
        "# the platform team's cluster\n"
        "security.protocol=SASL_SSL\n"
        "sasl.mechanism: PLAIN\n"
        "! a Java comment\n"
        "sasl.username = beat\n"
        f"sasl.password={SECRET}\n"
    )
    monkeypatch.setenv("BEAT_KAFKA_PROPERTIES_FILE", str(file))
    monkeypatch.setenv("KAFKA_SASL_USERNAME", "beat-override")
    assert load_settings().kafka_properties == {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "PLAIN",
        "sasl.username": "beat-override",
        "sasl.password": SECRET,
    }


def test_secrets_are_masked_in_the_settings_the_log_and_the_error(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("KAFKA_SASL_MECHANISM", "PLAIN")
    monkeypatch.setenv("KAFKA_SASL_USERNAME", "beat")
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", SECRET)
    with EmbeddedBroker() as broker:
        port = broker.port
    settings = load_settings(bootstrap_servers=f"127.0.0.1:{port}")  # nothing listens there
    assert settings.kafka_properties["sasl.password"] == SECRET  # the clients get it
    assert SECRET not in repr(settings) and SECRET not in str(settings)
    shown = repr(settings)
    assert "'sasl.password': '***'" in shown and "'sasl.username': 'beat'" in shown
    with caplog.at_level(logging.DEBUG), pytest.raises(BrokerError) as caught:
        check_reachable(settings, timeout_s=0.5)
    for said in (caplog.text, str(caught.value)):
        assert "'sasl.password': '***'" in said and SECRET not in said


def test_a_secret_librdkafka_refuses_is_not_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_SSL_KEY_PASSWORD", SECRET)
    monkeypatch.setenv("KAFKA_SSL_KEY_LOCATION", "/nowhere/client.key")
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SSL")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "KAFKA_SSL_KEY_LOCATION" in str(caught.value) and SECRET not in str(caught.value)


def test_topics_get_the_replication_factor_and_retention_asked_for() -> None:
    # Tansu records any replication factor (a single broker, listed once per replica),
    # so the test needs its own Tansu rather than whatever broker the suite runs on.
    with EmbeddedBroker() as broker:
        settings = load_settings(
            bootstrap_servers=broker.bootstrap_servers,
            replication_factor=3,
            retention_ms=86_400_000,
        )
        ensure_topics(settings)
        admin = AdminClient(client_config(settings))
        topics = admin.list_topics(timeout=10).topics
        for topic in (settings.events_topic, settings.windows_topic, settings.embeddings_topic,
                      settings.repartition_topic, settings.dead_letter_topic):
            assert {len(p.replicas) for p in topics[topic].partitions.values()} == {3}, topic
        described = admin.describe_configs([
            ConfigResource("topic", settings.events_topic),
            ConfigResource("topic", settings.windows_topic),
        ])
        events, windows = (future.result(10) for future in described.values())
        assert events["retention.ms"].value == "86400000"
        assert windows["cleanup.policy"].value == "compact"
