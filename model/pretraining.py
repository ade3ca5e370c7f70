"""BEAT's pretraining objectives: masked events, next event, and contrast between time windows.

One step, for B users' event histories (an EventBatch of whole histories, right-padded):

1. sample_views cuts each history at a random event c into two adjacent time windows (CoLES-style
   sub-sequences): view A = events [c - len_a, c), view B = events [c, c + len_b). The event after
   each view (c for A, c + len_b for B) is that view's next-event target. Each view's time_gaps
   are counted as of the time of that next event, so the view's newest event is as old as the
   silence that followed it: serving encodes as of "now", and the time since a user's last event
   (seconds to weeks) is what says most about churn, so the model must learn to read it.
2. mask_events hides 15 % of the views' events: their action and property ids become the
   out-of-vocabulary id (the token serving already uses for "a value the model cannot name"),
   while their times stay visible.
3. The model reads the 2B views in length buckets (_forward_in_buckets): views sorted by length,
   cut into length_buckets chunks, each padded only to its own longest view, so that far fewer
   padding positions are computed than in one batch padded to the longest view. Every view is
   encoded on its own (attention never crosses rows), so this is the one-pass computation up to
   float rounding; only dropout draws differ. Then
     masked       cross-entropy of each masked event's action and property, from its hidden state
     next         cross-entropy of the next event's action and property, from the view's embedding
     contrastive  InfoNCE between the embeddings of A and B of the same user, the other users'
                  views in the batch being the negatives (symmetric, temperature τ)
     loss         the weighted sum, weights in PretrainConfig
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.batch import EventBatch
from model.beat import MS_PER_DAY, Beat
from model.config import BeatConfig
from model.vocab import OOV_ID


@dataclass
class PretrainConfig:
    """The objectives' hyper-parameters (the architecture is BeatConfig)."""

    mask_fraction: float = 0.15  # of each view's real events
    masked_weight: float = 1.0
    next_weight: float = 1.0
    contrastive_weight: float = 1.0
    temperature: float = 0.1  # InfoNCE, on unit-normalized embeddings
    min_view_events: int = 4  # a history needs 2 * min_view_events + 1 events to give two views
    max_view_events: int = 256  # capped by the model's max_events
    length_buckets: int = 8  # forward passes per step over views of similar length (1: one pass)

    def __post_init__(self) -> None:
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


@dataclass
class Views:
    """Two adjacent time windows per user and the event that follows each."""

    a: EventBatch  # [B, La]
    b: EventBatch  # [B, Lb]
    next_a: tuple[Tensor, Tensor]  # (action ids [B], property ids [B]) of the event after A
    next_b: tuple[Tensor, Tensor]


def _uniform_int(low: Tensor, high: Tensor, generator: torch.Generator | None) -> Tensor:
    """One integer per row, uniform in [low, high] (inclusive)."""
    u = torch.rand(low.shape, generator=generator, device=low.device)
    return low + (u * (high - low + 1)).long().clamp_max(high - low)


def _slice(histories: EventBatch, start: Tensor, length: Tensor) -> EventBatch:
    """Events [start, start + length) of each row, right-padded; ages as of the event that
    follows each slice (every history has one: sample_views keeps a next event per view)."""
    width = int(length.max())
    offsets = torch.arange(width, device=start.device)  # [W]
    keep = offsets < length[:, None]  # [B, W]
    index = (start[:, None] + offsets).clamp_max(histories.action_ids.shape[1] - 1)  # [B, W]

    def take(column: Tensor) -> Tensor:
        return torch.where(keep, column.gather(1, index), 0)

    times = take(histories.event_times)  # [B, W] int64 ms
    as_of = histories.event_times.gather(1, (start + length)[:, None])  # [B, 1] next event
    ages = torch.where(keep, (as_of - times).double() / MS_PER_DAY, 0.0)
    return EventBatch(
        take(histories.action_ids), take(histories.property_ids), ages, keep, times
    )


def sample_views(
    histories: EventBatch, config: PretrainConfig, generator: torch.Generator | None = None
) -> Views:
    """Cut every history into two adjacent windows of random lengths (see the module doc).

    histories: whole histories, right-padded, oldest first (as EventBatch.from_windows builds
    them); each needs at least 2 * min_view_events + 1 events.
    """
    n = histories.lengths  # [B]
    m = config.min_view_events
    if int(n.min()) < 2 * m + 1:
        raise ValueError(
            f"every history needs at least {2 * m + 1} events for two views of "
            f"{m} and a next event; the shortest has {int(n.min())}"
        )
    cap = torch.full_like(n, config.max_view_events)
    cut = _uniform_int(torch.full_like(n, m), n - m - 1, generator)  # [B], first event of B
    len_a = _uniform_int(torch.full_like(n, m), torch.minimum(cut, cap), generator)
    len_b = _uniform_int(torch.full_like(n, m), torch.minimum(n - 1 - cut, cap), generator)

    def event_at(index: Tensor) -> tuple[Tensor, Tensor]:
        rows = torch.arange(len(n), device=n.device)
        return histories.action_ids[rows, index], histories.property_ids[rows, index]

    return Views(
        a=_slice(histories, cut - len_a, len_a),
        b=_slice(histories, cut, len_b),
        next_a=event_at(cut),
        next_b=event_at(cut + len_b),
    )


