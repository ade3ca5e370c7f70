"""`beat broker`: one embedded broker that separate `beat` commands find through its record."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stream.config import ConfigError, load_settings
from stream.local_broker import BrokerRecord, with_recorded_broker, write_record

REPO = Path(__file__).resolve().parent.parent


def beat(data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """A `beat` command in a process of its own, as a newcomer types it: no Kafka setting."""
    return in_background(data_dir, *args).finished()


class Started(subprocess.Popen):
    """A `beat` command started; finished() waits for it as subprocess.run would."""

    def finished(self) -> subprocess.CompletedProcess:
        stdout, stderr = self.communicate(timeout=120)
        return subprocess.CompletedProcess(self.args, self.returncode, stdout, stderr)


def in_background(data_dir: Path, *args: str) -> Started:
    """beat(), not waited for: a command that runs while another does (each spends a second or
    two importing; the pairs run side by side do not depend on each other)."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("KAFKA_")}
    env.update(BEAT_DATA_DIR=str(data_dir), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return Started([sys.executable, "-m", "stream.cli", *args], env=env, cwd=REPO,
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.broker
@pytest.mark.training
def test_produce_then_pretrain_in_separate_commands(tmp_path: Path) -> None:
    data = tmp_path / "data"
    started = beat(data, "broker", "start")
    assert started.returncode == 0, started.stderr
    assert "memory-only" in started.stdout
    record = json.loads((data / "broker.json").read_text())
    try:
        produced = beat(data, "produce", "--synthetic", "--users", "80", "--history-days", "100",
                        "--seed", "3")
        assert produced.returncode == 0, produced.stderr
        out = tmp_path / "run"
        pretraining = in_background(data, "pretrain", "--out", str(out), "--preset", "tiny",
                                    "--steps", "2", "--batch-size", "8", "--warmup-steps", "1",
                                    "--checkpoint-every", "2")
        status = beat(data, "broker", "status")  # while pretrain reads the broker
        pretrained = pretraining.finished()
        assert pretrained.returncode == 0, pretrained.stderr
        report = json.loads((out / "report.json").read_text())
        assert report["load"]["events"] == int(produced.stdout.split()[1])
        assert status.returncode == 0 and record["bootstrap_servers"] in status.stdout
    finally:
        stopped = beat(data, "broker", "stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert not (data / "broker.json").exists()
    assert beat(data, "broker", "status").returncode == 1
    # Gone: the broker, reparented when `broker start` exited, is a zombie until the
    # machine's init reaps it (within about a second here).
    deadline = time.monotonic() + 30
    with pytest.raises(ProcessLookupError):
        while time.monotonic() < deadline:
            os.kill(record["pid"], 0)
            time.sleep(0.1)


@pytest.mark.broker
def test_a_broker_that_died_is_said_with_the_fix(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert beat(data, "broker", "start").returncode == 0
    pid = json.loads((data / "broker.json").read_text())["pid"]
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    producing = in_background(data, "produce", "--synthetic", "--users", "5", "--history-days", "1")
    assert beat(data, "broker", "status").returncode == 1  # both only read the record
    produced = producing.finished()
    assert produced.returncode == 2
    assert "not running" in produced.stderr and "beat broker start" in produced.stderr
    forgot = beat(data, "broker", "stop")
    assert forgot.returncode == 0 and "not running" in forgot.stdout
    assert not (data / "broker.json").exists()


def test_an_explicit_kafka_setting_wins_over_the_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    explicit = load_settings(data_dir=tmp_path, bootstrap_servers="kafka-1:9092")
    write_record(explicit, BrokerRecord("127.0.0.1:1", pid=os.getpid()))
    assert with_recorded_broker(explicit).bootstrap_servers == "kafka-1:9092"
    # Without the setting, the record is read, and a broker not listening there is refused.
    with pytest.raises(ConfigError, match="not running"):
        with_recorded_broker(load_settings(data_dir=tmp_path))
