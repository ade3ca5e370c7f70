"""Users like this one: the nearest users by cosine similarity of the current model's embeddings.

Only Feast's public API, the same calls another team makes (README "Lookalike search"):
the feature service ``user_embedding_current`` names the current version's view, the
user's embedding is read from it, and ``FeatureStore.retrieve_online_documents_v2`` asks
the online store for the nearest rows of that view alone, so users embedded only by
another model version never appear. The user is its own nearest neighbour (distance 0):
one more row is asked for and the user is left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from stream.config import ConfigError
from stream.model_versions import CURRENT_SERVICE

if TYPE_CHECKING:
    from feast import FeatureStore


@dataclass(frozen=True)
class Lookalike:
    user_id: str
    similarity: float  # cosine similarity, 1 - Feast's "distance"
    model_version: str


def current_view(store: FeatureStore) -> str:
    """The feature view the feature service user_embedding_current serves."""
    from feast.errors import FeatureServiceNotFoundException

    try:
        service = store.get_feature_service(CURRENT_SERVICE)
    except FeatureServiceNotFoundException:
        raise ConfigError(
            f"the feature service {CURRENT_SERVICE} is not in the Feast registry of project "
            f"{store.project}: `beat model publish` (or an encoder serving BEAT_MODEL_DIR) "
            "registers it; check BEAT_FEAST_PROJECT and BEAT_FEAST_DATA_DIR"
        ) from None
    return service.feature_view_projections[0].name


def similar_users(store: FeatureStore, user_id: str, k: int) -> list[Lookalike]:
    """The k users nearest user_id, nearest first; LookupError when the current view
    holds no embedding of user_id."""
    view = current_view(store)
    join_key = store.get_feature_view(view).entity_columns[0].name
    query = store.get_online_features(
        features=[f"{view}:embedding"], entity_rows=[{join_key: user_id}]
    ).to_dict()["embedding"][0]
    if query is None:
        raise LookupError(f"user {user_id!r} has no embedding in {view}, the view of the "
                          "current model version")
    found = store.retrieve_online_documents_v2(
        features=[f"{view}:model_version"], query=query, top_k=k + 1,
        distance_metric="cosine",
    ).to_dict()
    rows = sorted(zip(found["distance"], found[join_key], found["model_version"]))
    return [Lookalike(user, 1.0 - distance, version)
            for distance, user, version in rows if user != user_id][:k]