def mask_events(
    batch: EventBatch, fraction: float, generator: torch.Generator | None = None
) -> tuple[EventBatch, Tensor]:
    """Hide a random `fraction` of the real events' ids, and at least one per non-empty row;
    returns the masked batch and where ([B, L] bool). Times stay: the model is asked what
    happened, not when."""
    u = torch.rand(batch.action_ids.shape, generator=generator, device=batch.action_ids.device)
    u = u.masked_fill(~batch.padding_mask, 2.0)  # [B, L], padding is never picked
    hidden = ((u < fraction) | (u == u.min(dim=1, keepdim=True).values)) & batch.padding_mask
    masked = replace(
        batch,
        action_ids=batch.action_ids.masked_fill(hidden, OOV_ID),
        property_ids=batch.property_ids.masked_fill(hidden, OOV_ID),
    )
    return masked, hidden


def _stack(a: EventBatch, b: EventBatch) -> EventBatch:
    """[Ba, La] and [Bb, Lb] → [Ba + Bb, max(La, Lb)], right-padded with zeros."""
    width = max(a.action_ids.shape[1], b.action_ids.shape[1])

    def cat(x: Tensor, y: Tensor) -> Tensor:
        return torch.cat([F.pad(t, (0, width - t.shape[1])) for t in (x, y)])

    return EventBatch(*(cat(x, y) for x, y in zip(a.inputs().values(), b.inputs().values())))


def _forward_in_buckets(
    model: Beat, batch: EventBatch, selected: Tensor, buckets: int
) -> tuple[Tensor, Tensor]:
    """Beat over batch's N rows in up to `buckets` chunks of rows of similar length, each chunk
    cropped to its own longest row. Returns the embeddings [N, E] in batch's row order, and the
    hidden states at `selected` ([N, L] bool, inside the padding mask) [S, H], in the order
    model(batch)["hidden_states"][selected] gives them (row-major)."""
    lengths = batch.lengths  # [N]
    order = lengths.argsort(stable=True)  # [N], shortest first
    embedding_parts, state_parts = [], []
    for rows in order.tensor_split(min(buckets, len(order))):  # [n] each, consecutive in order
        width = int(lengths[rows[-1]])  # the chunk's longest row
        chunk = EventBatch(*(t[rows, :width] for t in batch.inputs().values()))  # [n, width]
        out = model(**chunk.inputs())
        embedding_parts.append(out["embedding"])  # [n, E]
        state_parts.append(out["hidden_states"][selected[rows, :width]])  # [s, H], row-major
    embedding, states = torch.cat(embedding_parts), torch.cat(state_parts)  # rows in `order`

    # Undo the sort: states are row-major over selected[order]; number them there, then read
    # the numbers back in batch's row order.
    rank = order.argsort()  # [N], each row's place in order
    slot = torch.zeros(selected.shape, dtype=torch.long, device=selected.device)  # [N, L]
    slot[selected[order]] = torch.arange(len(states), device=selected.device)
    return embedding[rank], states[slot[rank][selected]]


def info_nce(a: Tensor, b: Tensor, temperature: float) -> Tensor:
    """Symmetric InfoNCE: row i of a and row i of b are positives, other rows negatives."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)  # [B, E]
    logits = a @ b.T / temperature  # [B, B]
    labels = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class EventHead(nn.Module):
    """Predicts an event's action and property from a vector."""

    def __init__(self, in_size: int, config: BeatConfig) -> None:
        super().__init__()
        self.action = nn.Linear(in_size, config.action_vocab_size)
        self.property = nn.Linear(in_size, config.property_vocab_size)

    def loss(self, x: Tensor, action_ids: Tensor, property_ids: Tensor) -> Tensor:
        # x: [N, in_size]; ids: [N]. The sum of both cross-entropies.
        return F.cross_entropy(self.action(x), action_ids) + F.cross_entropy(
            self.property(x), property_ids
        )


class BeatPretrainer(nn.Module):
    """A Beat model with the pretraining heads; forward returns the losses.

    Only `self.model` is kept after pretraining (model.save_pretrained); the heads are discarded.
    """

    def __init__(self, model: Beat, config: PretrainConfig | None = None) -> None:
        super().__init__()
        self.model = model
        config = config or PretrainConfig()
        # a view longer than the model reads would be refused by its forward
        self.config = replace(
            config, max_view_events=min(config.max_view_events, model.config.max_events)
        )
        self.masked_head = EventHead(model.config.hidden_size, model.config)
        self.next_head = EventHead(model.config.embedding_size, model.config)

    def forward(
        self, histories: EventBatch, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """Losses (scalars): "masked", "next", "contrastive" and their weighted sum "loss"."""
        config = self.config
        views = sample_views(histories, config, generator)
        originals = _stack(views.a, views.b)  # [2B, L]: A of every user, then B
        inputs, hidden = mask_events(originals, config.mask_fraction, generator)
        # embedding [2B, E]; states [N masked, H]
        embedding, states = _forward_in_buckets(self.model, inputs, hidden, config.length_buckets)
        B = len(histories)

        losses = {
            "masked": self.masked_head.loss(
                states, originals.action_ids[hidden], originals.property_ids[hidden]
            ),
            "next": self.next_head.loss(
                embedding,
                torch.cat([views.next_a[0], views.next_b[0]]),
                torch.cat([views.next_a[1], views.next_b[1]]),
            ),
            "contrastive": info_nce(embedding[:B], embedding[B:], config.temperature),
        }
        losses["loss"] = (
            config.masked_weight * losses["masked"]
            + config.next_weight * losses["next"]
            + config.contrastive_weight * losses["contrastive"]
        )
        return losses
