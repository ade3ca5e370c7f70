"""The training users' events, which users each step takes, and the views drawn from them.

The sampler is a position in an endless sequence of users (TrainingData.users): step s takes
positions [s * batch_size, (s + 1) * batch_size), so the step number alone says which users a
step trains on, and a resumed run continues the same sequence.
"""

from __future__ import annotations

import functools
import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from model.pretraining import PretrainConfig
from model.sequences import lengths, starts
from model.views import UserEvents, ViewBatch, sample_views
from model.vocab import Vocabulary


@functools.lru_cache(maxsize=2)  # a batch spans at most two epochs
def epoch_order(num_users: int, seed: int, epoch: int) -> np.ndarray:
    """The order users are visited in during one epoch."""
    return np.random.default_rng([seed, 0, epoch]).permutation(num_users)


class TrainingData:
    """The training users' events as flat arrays, and the views each step draws from them."""

    def __init__(
        self,
        sequences: pa.Table,
        actions: Vocabulary,
        properties: Vocabulary,
        data_end_ms: int | None = None,
    ) -> None:
        flat = {name: pc.list_flatten(sequences[name]) for name in ("action", "property")}
        event_time = pc.list_flatten(sequences["event_time"]).to_numpy()  # [E] int64 ms
        values = pc.list_flatten(sequences["value"]).fill_null(np.nan)
        self.events = UserEvents(
            starts=starts(sequences),
            lengths=lengths(sequences),
            event_time=event_time,
            # int32: half the memory of int64, and any vocabulary fits
            action_ids=actions.lookup_column(flat["action"]).astype(np.int32),
            property_ids=properties.lookup_column(flat["property"]).astype(np.int32),
            values=values.to_numpy(zero_copy_only=False).astype(np.float32),
            # the end of what was observed: the newest event, unless the caller knows better
            data_end_ms=int(event_time.max()) if data_end_ms is None else data_end_ms,
        )
        self.actions, self.properties = actions, properties

    @classmethod
    def build(
        cls, sequences: pa.Table, vocabulary_sizes: tuple[int, int], min_events: int
    ) -> TrainingData:
        """Keep the users with at least min_events events (fewer cannot give two views), and
        build vocabularies of at most vocabulary_sizes (actions, properties) ids from their
        events. The end of the data is the newest event of all users, the short ones included."""
        newest = pc.max(pc.list_flatten(sequences["event_time"])).as_py()
        kept = sequences.filter(pa.array(lengths(sequences) >= min_events))
        max_actions, max_properties = vocabulary_sizes
        actions = Vocabulary.from_column(kept["action"], max_actions)
        properties = Vocabulary.from_column(kept["property"], max_properties)
        return cls(kept, actions, properties, newest)

    @property
    def num_users(self) -> int:
        return len(self.events.lengths)

    def fingerprint(self) -> str:
        """Identifies the training data, so a resume on different data is refused."""
        digest = hashlib.sha256()
        events = self.events
        for array in (
            events.lengths,
            events.event_time,
            events.action_ids,
            events.property_ids,
            events.values,
        ):
            digest.update(np.ascontiguousarray(array).tobytes())
        digest.update(str(events.data_end_ms).encode())
        digest.update(json.dumps([self.actions.tokens, self.properties.tokens]).encode())
        return digest.hexdigest()

    def users(self, position: int, count: int, seed: int) -> np.ndarray:
        """Users [count] at sampler positions [position, position + count): position p is user
        permutation_{p // U}[p % U], a fresh seeded permutation of all U users per epoch."""
        positions = np.arange(position, position + count)
        epochs = positions // self.num_users
        users = np.empty(count, dtype=np.int64)
        for epoch in np.unique(epochs):  # one or two epochs per batch
            here = epochs == epoch
            order = epoch_order(self.num_users, seed, int(epoch))
            users[here] = order[positions[here] % self.num_users]
        return users

    def views(
        self,
        users: np.ndarray,
        config: PretrainConfig,
        vocab_sizes: tuple[int, int],
        rng: np.random.Generator,
        window_days: float | None = None,
    ) -> ViewBatch:
        """Two views of each user and their targets (model/views.py), each cut to window_days
        like a served window."""
        return sample_views(
            self.events,
            users,
            config.min_view_events,
            config.max_view_events,
            config.future_horizons_days,
            vocab_sizes,
            rng,
            window_days,
        )
