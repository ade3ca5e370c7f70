"""The pretraining objectives' names and hyper-parameters (model/pretraining.py computes
them); no torch, so that `beat`'s command line is built without it."""

from __future__ import annotations

from dataclasses import dataclass

OBJECTIVES = ("masked", "next", "contrastive", "future", "gap")


@dataclass
class PretrainConfig:
    """The objectives' hyper-parameters (the architecture is BeatConfig)."""

    mask_fraction: float = 0.15  # of each view's real events
    masked_weight: float = 1.0
    next_weight: float = 1.0
    contrastive_weight: float = 1.0
    future_weight: float = 1.0
    gap_weight: float = 1.0
    future_horizons_days: tuple[float, ...] = (7.0, 30.0)  # the future window's horizons
    gap_buckets: int = 32  # log-scale buckets of the time to the next event
    temperature: float = 0.1  # InfoNCE, on unit-normalized embeddings
    min_view_events: int = 4  # a user needs 2 * min_view_events events to give two views
    max_view_events: int = 256  # capped by the model's max_events
    length_buckets: int = 8  # forward passes per step over views of similar length (1: one pass)

    def __post_init__(self) -> None:
        self.future_horizons_days = tuple(float(h) for h in self.future_horizons_days)
        if not 0 < self.mask_fraction < 1:
            raise ValueError(f"mask_fraction must be in (0, 1), got {self.mask_fraction}")
        if self.min_view_events < 1 or self.max_view_events < self.min_view_events:
            raise ValueError(
                f"need 1 <= min_view_events <= max_view_events, got "
                f"{self.min_view_events} and {self.max_view_events}"
            )
        if self.length_buckets < 1:
            raise ValueError(f"length_buckets must be at least 1, got {self.length_buckets}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not self.future_horizons_days or min(self.future_horizons_days) <= 0:
            raise ValueError(
                "future_horizons_days needs at least one horizon, each positive; "
                f"got {self.future_horizons_days}"
            )
        if self.gap_buckets < 3:
            raise ValueError(f"gap_buckets must be at least 3, got {self.gap_buckets}")
        weights = [getattr(self, f"{name}_weight") for name in OBJECTIVES]
        if min(weights) < 0 or not any(weights):
            raise ValueError(f"objective weights must be >= 0 and not all 0, got {weights}")
