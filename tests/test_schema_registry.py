"""The Confluent framing as Confluent's own serializers use the schema registry: the full
schema registered by writers only, read by id, basic auth; against confluent-kafka's
in-process registry (mock://) and, for auth, a stub that checks what the client sends."""

from __future__ import annotations

import base64
import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext
from pydantic import SecretStr

from stream.codec import AvroCodec, registry_client, schema_text
from stream.config import ConfigError, SchemaRegistry, load_settings
from stream.event_columns import EventDecoder
from tests.test_codec import EVENT

VALUE = SerializationContext("beat.events", MessageField.VALUE)


@pytest.fixture
def url() -> str:
    return f"mock://registry-{uuid.uuid4().hex[:8]}"  # a registry of this test's own


def test_the_full_schema_is_registered_with_logical_types_and_defaults(url: str) -> None:
    AvroCodec("behavior_event", "beat.events", url).encode(EVENT)

    registered = json.loads(
        registry_client(url).get_latest_version("beat.events-value").schema.schema_str
    )
    assert registered == json.loads(schema_text("behavior_event"))
    fields = {f["name"]: f for f in registered["fields"]}
    assert fields["event_time"]["type"]["logicalType"] == "timestamp-millis"
    assert fields["property"]["default"] is None and fields["attributes"]["default"] == {}
    assert "doc" in registered


def test_a_reader_reads_by_the_writers_id(url: str) -> None:
    writer = AvroCodec("behavior_event", "beat.events", url)
    payload = writer.encode(EVENT)
    reader = AvroCodec("behavior_event", "beat.events", SchemaRegistry(url))
    assert reader.decode(payload) == EVENT
    assert EventDecoder(reader).decode([payload]).event_id.to_pylist() == ["e-1"]
    assert registry_client(url).get_versions("beat.events-value") == [1]  # the writer's


def test_a_reader_alone_registers_nothing(url: str) -> None:
    reader = AvroCodec("behavior_event", "beat.events", SchemaRegistry(url))
    EventDecoder(reader).decode([b"\x00\x00\x00\x00\x07"])
    assert registry_client(url).get_subjects() == []


def test_without_auto_register_a_writer_needs_the_schema_registered(url: str) -> None:
    writer = AvroCodec("behavior_event", "beat.events", SchemaRegistry(url, auto_register=False))
    with pytest.raises(ConfigError, match="BEAT_SCHEMA_REGISTRY_AUTO_REGISTER"):
        writer.encode(EVENT)
    assert registry_client(url).get_subjects() == []
    # Registered by the team (here: Confluent's serializer), the writer uses its id.
    theirs = AvroSerializer(registry_client(url), schema_text("behavior_event"))(EVENT, VALUE)
    assert writer.encode(EVENT) == theirs


def test_confluent_serializer_and_this_codec_read_each_other(url: str) -> None:
    client = registry_client(url)
    theirs = AvroSerializer(client, schema_text("behavior_event"))(EVENT, VALUE)
    ours = AvroCodec("behavior_event", "beat.events", url)

    assert ours.decode(theirs) == EVENT
    decoder = EventDecoder(ours)  # the workers' vectorized path takes their schema's id
    assert decoder.header.tobytes() == theirs[:5]
    columns = decoder.decode([theirs])
    assert columns.user_id.to_pylist() == ["u42"] and not columns.rejected
    assert AvroDeserializer(client)(ours.encode(EVENT), VALUE) == EVENT


class _Registry(BaseHTTPRequestHandler):
    """A registry that wants basic auth beat:s3cret and registers every schema as id 7."""

    expected = "Basic " + base64.b64encode(b"beat:s3cret").decode()
    seen: list[str | None] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers["Content-Length"]))
        self.seen.append(self.headers["Authorization"])
        ok = self.headers["Authorization"] == self.expected
        body = {"id": 7} if ok else {"error_code": 40101, "message": "Unauthorized"}
        self.send_response(200 if ok else 401)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps(body).encode())

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def auth_registry() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _Registry)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_basic_auth_reaches_the_registry_and_a_refusal_hides_the_secret(
    auth_registry: str,
) -> None:
    good = SchemaRegistry(auth_registry, SecretStr("beat:s3cret"))
    assert AvroCodec("behavior_event", "beat.events", good).framing.header()[1:] == b"\0\0\0\x07"
    assert _Registry.seen[-1] == _Registry.expected

    bad = SchemaRegistry(auth_registry, SecretStr("beat:wrong-pass"))
    with pytest.raises(ConfigError, match="HTTP 401") as refused:
        AvroCodec("behavior_event", "beat.events", bad).framing.header()
    assert "wrong-pass" not in str(refused.value)
    assert "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO" in str(refused.value)


def test_registry_settings_keep_the_secret_out_of_sight(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCHEMA_REGISTRY_URL", "https://registry:8081")
    monkeypatch.setenv("SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO", "beat:s3cret")
    monkeypatch.setenv("BEAT_SCHEMA_REGISTRY_AUTO_REGISTER", "false")
    settings = load_settings()
    assert settings.schema_registry.auto_register is False
    assert "s3cret" not in repr(settings) and "s3cret" not in repr(settings.schema_registry)
    # Child processes (the demo's workers) get it.
    assert settings.to_env()["SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO"] == "beat:s3cret"
    monkeypatch.setenv("SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO", "no-colon-s3cret")
    with pytest.raises(ConfigError, match="user:password") as refused:
        load_settings()
    assert "s3cret" not in str(refused.value)
