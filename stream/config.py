"""Every setting of the platform in one place, read from the environment.

Each field can be set as ``BEAT_<FIELD>`` (for example ``BEAT_FLUSH_INTERVAL_MS=250``);
the settings shared with the rest of a Kafka shop keep their usual names:
``KAFKA_BOOTSTRAP_SERVERS``, ``SCHEMA_REGISTRY_URL`` and
``SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO``.

Any other librdkafka property reaches every Kafka client as ``KAFKA_<PROPERTY>`` (dots as
underscores: ``KAFKA_SECURITY_PROTOCOL=SASL_SSL`` is ``security.protocol``) or from a Java
``.properties`` file named by ``BEAT_KAFKA_PROPERTIES_FILE``; a variable wins over the file.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from pydantic import AliasChoices, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from model.config import BeatConfig

REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A setting is missing or wrong; the message names the setting and the fix."""


# user_info: the schema registry's "user:password" (basic.auth.user.info).
_SECRET_WORDS = ("password", "secret", "key", "sasl.jaas.config", "user_info", "user.info")


def is_secret(name: str) -> bool:
    """Whether a property or setting holds a secret, never to be logged or printed."""
    return any(word in name.lower() for word in _SECRET_WORDS)


def masked(properties: Mapping[str, str]) -> dict[str, str]:
    """Properties fit to log: every secret's value replaced by ***."""
    return {name: "***" if is_secret(name) else value for name, value in properties.items()}


def read_properties_file(path: Path) -> dict[str, str]:
    """A Java .properties file: key=value or key: value lines, # and ! comments, and a
    line ending in a backslash goes on in the next (as sasl.jaas.config often does)."""
    properties, pending = {}, ""
    for line in path.read_text().splitlines():
        line = pending + line.strip()
        if line.endswith("\\"):
            pending = line[:-1]
            continue
        pending = ""
        if line and line[0] not in "#!":
            key, value = (re.split(r"\s*[=:]\s*|\s+", line, maxsplit=1) + [""])[:2]
            properties[key] = value
    return properties


def kafka_environment_properties(environ: Mapping[str, str]) -> dict[str, str]:
    """librdkafka properties from KAFKA_<PROPERTY> variables (KAFKA_SASL_USERNAME:
    sasl.username), but for KAFKA_BOOTSTRAP_SERVERS, a setting of its own."""
    return {
        name[len("KAFKA_"):].lower().replace("_", "."): value
        for name, value in environ.items()
        if name.startswith("KAFKA_") and name != "KAFKA_BOOTSTRAP_SERVERS"
    }


def check_kafka_properties(properties: Mapping[str, str]) -> None:
    """Raise ValueError naming the property librdkafka refuses (unknown, or a bad value),
    checked by building a client of them that connects nowhere."""
    from confluent_kafka import KafkaException, Producer  # here: model/ never loads Kafka

    if "bootstrap.servers" in properties:
        raise ValueError(
            "bootstrap.servers is among the Kafka client properties: set "
            "KAFKA_BOOTSTRAP_SERVERS instead, and remove it from BEAT_KAFKA_PROPERTIES_FILE"
        )
    try:
        Producer({**properties, "log_level": 0})
    except KafkaException as err:
        reason = err.args[0].str()
        for name, value in properties.items():  # librdkafka quotes a refused value
            if is_secret(name) and value:
                reason = reason.replace(value, "***")
        # 'No such configuration property: "x"', 'Invalid value ... property "x"', or
        # 'ssl.key.location failed: ...' (a file it cannot read)
        named = re.search(r'property:? "([^"]+)"|([a-z][a-z0-9.]*) failed', reason)
        name = named and (named[1] or named[2])
        variable = "KAFKA_" + name.upper().replace(".", "_") if name else "KAFKA_*"
        raise ValueError(
            f"{reason}: fix or unset {variable} (or the line in BEAT_KAFKA_PROPERTIES_FILE); "
            "the properties are librdkafka's, listed in its CONFIGURATION.md"
        ) from None


class SchemaRegistry(NamedTuple):
    """How the Avro codecs reach the Confluent schema registry (the Settings fields
    schema_registry_*). user_info stays a SecretStr: a repr or log line shows ***."""

    url: str
    user_info: SecretStr | None = None
    auto_register: bool = True


