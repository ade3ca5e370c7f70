"""docker/compose.yaml, run without a Docker engine: each beatstream service's own command
and environment, as host processes against this machine's real broker, Redis and PostgreSQL.

Only what a container would give differently changes: the services' host names and ports
(the broker, Redis, PostgreSQL, free loopback ports), /data (a folder per service, with the
named volumes shared as the file shares them), the project name (Redis and PostgreSQL are
shared with other tests) and the device (no GPU here). Everything else, down to the
healthchecks, is taken from the file. The schema registry is left out: this machine has no
Confluent-API registry (tests/test_schema_registry.py covers it with confluent-kafka's
mock:// registry).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
import yaml
from confluent_kafka import Producer

from stream.broker import producer_config
from stream.config import REPO_ROOT, load_settings
from stream.feast_server import free_port
from stream.model_versions import CURRENT_SERVICE

from conftest import embedded_broker, read_topic, wait_for

DOCKER = REPO_ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
METRICS_PORT = "9400"  # BEAT_METRICS_PORT in the file
FEATURE_SERVER_PORT = "6566"
IMAGE_ENVIRONMENT = {"BEAT_DATA_DIR": "/data"}  # the Dockerfile's ENV
IMAGE_ENTRYPOINT = ["beat"]  # the Dockerfile's ENTRYPOINT
BIN = Path(sys.executable).parent  # beat, feast and python of this environment


def compose_services() -> dict[str, dict]:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def with_defaults(value: str) -> str:
    """Compose's ${NAME:-default} interpolation, with nothing set."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


