"""What other teams query: each user's BEAT embedding, kept fresh by the encoder workers.

Readers pin the feature service ``user_embedding_current``: the view of the current model
version (``beat model publish``), or ``user_embedding`` where none is published (the
embedded default, whose encoders serve BEAT_MODEL_DIR). Every published version has a view
of its own, ``user_embedding_<version slug>``, written only by that version's encoders, so
one version's vector is never stored under another's name.
"""

from datetime import timedelta

from feast import Entity, FeatureService, FeatureView, Field, PushSource
from feast.types import Array, Float32, Int64, String, UnixTimestamp
from feast.value_type import ValueType

from model.config import EMBEDDING_SIZE  # the one definition of the embedding's size
from stream.config import load_settings
from stream.model_versions import CURRENT_SERVICE, ModelVersions, view_name
from stream.offline_history import history_source

# beatstream passes its own settings as BEAT_SETTINGS (stream/feast_sink.py); `feast apply`
# reads the environment's.
_settings = globals().get("BEAT_SETTINGS") or load_settings()

user = Entity(
    name="user",
    join_keys=["user_id"],
    value_type=ValueType.STRING,
    description="A user of the product; the key of beat.events.",
)


def embedding_view(name: str, **tags: str) -> FeatureView:
    """A view whose offline side is its own history (stream/offline_history.py): each
    model version's view reads only its version's rows, for point-in-time training sets."""
    push = PushSource(name=f"{name}_push", batch_source=history_source(_settings, name))
    return FeatureView(
        name=name,
        entities=[user],
        ttl=timedelta(0),  # never expires: a quiet user's last embedding stays valid
        schema=[
            Field(
                name="embedding", dtype=Array(Float32),
                description=f"BEAT embedding, {EMBEDDING_SIZE} floats",
                # lookalike search: retrieve_online_documents_v2 ranks by cosine distance
                vector_index=True, vector_length=EMBEDDING_SIZE, vector_search_metric="cosine",
            ),
            Field(
                name="model_version", dtype=String,
                description="model that computed it; compare only equal versions",
            ),
            Field(name="event_count", dtype=Int64, description="events in the encoded window"),
            Field(
                name="last_event_time", dtype=UnixTimestamp,
                description="newest event in the encoded window",
            ),
        ],
        source=push,
        online=True,
        tags={"embedding_size": str(EMBEDDING_SIZE), "producer": "beatstream encoder worker",
              **tags},
    )


user_embedding = embedding_view("user_embedding")
beat_user_embedding = FeatureService(name="beat_user_embedding", features=[user_embedding])

# The published versions are read from the versions folder, so `feast apply` here keeps
# their views (it deletes what the repo does not define).
_versions = ModelVersions(_settings)
_views = {v: embedding_view(view_name(v), model_version=v) for v in _versions.published()}
globals().update({view.name: view for view in _views.values()})  # where Feast looks for them
user_embedding_current = FeatureService(
    name=CURRENT_SERVICE, features=[_views.get(_versions.current(), user_embedding)],
    description="the current model version's embeddings: pin this service",
)
