"""BEAT_FEAST_REGISTRY=postgres: Feast's SQL registry in PostgreSQL, shared by every process
of a deployment. Real PostgreSQL (127.0.0.1:5432) and real Feast; skipped without a server."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from stream.config import Settings, load_settings
from stream.feast_sink import FEATURE_VIEW, EmbeddingRows, FeatureSink, register

URL = "postgresql://postgres@127.0.0.1:5432/postgres"


@pytest.fixture
def sql_registry_settings(tmp_path: Path) -> Iterator[Settings]:
    psycopg = pytest.importorskip("psycopg")
    try:
        psycopg.connect(URL, connect_timeout=2).close()
    except psycopg.OperationalError as err:
        pytest.skip(f"no PostgreSQL on 127.0.0.1:5432: {err}")
    settings = load_settings(feast_project=f"beat_reg_{uuid.uuid4().hex[:8]}",
                             feast_data_dir=tmp_path, feast_registry="postgres",
                             postgres_url=URL)
    yield settings
    # only this project's rows: the registry's tables are shared by every project (and
    # Feast's teardown() would empty them all)
    register(settings).delete_project(settings.feast_project)


def test_the_deploy_step_writes_the_sql_registry_that_other_processes_read(
    sql_registry_settings: Settings, tmp_path: Path
) -> None:
    register(sql_registry_settings)  # the deploy step
    assert not (tmp_path / "registry.db").exists()  # nothing went to the file registry
    # A worker (a store of its own, applying nothing) finds the view in the SQL registry.
    sink = FeatureSink(sql_registry_settings, deploy=False)
    now_ms = int(time.time() * 1000)
    vectors = np.random.default_rng(0).standard_normal((2, 768)).astype(np.float32)
    sink.write(EmbeddingRows(["a", "b"], vectors, "v1", np.array([3, 4]),
                             np.full(2, now_ms), np.full(2, now_ms)))
    assert FEATURE_VIEW in [v.name for v in sink.store.list_feature_views()]
    assert not (tmp_path / "registry.db").exists()
    read = sink.read(["a", "b"])
    np.testing.assert_array_equal(np.array(read["embedding"], np.float32), vectors)