@dataclass
class HostStack:
    """The compose services as host processes, and what stands in for the containers."""

    root: Path
    bootstrap_servers: str
    project: str = field(default_factory=lambda: f"beat_compose_{uuid.uuid4().hex[:8]}")
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    ports: dict[str, dict[str, str]] = field(default_factory=dict)

    def data_dir(self, name: str, service: dict) -> Path:
        """The service's /data: its own folder, with its named volumes linked in."""
        data = self.root / name
        data.mkdir(parents=True, exist_ok=True)
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if target.startswith("/data/") and not (data / target[6:]).exists():
                shared = self.root / "volumes" / source
                shared.mkdir(parents=True, exist_ok=True)
                (data / target[6:]).symlink_to(shared)
        return data

    def environment(self, name: str, service: dict) -> dict[str, str]:
        self.ports.setdefault(name, {METRICS_PORT: str(free_port()),
                                     FEATURE_SERVER_PORT: str(free_port())})
        file_env = {k: with_defaults(str(v)) for k, v in service.get("environment", {}).items()}
        env = {**os.environ, **IMAGE_ENVIRONMENT, **file_env}
        env.pop("SCHEMA_REGISTRY_URL")  # no registry here (module doc)
        data = self.data_dir(name, service)
        env.update({
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap_servers,
            "BEAT_REDIS_URL": "127.0.0.1:6379",
            "BEAT_POSTGRES_URL": POSTGRES_URL,
            "BEAT_DATA_DIR": str(data),
            "BEAT_FEAST_DATA_DIR": env["BEAT_FEAST_DATA_DIR"].replace("/data", str(data), 1),
            "BEAT_FEAST_PROJECT": self.project,
            "BEAT_METRICS_PORT": self.ports[name][METRICS_PORT],
            "BEAT_DEVICE": "cpu",
        })
        return env

    def host_text(self, name: str, text: str) -> str:
        """A command's text with the container's paths and ports made this host's."""
        for port, host_port in self.ports[name].items():
            text = text.replace(f":{port}", f":{host_port}")
            text = text.replace(f"-p {port}", f"-p {host_port}")
        return (text.replace("0.0.0.0", "127.0.0.1").replace("/data/", f"{self.root / name}/")
                .replace("/app/", f"{REPO_ROOT}/"))

    def argv(self, name: str, service: dict, command: list[str] | None = None) -> list[str]:
        argv = service.get("entrypoint", IMAGE_ENTRYPOINT) + (command or service.get("command", []))
        return [self.host_text(name, str(arg)) for arg in argv]

    def start(self, name: str, service: dict, command: list[str] | None = None) -> subprocess.Popen:
        env = self.environment(name, service)
        cwd = self.host_text(name, service.get("working_dir", str(REPO_ROOT)))
        log = open(self.root / f"{name}.log", "ab")
        process = subprocess.Popen(self.argv(name, service, command), env=env, cwd=cwd,
                                   stdout=log, stderr=subprocess.STDOUT)
        self.processes[name] = process
        return process

    def run(self, name: str, service: dict, command: list[str] | None = None) -> None:
        """A one-shot service (or `docker compose run`), to completion."""
        self.start(name, service, command)
        self.completed(name)

    def completed(self, name: str) -> None:
        """A started one-shot service, waited for: it must succeed."""
        assert self.processes[name].wait(300) == 0, self.log(name)
        del self.processes[name]

    def healthy(self, name: str, service: dict) -> bool:
        check = service["healthcheck"]["test"]
        assert check[0] == "CMD"
        argv = [self.host_text(name, arg) for arg in check[1:]]
        assert self.processes[name].poll() is None, self.log(name)
        return subprocess.run(argv, env={"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},
                              capture_output=True, timeout=30).returncode == 0

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")[-4000:]

    def stop(self) -> dict[str, int | None]:
        for process in self.processes.values():
            process.send_signal(signal.SIGTERM)
        codes = {}
        for name, process in self.processes.items():
            try:
                codes[name] = process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                codes[name] = None
        return codes


@pytest.fixture
def host_stack(tmp_path: Path, redis_url: str) -> Iterator[HostStack]:
    psycopg = pytest.importorskip("psycopg")
    try:
        psycopg.connect(POSTGRES_URL, connect_timeout=2).close()
    except psycopg.OperationalError as err:
        pytest.skip(f"no PostgreSQL on 127.0.0.1:5432: {err}")
    with embedded_broker() as broker:
        stack = HostStack(tmp_path, broker.bootstrap_servers)
        try:
            yield stack
        finally:
            stack.stop()
            from stream.feast_sink import register  # this run's rows of the shared registry

            register(load_settings(feast_project=stack.project, feast_registry="postgres",
                                   postgres_url=POSTGRES_URL, feast_data_dir=tmp_path)
                     ).delete_project(stack.project)


def metric_values(url: str) -> dict[str, float]:
    """Each sample of a /metrics page, by its line's name and labels."""
    values = {}
    for line in requests.get(url, timeout=5).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_the_compose_services_run_as_host_processes_from_events_to_the_feature_server(
    host_stack: HostStack, tmp_path: Path
) -> None:
    services = compose_services()
    stack = host_stack
    stack.start("topics", services["topics"])
    # The operator's step: a model from the trainer (untrained here: training is not the point),
    # published with the trainer's command into the volume the encoder reads. The model is made
    # while the topics are (nothing in between), the trainer waits for them as in the file.
    subprocess.run([BIN / "beat", "model", "init", tmp_path / "volumes/runs/model", "--synthetic"],
                   check=True, capture_output=True)
    stack.completed("topics")
    stack.run("trainer", services["trainer"], ["model", "publish", "/data/runs/model"])

    replicas = int(with_defaults(str(services["stream-worker"]["deploy"]["replicas"])))
    workers = [f"stream-worker-{i}" for i in range(1, replicas + 1)]
    for name in workers:
        stack.start(name, services["stream-worker"])
    stack.start("encoder", services["encoder"])
    stack.start("feature-server", services["feature-server"])
    for name in [*workers, "encoder", "feature-server"]:
        service = services[name.rsplit("-", 1)[0] if name in workers else name]
        wait_for(lambda: stack.healthy(name, service), 120, f"{name} healthy")

    producer = stack.environment("producer", services["stream-worker"])  # a team's producer
    subprocess.run([BIN / "beat", "produce", "--synthetic", "--users", "30", "--rate", "2000",
                    "--limit", "1200"], env=producer, check=True, capture_output=True)
    settings = load_settings(bootstrap_servers=stack.bootstrap_servers)
    per_user = Counter(m.key().decode() for m in read_topic(settings, settings.events_topic))
    assert sum(per_user.values()) == 1200
    undecodable = Producer(producer_config(settings))  # a producer's bug: a dead letter
    undecodable.produce(settings.events_topic, b"not avro", key=next(iter(per_user)).encode())
    assert undecodable.flush(10) == 0

    server = f"http://127.0.0.1:{stack.ports['feature-server'][FEATURE_SERVER_PORT]}"

    def served_counts() -> dict[str, int | None]:
        body = requests.post(f"{server}/get-online-features", json={
            "feature_service": CURRENT_SERVICE, "entities": {"user_id": list(per_user)},
        }, timeout=30).json()
        names = body["metadata"]["feature_names"]
        counts = body["results"][names.index("event_count")]["values"]
        return dict(zip(per_user, counts))

    in_window = {user: min(n, settings.max_events) for user, n in per_user.items()}
    wait_for(lambda: served_counts() == in_window, 120,
             "every user's final window served by the feature server")

    # The metrics Prometheus scrapes add up, and the dashboard asks only for what exists.
    def scrape() -> dict[str, dict[str, float]]:
        return {name: metric_values(f"http://127.0.0.1:{stack.ports[name][METRICS_PORT]}/metrics")
                for name in [*workers, "encoder"]}

    def total(scraped: dict[str, dict[str, float]], names: list[str], metric: str) -> float:
        return sum(v for name in names for k, v in scraped[name].items() if k.startswith(metric))

    wait_for(lambda: total(scrape(), workers, "beat_dead_letters_total") == 1, 60,
             "the undecodable event dead-lettered")
    scraped = scrape()
    assert total(scraped, workers, f'beat_events_total{{topic="{settings.events_topic}"}}') == 1201
    assert total(scraped, ["encoder"], "beat_users_encoded_total") >= len(per_user)

    def not_exposed() -> set[str]:  # consumer lag: from librdkafka's statistics every 5 s
        exposed = {sample.split("{")[0] for values in scrape().values() for sample in values}
        return dashboard_metrics() - exposed

    wait_for(lambda: not not_exposed(), 30, "every metric of the dashboard exposed")

    assert stack.stop() == {name: 0 for name in [*workers, "encoder", "feature-server"]}


def dashboard_metrics() -> set[str]:
    """The workers' metrics that the Grafana dashboard's queries read."""
    dashboard = json.loads((DOCKER / "grafana/dashboards/beatstream.json").read_text())
    queries = " ".join(t["expr"] for panel in dashboard["panels"] for t in panel["targets"])
    return set(re.findall(r"\b(?:beat|process)_[a-z_]+", queries))


def test_prometheus_scrapes_the_port_the_workers_serve_metrics_and_health_on() -> None:
    services = compose_services()
    scrape = yaml.safe_load((DOCKER / "prometheus.yml").read_text())["scrape_configs"]
    jobs = {job["job_name"]: job["dns_sd_configs"][0] for job in scrape}
    for name in ("stream-worker", "encoder"):
        assert jobs[name]["names"] == [name]
        assert str(jobs[name]["port"]) == services[name]["environment"]["BEAT_METRICS_PORT"]
        assert f":{METRICS_PORT}/healthz" in " ".join(services[name]["healthcheck"]["test"])


def test_every_long_running_service_has_a_healthcheck_and_the_images_run_as_a_user() -> None:
    for name, service in compose_services().items():
        if service.get("restart") != "no" and name != "refresh":  # refresh: a loop of one-shots
            assert "healthcheck" in service, name
    dockerfile = (DOCKER / "Dockerfile").read_text().splitlines()
    users = [i for i, line in enumerate(dockerfile) if line.startswith("USER ")]
    assert users and dockerfile[users[-1]] != "USER root"
    assert not any(line.startswith("RUN ") for line in dockerfile[users[-1]:])


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="no docker-compose client")
def test_docker_compose_accepts_the_file() -> None:
    done = subprocess.run(["docker-compose", "-f", COMPOSE, "--profile", "train", "config", "-q"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


SERVING_MODULES = ["stream.stream_worker", "stream.encoder_worker", "stream.feast_sink",
                   "stream.refresh", "stream.publish", "feast.feature_server"]


def test_the_serving_image_needs_nothing_of_the_training_extra() -> None:
    """The serving image installs no `train` extra: its workers import without it, and the
    training command says what to install."""
    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'sklearn', 'matplotlib', 'lifetimes'}:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
    )
    imports = "".join(f"import {module}\n" for module in SERVING_MODULES)
    serving = subprocess.Popen([sys.executable, "-c", blocker + imports], cwd=REPO_ROOT)
    done = subprocess.run(  # while the serving modules import
        [sys.executable, "-c", blocker + "from stream.cli import main; sys.exit(main())",
         "pretrain", "--out", "/tmp/never", "--sequences", "/tmp/none.parquet"],
        capture_output=True, text=True, cwd=REPO_ROOT,
    )
    assert serving.wait(300) == 0
    assert done.returncode == 2
    assert "pip install 'beatstream[train]'" in done.stderr
