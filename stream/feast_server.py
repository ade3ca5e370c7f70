"""`feast serve` as a child process against a deployment's store: for the read tests and
bench/feast_read.py, which read through Feast's HTTP API as other teams do."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests
import yaml

from stream.config import Settings
from stream.feast_sink import feature_store_yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def feast_server(settings: Settings, directory: Path, timeout_s: float = 90) -> Iterator[str]:
    """The URL of a `feast serve` of these settings' store on a free loopback port, its
    feature_store.yaml written to directory; stopped on leaving."""
    config = directory / "feature_store.yaml"
    config.write_text(yaml.safe_dump(feature_store_yaml(settings)))
    port = free_port()
    feast = Path(sys.executable).with_name("feast")
    server = subprocess.Popen(
        [str(feast), "-f", str(config), "serve", "-h", "127.0.0.1", "-p", str(port),
         "--no-access-log"],
        cwd=settings.feature_repo, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(server, url, timeout_s)
        yield url
    finally:
        server.terminate()
        server.wait(20)


def _wait_healthy(server: subprocess.Popen, url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"feast serve exited: {server.stderr.read().decode()[-3000:]}")
        try:
            if requests.get(f"{url}/health", timeout=1).ok:
                return
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"feast serve did not answer within {timeout_s:.0f} s")
        time.sleep(0.2)
