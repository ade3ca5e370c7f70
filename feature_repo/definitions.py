"""What other teams query: each user's BEAT embedding, kept fresh by the encoder workers."""

from datetime import timedelta

from feast import Entity, FeatureService, FeatureView, Field, FileSource, PushSource
from feast.types import Array, Float32, Int64, String, UnixTimestamp
from feast.value_type import ValueType

from model.config import EMBEDDING_SIZE  # the one definition of the embedding's size

user = Entity(
    name="user",
    join_keys=["user_id"],
    value_type=ValueType.STRING,
    description="A user of the product; the key of beat.events.",
)

# The offline side of the push source, for point-in-time training sets. The encoder
# workers write the online store directly; they do not write this history yet.
embedding_history = FileSource(
    name="user_embedding_history",
    path="data/user_embedding_history.parquet",
    timestamp_field="updated_at",
)

user_embedding_push = PushSource(name="user_embedding_push", batch_source=embedding_history)

user_embedding = FeatureView(
    name="user_embedding",
    entities=[user],
    ttl=timedelta(0),  # never expires: a quiet user's last embedding stays valid
    schema=[
        Field(
            name="embedding", dtype=Array(Float32),
            description=f"BEAT embedding, {EMBEDDING_SIZE} floats",
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
    source=user_embedding_push,
    online=True,
    tags={"embedding_size": str(EMBEDDING_SIZE), "producer": "beatstream encoder worker"},
)

beat_user_embedding = FeatureService(name="beat_user_embedding", features=[user_embedding])