class EventLimits(NamedTuple):
    """The largest event accepted (bytes of UTF-8 or Avro, attributes as entries); the
    Settings fields of the same names document each one."""

    max_event_bytes: int
    max_id_bytes: int
    max_action_bytes: int
    max_property_bytes: int
    max_attributes: int
    max_attribute_bytes: int


# Per window message beyond its rows and symbols: user_id and three Avro lengths and array
# ends, the framing header, and what Kafka adds to a record (key, headers, batch framing).
_WINDOW_OVERHEAD = 1_024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="BEAT_", extra="ignore", frozen=True, populate_by_name=True
    )

    # Kafka
    bootstrap_servers: str | None = Field(
        None,
        validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS", "BEAT_BOOTSTRAP_SERVERS"),
        description="host:port list of the Kafka cluster; unset: start the embedded broker",
    )
    schema_registry_url: str | None = Field(
        None,
        validation_alias=AliasChoices("SCHEMA_REGISTRY_URL", "BEAT_SCHEMA_REGISTRY_URL"),
        description="Confluent schema registry; unset: Avro single-object encoding",
    )
    # The registry's basic auth, "user:password" (Confluent's basic.auth.user.info).
    schema_registry_basic_auth_user_info: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices(
            "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO", "BEAT_SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO"
        ),
    )
    # Producers register the full schema under <topic>-value when it is not there yet, as
    # Confluent's serializers do (auto.register.schemas); off, where a team registers schemas
    # itself: producers only look its id up and stop if it is missing. Readers never register.
    schema_registry_auto_register: bool = True
    events_topic: str = "beat.events"
    windows_topic: str = "beat.windows"
    embeddings_topic: str = "beat.embeddings"
    dead_letter_topic: str = "beat.events.dlq"
    # Events a producer put on another partition than their key's (a partitioner other than
    # murmur2), moved by the stream workers to their key's partition: stream/partitioner.py.
    repartition_topic: str = "beat.events.repartition"
    partitions: int = Field(4, ge=1)
    # Consumer groups are "<prefix>-windows" and "<prefix>-encoders": one prefix per deployment.
    group_prefix: str = "beat"
    # Tansu (and some managed Kafkas) hold a fetch for its whole max wait; a short wait
    # keeps end-to-end latency low at the cost of more, mostly empty, fetch requests.
    fetch_max_wait_ms: int = Field(10, ge=1)
    # How long a worker waits for the broker (a delivery, an unreachable broker) before it
    # exits with an error, for its supervisor to restart it.
    broker_timeout_ms: int = Field(60_000, ge=1_000)
    # After SIGTERM, how long a worker waits for the broker to take the batch in hand before
    # it exits without committing it (code 3; a restart reads the batch again): a frozen
    # broker must not keep a stopped worker alive for broker_timeout_ms.
    stop_grace_ms: int = Field(3_000, ge=0)
    # A new consumer-group member waits about half the session timeout before it gets
    # partitions, and a dead member's partitions move after a whole one.
    session_timeout_ms: int = Field(6000, ge=1000)
    # Each worker serves Prometheus /metrics, /healthz and /readyz on this port (0: none);
    # workers sharing a host need a port each (stream/observability.py).
    metrics_port: int = Field(0, ge=0, le=65_535)
    # /healthz answers 503 once a worker's loop has shown no sign of life (a turn of the
    # loop, the end of a stage, a retry's wait) for this long: stuck, to be restarted. A
    # partition's state restore or one stage longer than this reads as stuck too.
    health_timeout_ms: int = Field(60_000, ge=1_000)
    # librdkafka properties of every client (security.protocol, sasl.*, ssl.*, client.id):
    # the file's, then KAFKA_<PROPERTY> variables', then these (see the module docstring).
    kafka_properties_file: Path | None = None
    kafka_properties: dict[str, str] = Field(default_factory=dict)
    # Topics beatstream creates: replicas of each partition (1 suits the embedded broker,
    # 3 a production cluster), and how long beat.events keeps events (None: the broker's
    # log.retention, -1: forever). beat.windows and beat.embeddings are compacted.
    replication_factor: int = Field(1, ge=1)
    retention_ms: int | None = Field(None, ge=-1)

    # Stream workers: the rolling window
    max_events: int = Field(256, ge=1, le=65_536)  # a window's symbols are uint16
    window_days: float = Field(90.0, gt=0)
    flush_interval_ms: int = Field(100, ge=1)
    # Events further ahead of the worker's clock than this go to the dead-letter topic:
    # a wrong clock or unit (seconds for ms) would otherwise pin a window's newest event.
    future_tolerance_ms: int = Field(3_600_000, ge=0)
    # Events taken per batch at most (a batch is otherwise one flush interval of events).
    max_batch_events: int = Field(200_000, ge=1)
    # Where a stream worker keeps the windows of its partitions: "memory" (tests, small
    # deployments) or "rocksdb" (data_dir/state/..., for states larger than memory).
    state_store: Literal["memory", "rocksdb"] = "memory"
    data_dir: Path = REPO_ROOT / "data"
    # A stream worker's table of distinct (action, property) pairs: once it holds more than
    # this many (or twice what its windows used at the last reclaim), the pairs no stored
    # window uses are freed (a scan of the state), so ever-new properties cannot grow it
    # without end. Each pair costs about 300 bytes plus its strings twice (text and Avro).
    symbol_table_pairs: int = Field(100_000, ge=1_000)

    # Limits of one event (dead-lettered beyond them, with the setting to raise). They bound
    # the CPU one message can cost and, with max_events, the size of a window message.
    max_event_bytes: int = Field(65_536, ge=64)  # the whole message value
    max_id_bytes: int = Field(256, ge=1)  # user_id and event_id, each
    max_action_bytes: int = Field(256, ge=1)
    max_property_bytes: int = Field(1_024, ge=1)
    max_attributes: int = Field(64, ge=0)  # entries of the attributes map
    max_attribute_bytes: int = Field(16_384, ge=0)  # their keys and values together
    # What the broker accepts (Kafka's message.max.bytes, about 1 MB by default), and what
    # every beatstream producer is configured with: a window must fit (checked below).
    max_message_bytes: int = Field(1_000_000, ge=10_000)

    # Encoder workers
    # A model directory served as it is into the feature view user_embedding (the embedded
    # default); unset: the published versions of data_dir/models/ (stream/model_versions.py).
    model_dir: Path | None = None
    # A published version to serve (a shadow beside the current one); unset: the current
    # version, followed from one to the next without a restart.
    model_version: str | None = None
    # Window messages per consume call, and users per encode-and-write step.
    max_batch: int = Field(1024, ge=1)
    # Window messages an encoder takes into one batch at most while it is behind: of the
    # backlog it keeps only each user's newest window, so its work is bounded by users.
    read_ahead: int = Field(200_000, ge=1)
    # A partition whose newest event time seen lags the wall clock by more than this is
    # replayed history: its embeddings are as of that event time (stream/as_of.py).
    replay_lag_ms: int = Field(3_600_000, ge=0)
    # Windows per BEAT forward pass: small batches of similar length waste the least
    # padding; on CPU 16-32 measured fastest, on a GPU use hundreds.
    encode_batch: int = Field(32, ge=1)
    # Decode the next step's windows in a background thread while a step encodes; unset:
    # on CUDA (the host decodes while the GPU works), not on CPU (the thread takes the
    # model's CPU: 0.89x measured).
    decode_ahead: bool | None = None
    max_wait_ms: int = Field(50, ge=0)
    device: str = "cpu"
    # torch CPU threads; 0 lets torch choose. On a CPU shared with other workers, 1 is
    # faster overall: idle OpenMP threads spin and steal the others' cores.
    torch_threads: int = Field(0, ge=0)

    # Feast
    feature_repo: Path = REPO_ROOT / "feature_repo"
    # The online store: sqlite (embedded default), redis, or postgres (Feast's PostgreSQL
    # store at BEAT_POSTGRES_URL, whose pgvector answers lookalike search in production).
    online_store: Literal["sqlite", "redis", "postgres"] = "sqlite"
    redis_url: str = "127.0.0.1:6379"
    # Feast's key_ttl_seconds for Redis: a user's key expires this long after its last
    # write, so users gone for good leave the online store; unset keeps keys forever.
    # `beat refresh` can keep quiet users alive (README "Users gone for good").
    redis_key_ttl_seconds: int | None = Field(None, ge=1)
    feast_project: str = "beatstream"
    feast_data_dir: Path | None = Field(
        None, description="registry and sqlite store; unset: feature_repo/data"
    )
    # Embedding history for point-in-time reads (stream/offline_history.py): none keeps no
    # history (the embedded default); postgres appends every row at BEAT_POSTGRES_URL.
    offline_store: Literal["none", "postgres"] = "none"
    # A secret: it may hold a password (shown as *** in a repr or log line).
    postgres_url: SecretStr = SecretStr("postgresql://postgres@127.0.0.1:5432/postgres")
    # Feast's registry: file (registry.db under the data dir: the embedded default, one
    # writer) or postgres (Feast's SQL registry at BEAT_POSTGRES_URL, for deployments whose
    # many processes and hosts read one registry).
    feast_registry: Literal["file", "postgres"] = "file"

    @model_validator(mode="before")
    @classmethod
    def _gather_kafka_properties(cls, data: dict[str, Any]) -> dict[str, Any]:
        file = data.get("kafka_properties_file")
        if file and not Path(file).is_file():
            raise ValueError(
                f"BEAT_KAFKA_PROPERTIES_FILE={file} is not a file: point it at a Java "
                ".properties file of librdkafka properties, or unset it"
            )
        data["kafka_properties"] = {
            **(read_properties_file(Path(file)) if file else {}),
            **kafka_environment_properties(os.environ),
            **data.get("kafka_properties", {}),
        }
        return data

    @model_validator(mode="after")
    def _check_registry_user_info(self) -> Settings:
        user_info = self.schema_registry_basic_auth_user_info
        if user_info is not None and ":" not in user_info.get_secret_value():
            raise ValueError(  # never the value itself: it is a secret
                "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO must be user:password"
            )
        return self

    @model_validator(mode="after")
    def _check_kafka_properties(self) -> Settings:
        if self.kafka_properties:
            check_kafka_properties(self.kafka_properties)
        return self

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            yield name, masked(value) if name == "kafka_properties" else value

    @model_validator(mode="after")
    def _check_redis_key_ttl(self) -> Settings:
        # sqlite has no expiry: the setting would silently do nothing
        if self.redis_key_ttl_seconds is not None and self.online_store != "redis":
            raise ValueError("BEAT_REDIS_KEY_TTL_SECONDS applies to BEAT_ONLINE_STORE=redis "
                             "only (sqlite keys do not expire): unset it")
        return self

    @model_validator(mode="after")
    def _check_postgres_url(self) -> Settings:
        if not self.postgres_url.get_secret_value().startswith(("postgresql://", "postgres://")):
            raise ValueError("BEAT_POSTGRES_URL must be postgresql://user[:password]@host[:port]"
                             "/database, or postgresql://user@/database?host=/socket/dir "
                             "(read when BEAT_OFFLINE_STORE, BEAT_ONLINE_STORE or "
                             "BEAT_FEAST_REGISTRY is postgres)")
        return self

    @model_validator(mode="after")
    def _check_paths(self) -> "Settings":
        if not (self.feature_repo / "feature_store.yaml").is_file():
            raise ValueError(
                f"feature_repo={self.feature_repo} has no feature_store.yaml; "
                "point BEAT_FEATURE_REPO at the beatstream feature_repo/ folder"
            )
        return self

    @model_validator(mode="after")
    def _check_window_fits(self) -> Settings:
        if self.largest_window_bytes > self.max_message_bytes:
            raise ValueError(
                f"a window of BEAT_MAX_EVENTS={self.max_events} events with distinct actions of "
                f"BEAT_MAX_ACTION_BYTES={self.max_action_bytes} and properties of "
                f"BEAT_MAX_PROPERTY_BYTES={self.max_property_bytes} could take "
                f"{self.largest_window_bytes:,} bytes, over "
                f"BEAT_MAX_MESSAGE_BYTES={self.max_message_bytes:,}: lower one of the first three, "
                "or raise the broker's message.max.bytes and this setting"
            )
        return self

    @property
    def largest_window_bytes(self) -> int:
        """A bound on the size of a window message under these limits: 16 bytes a row, and
        per distinct (action, property) pair its two strings with their varint lengths."""
        per_symbol = self.max_action_bytes + self.max_property_bytes + 2 * 10 + 1
        return self.max_id_bytes + self.max_events * (16 + per_symbol) + _WINDOW_OVERHEAD

    @property
    def event_limits(self) -> EventLimits:
        return EventLimits(**{name: getattr(self, name) for name in EventLimits._fields})

    def to_env(self) -> dict[str, str]:
        """These settings as environment variables, for child processes."""
        # The properties go merged, as JSON: a child reads no file and they win over its
        # KAFKA_<PROPERTY> variables.
        fields = self.model_dump(exclude={"kafka_properties", "kafka_properties_file",
                                          "schema_registry_basic_auth_user_info",
                                          "postgres_url"})
        env = {
            f"BEAT_{name.upper()}": str(value)
            for name, value in fields.items()
            if value is not None
        }
        if self.kafka_properties:
            env["BEAT_KAFKA_PROPERTIES"] = json.dumps(self.kafka_properties)
        if self.bootstrap_servers:
            env["KAFKA_BOOTSTRAP_SERVERS"] = self.bootstrap_servers
        if self.schema_registry_url:
            env["SCHEMA_REGISTRY_URL"] = self.schema_registry_url
        env["BEAT_POSTGRES_URL"] = self.postgres_url.get_secret_value()
        if self.schema_registry_basic_auth_user_info:
            user_info = self.schema_registry_basic_auth_user_info.get_secret_value()
            env["SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO"] = user_info
        return env

    @property
    def schema_registry(self) -> SchemaRegistry | None:
        """The registry the codecs use; None: single-object encoding."""
        if not self.schema_registry_url:
            return None
        return SchemaRegistry(self.schema_registry_url, self.schema_registry_basic_auth_user_info,
                              self.schema_registry_auto_register)

    @property
    def stream_group(self) -> str:
        return f"{self.group_prefix}-windows"

    @property
    def encoder_group(self) -> str:
        return f"{self.group_prefix}-encoders"

    @property
    def window_ms(self) -> int:
        return int(self.window_days * 86_400_000)


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, with explicit overrides winning.

    Raises ConfigError naming each bad setting as its environment variable.
    """
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as err:
        problems = []
        for e in err.errors():
            field = ".".join(str(p) for p in e["loc"])
            where = f"BEAT_{field.upper()}: " if field else ""
            shown = field and not is_secret(field)  # a secret's value is never printed
            problems.append(f"  {where}{e['msg']}" + (f" (got {e['input']!r})" if shown else ""))
        raise ConfigError("invalid beatstream settings:\n" + "\n".join(problems)) from None


def check_model_fits(settings: Settings, model: BeatConfig, directory: Path | None = None) -> None:
    """The model an encoder serves must read the windows the stream workers keep
    (BEAT_MAX_EVENTS, BEAT_WINDOW_DAYS) and write the embedding the Feast feature view
    stores (model.config.EMBEDDING_SIZE). directory: where the model was loaded from, when not
    BEAT_MODEL_DIR. Raises ConfigError naming each setting and the fix.
    """
    from model.config import EMBEDDING_SIZE

    where = f"the model in {directory or settings.model_dir}"
    problems = []
    if model.max_events != settings.max_events:
        problems.append(
            f"BEAT_MAX_EVENTS is {settings.max_events}, but {where} reads the newest "
            f"{model.max_events} events of a window: set BEAT_MAX_EVENTS={model.max_events} "
            "for the stream and encoder workers, or serve a model with "
            f"max_events={settings.max_events}"
        )
    if model.window_days != settings.window_days:
        problems.append(
            f"BEAT_WINDOW_DAYS is {settings.window_days:g}, but {where} covers "
            f"{model.window_days:g} days: set BEAT_WINDOW_DAYS={model.window_days:g} for the "
            "stream and encoder workers, or serve a model with "
            f"window_days={settings.window_days:g}"
        )
    if model.embedding_size != EMBEDDING_SIZE:
        problems.append(
            f"{where} writes {model.embedding_size}-float embeddings, but the feature view "
            f"user_embedding stores {EMBEDDING_SIZE} (model.config.EMBEDDING_SIZE): serve a model "
            f"with embedding_size={EMBEDDING_SIZE} (BEAT_MODEL_DIR)"
        )
    if problems:
        raise ConfigError("the model does not fit these settings:\n" + "\n".join(
            f"  {problem}" for problem in problems
        ))
