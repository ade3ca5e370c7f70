"""Feast's own commands on feature_repo/, as a team runs them: `feast plan`, `feast apply` and
`feast ui` in a copy of the folder, with the committed feature_store.yaml (the embedded
default) and with its online store switched to Redis the way the yaml's comment says.
(`feast serve` has its own tests: test_online_writer.py, test_examples.py, test_compose.py.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests

from stream.config import REPO_ROOT
from stream.feast_server import free_port

FEAST = Path(sys.executable).with_name("feast")
REDIS_LINES = "  type: redis\n  connection_string: 127.0.0.1:6379\n"


def feature_repo_copy(root: Path, online_store: str) -> Path:
    """feature_repo/ as committed, in root; for Redis, the yaml's three sqlite lines replaced
    as its comment says, under a project of its own (Redis is shared with other tests)."""
    repo = root / "feature_repo"
    shutil.copytree(REPO_ROOT / "feature_repo", repo, ignore=shutil.ignore_patterns("data"))
    if online_store == "redis":
        yaml = repo / "feature_store.yaml"
        lines = yaml.read_text().splitlines(keepends=True)
        start = next(i for i, line in enumerate(lines) if line.startswith("  type: stream."))
        lines[start:start + 3] = [REDIS_LINES]
        project = f"project: beat_cli_{uuid.uuid4().hex[:8]}"
        yaml.write_text("".join(lines).replace("project: beatstream", project))
    return repo


def feast(repo: Path, *args: str) -> subprocess.CompletedProcess:
    # BEAT_DATA_DIR: definitions.py finds the published model versions there (none here)
    env = {**os.environ, "BEAT_DATA_DIR": str(repo.parent / "data")}
    return subprocess.run([FEAST, *args], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("online_store", ["sqlite", "redis"])
def test_feast_plan_apply_and_ui_work_from_the_feature_repo(
    tmp_path: Path, online_store: str, request: pytest.FixtureRequest
) -> None:
    if online_store == "redis":
        request.getfixturevalue("redis_url")  # skips where no Redis answers
    repo = feature_repo_copy(tmp_path, online_store)

    plan = feast(repo, "plan")
    assert plan.returncode == 0, plan.stderr
    assert "user_embedding" in plan.stdout  # what apply would create
    applied = feast(repo, "apply")
    assert applied.returncode == 0, applied.stderr

    port = free_port()
    # The UI starts while the second plan runs (both only read the registry): each command
    # spends its seconds importing Feast, so side by side they take the time of one.
    ui = subprocess.Popen([FEAST, "ui", "-h", "127.0.0.1", "-p", str(port)], cwd=repo,
                          env={**os.environ, "BEAT_DATA_DIR": str(tmp_path / "data")},
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert "No changes to registry" in feast(repo, "plan").stdout  # applied: nothing left
        url = f"http://127.0.0.1:{port}"
        wait_until_up(ui, f"{url}/health")
        assert "<html" in requests.get(url, timeout=10).text.lower()  # the UI's page
        views = requests.get(f"{url}/api/v1/feature_views/all", timeout=10).json()
        assert "user_embedding" in {view["spec"]["name"] for view in views["featureViews"]}
        services = requests.get(f"{url}/api/v1/feature_services/all", timeout=10).json()
        assert "user_embedding_current" in {s["spec"]["name"] for s in services["featureServices"]}
    finally:
        ui.terminate()
        ui.wait(20)


def wait_until_up(server: subprocess.Popen, url: str, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert server.poll() is None, server.stderr.read().decode()[-3000:]
        try:
            if requests.get(url, timeout=1).ok:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} did not answer within {timeout_s:.0f} s")
