"""BEAT hyper-parameters: one dataclass; presets are named sets of overrides, not code paths."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# The size of the embedding every served model writes: the Feast feature view user_embedding
# (feature_repo/definitions.py) and the encoder's start-up check read it from here.
EMBEDDING_SIZE = 768

# Overrides of the model-card defaults. Every preset keeps embedding_size=EMBEDDING_SIZE because
# the Feast feature view stores that many floats whatever model produced them.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "small": {"hidden_size": 128, "num_layers": 2, "num_heads": 4},
    "tiny": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "max_events": 64},
}


# What a config written before a key existed means by its absence: models saved before the
# value encoding and the window statistics had neither, and their weights have no tables for them.
LEGACY_DEFAULTS: dict[str, Any] = {
    "use_value_encoding": False,
    "use_window_statistics": False,
    "use_lifetime_statistics": False,
}


@dataclass
class BeatConfig:
    """Architecture of a BEAT model. The defaults are the model card (about 86.4M parameters)."""

    name: str = "default"  # a label only: it names default model versions ("beat-small-1a2b3c4d")
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    max_events: int = 256  # newest events per user; the blocks see max_events + 1 (summary token)
    embedding_size: int = EMBEDDING_SIZE  # size of the output embedding (the Feast contract)
    mlp_ratio: int = 4
    dropout: float = 0.1
    action_vocab_size: int = 512  # including the reserved ids (padding, out-of-vocabulary, none)
    property_vocab_size: int = 1024
    window_days: float = 90.0  # the span of history a window covers; scales the time encodings
    time_buckets: int = 64  # log-scale buckets for event ages and gaps between events
    value_buckets: int = 32  # signed-log buckets of an event's amount (see ValueEncoding)
    use_age_encoding: bool = True
    use_gap_encoding: bool = True
    use_periodic_encoding: bool = True
    use_value_encoding: bool = True
    use_window_statistics: bool = True  # counts, recency, amounts and count sketches (beat.py)
    # The user's whole history too: lifetime events and amounts, tenure. Part of the window
    # statistics: without use_window_statistics it has no effect.
    use_lifetime_statistics: bool = True

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.time_buckets < 3:
            # bucket 0 is reserved, and one bucket alone could not tell durations apart
            raise ValueError(f"time_buckets must be at least 3, got {self.time_buckets}")
        if self.value_buckets < 4:
            # 0 padding, 1 no value, 2 zero, and at least one bucket of amounts
            raise ValueError(f"value_buckets must be at least 4, got {self.value_buckets}")
        if self.window_days <= 0:
            raise ValueError(f"window_days must be positive, got {self.window_days}")


    @classmethod
    def preset(cls, name: str) -> BeatConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown BEAT preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(name=name, **PRESETS[name])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BeatConfig:
        # Refuse unknown keys: they mean the file was written by a newer BEAT whose architecture
        # this code cannot build. A missing key means the file predates it: it takes what the
        # model did before the key existed (LEGACY_DEFAULTS), else the default.
        unknown = set(values) - {field.name for field in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown BEAT config keys: {sorted(unknown)}")
        return cls(**{**LEGACY_DEFAULTS, **values})
