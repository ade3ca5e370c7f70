"""Lookalike search: `beat similar` and Feast's retrieve_online_documents_v2 over rows our
bulk writer stored, from the current model version's view only, on the embedded default
(sqlite with sqlite-vec) and on PostgreSQL with pgvector."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
import requests

from stream.cli import main
from stream.config import Settings, load_settings
from stream.feast_server import feast_server
from stream.feast_sink import EmbeddingRows, FeatureSink, register
from stream.lookalike import similar_users
from stream.model_versions import ModelVersions, view_name

OLD, CURRENT = "beat-old", "beat-current"
T0_MS = 1_780_315_200_000


def unit(*weights: float) -> np.ndarray:
    """A 768-float vector with these first components."""
    vector = np.zeros(768, np.float32)
    vector[: len(weights)] = weights
    return vector


# cosine similarity to "query": 1, 0.9, 0.6, 0, -1; lengths differ, so a dot product
# would rank them otherwise
KNOWN = {
    "query": unit(1.0),
    "close": 5 * unit(0.9, np.sqrt(1 - 0.81)),
    "middle": 0.2 * unit(0.6, 0.0, 0.8),
    "orthogonal": unit(0.0, 0.0, 0.0, 1.0),
    "opposite": 3 * unit(-1.0),
}


def rows(vectors: dict[str, np.ndarray], version: str, at_ms: int = T0_MS) -> EmbeddingRows:
    n = len(vectors)
    return EmbeddingRows(
        user_id=list(vectors), embedding=np.stack(list(vectors.values())),
        model_version=version, event_count=np.full(n, 3), last_event_time_ms=np.full(n, at_ms),
        as_of_ms=np.full(n, at_ms),
    )


@pytest.fixture(params=["sqlite", "postgres"])
def two_versions(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """Two published versions, the second current (their views registered as
    `beat model publish` does), on the embedded default and on PostgreSQL with pgvector,
    and the same settings in the environment for the CLI."""
    run = uuid.uuid4().hex[:8]
    env = {"BEAT_DATA_DIR": str(tmp_path / "data"), "BEAT_FEAST_PROJECT": f"lookalike_{run}",
           "BEAT_FEAST_DATA_DIR": str(tmp_path / "feast"), "BEAT_ONLINE_STORE": request.param}
    if request.param == "postgres":
        env["BEAT_POSTGRES_URL"] = request.getfixturevalue("pgvector_url")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    versions = ModelVersions(settings)
    for version in (OLD, CURRENT):
        versions.path(version).mkdir(parents=True)
    versions.make_current(CURRENT)
    register(settings)
    return settings


def write(settings: Settings, version: str, batch: EmbeddingRows) -> None:
    """Through the encoders' writer into the version's own view."""
    FeatureSink(settings, view_name(version), deploy=False).write(batch)


def test_similar_users_ranks_by_cosine_in_the_current_version_only(
    two_versions: Settings, capsys: pytest.CaptureFixture
) -> None:
    settings = two_versions
    write(settings, CURRENT, rows(KNOWN, CURRENT))
    # only in the old version's view, and identical to the query: it must not appear
    write(settings, OLD, rows({"query": KNOWN["query"], "old-only": KNOWN["query"]}, OLD))
    store = FeatureSink(settings, deploy=False).store

    found = similar_users(store, "query", k=3)

    assert [u.user_id for u in found] == ["close", "middle", "orthogonal"]
    np.testing.assert_allclose([u.similarity for u in found], [0.9, 0.6, 0.0], atol=1e-5)
    assert {u.model_version for u in found} == {CURRENT}
    assert [u.user_id for u in similar_users(store, "query", k=10)] == [
        "close", "middle", "orthogonal", "opposite"]  # the query user left out

    assert main(["similar", "query", "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert view_name(CURRENT) in out
    assert out.index("close") < out.index("middle") and "orthogonal" not in out


def test_the_index_follows_a_re_encode(two_versions: Settings) -> None:
    settings = two_versions
    write(settings, CURRENT, rows(KNOWN, CURRENT))
    moved = {"opposite": KNOWN["query"] + unit(0.0, 0.05)}  # now the nearest
    write(settings, CURRENT, rows(moved, CURRENT, T0_MS + 1000))
    store = FeatureSink(settings, deploy=False).store

    assert [u.user_id for u in similar_users(store, "query", k=2)] == ["opposite", "close"]


def test_feasts_sdk_call_pairs_each_user_with_its_own_distance(two_versions: Settings) -> None:
    """retrieve_online_documents_v2 as another team calls it (README): every user in the
    response carries its own distance and features."""
    settings = two_versions
    write(settings, CURRENT, rows(KNOWN, CURRENT))
    store = FeatureSink(settings, deploy=False).store
    view = store.get_feature_service("user_embedding_current").feature_view_projections[0].name

    response = store.retrieve_online_documents_v2(
        features=[f"{view}:model_version", f"{view}:event_count"],
        query=KNOWN["query"].tolist(), top_k=5, distance_metric="cosine",
    ).to_dict()

    distances = dict(zip(response["user_id"], response["distance"]))
    assert set(distances) == set(KNOWN)
    expected = {"query": 0.0, "close": 0.1, "middle": 0.4, "orthogonal": 1.0, "opposite": 2.0}
    for user, distance in expected.items():
        assert distances[user] == pytest.approx(distance, abs=1e-5)
    assert set(response["model_version"]) == {CURRENT}


def test_feast_serve_search_answers_the_same(two_versions: Settings, tmp_path: Path) -> None:
    """Feast's feature server: POST /search with api_version 2 is the same call over HTTP."""
    settings = two_versions
    write(settings, CURRENT, rows(KNOWN, CURRENT))
    with feast_server(settings, tmp_path) as url:
        response = requests.post(f"{url}/search", timeout=30, json={
            "features": [f"{view_name(CURRENT)}:model_version"],
            "query": KNOWN["query"].tolist(), "top_k": 3, "distance_metric": "cosine",
            "api_version": 2,
        })
    response.raise_for_status()
    body = response.json()

    names = body["metadata"]["feature_names"]
    column = {name: body["results"][i]["values"] for i, name in enumerate(names)}
    distances = dict(zip(column["user_id"], column["distance"]))
    assert distances == pytest.approx({"query": 0.0, "close": 0.1, "middle": 0.4}, abs=1e-5)


def test_a_user_without_an_embedding_is_said_plainly(
    two_versions: Settings, capsys: pytest.CaptureFixture
) -> None:
    write(two_versions, OLD, rows({"old-only": KNOWN["query"]}, OLD))

    assert main(["similar", "old-only"]) == 1
    assert "has no embedding in user_embedding_beat_current" in capsys.readouterr().err


def test_redis_says_where_lookalike_search_is(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("BEAT_ONLINE_STORE", "redis")

    assert main(["similar", "u1"]) == 2
    assert "BEAT_ONLINE_STORE=postgres" in capsys.readouterr().err
