"""What an online store's ``retrieve_online_documents_v2`` hands back to Feast, built the same
way by both lookalike stores (stream/sqlite_vector_store.py, stream/postgres_vector_store.py)
from the rows their own queries found."""

from __future__ import annotations

from datetime import datetime, timezone

from feast.infra.key_encoding_utils import deserialize_entity_key
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto


def documents(
    nearest: list[tuple[bytes, float]], rows: list[tuple[bytes, str, bytes, datetime | None]],
    version: int,
) -> list[tuple[datetime | None, EntityKeyProto, dict[str, ValueProto]]]:
    """What an online store's retrieve_online_documents_v2 returns: per entity key found
    (serialized, with its distance), its newest event time (UTC), its key, and its
    features from rows (entity_key, feature_name, serialized Value, event_ts) with
    "distance" added; in entity order (in_feast_entity_order)."""
    features: dict[bytes, dict[str, ValueProto]] = {key: {} for key, _ in nearest}
    newest: dict[bytes, datetime] = {}
    for key, name, blob, event_ts in rows:
        features[key][name] = ValueProto.FromString(blob)
        if event_ts is not None:
            event_ts = (event_ts.replace(tzinfo=timezone.utc) if event_ts.tzinfo is None
                        else event_ts.astimezone(timezone.utc))
            newest[key] = max(newest.get(key, event_ts), event_ts)
    found = []
    for key, distance in nearest:
        features[key]["distance"] = ValueProto(float_val=distance)
        found.append((newest.get(key), deserialize_entity_key(key, version), features[key]))
    return in_feast_entity_order(found)


def in_feast_entity_order(documents: list[tuple]) -> list[tuple]:
    """Documents sorted by their entity key's values, the order in which Feast 0.67's
    FeatureStore.retrieve_online_documents_v2 pairs rows with entities: it sorts the
    entities (utils._get_unique_entities_from_values) but not the rows, so rows in any
    other order (nearest first) come back with another entity's features and distance.
    Readers sort the response by "distance"."""
    def entity_values(document: tuple) -> tuple:
        key: EntityKeyProto = document[1]
        return tuple(getattr(v, v.WhichOneof("val")) for v in key.entity_values)
    return sorted(documents, key=entity_values)
