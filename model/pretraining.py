"""BEAT's pretraining objectives, computed on the views model/views.py draws.

Each step reads 2B views (two adjacent time windows of each of B users, each as of its own
moment; see model/views.py for what each view sees and must predict):

1. mask_events hides 15 % of the views' events: their action and property ids become the
   out-of-vocabulary id (the token serving already uses for "a value the model cannot name"),
   while their times and amounts stay visible.
2. The model reads the views in length buckets (_forward_in_buckets): views sorted by length,
   cut into length_buckets chunks, each padded only to its own longest view, so that far fewer
   padding positions are computed than in one batch padded to the longest view. Every view is
   encoded on its own (attention never crosses rows), so this is the one-pass computation up to
   float rounding; only dropout draws differ. Then, from each view's embedding unless noted:
     masked       cross-entropy of each masked event's action and property, from its hidden state
     next         cross-entropy of the next event's action and property (views that have one)
     contrastive  InfoNCE between the embeddings of A and B of the same user, the other users'
                  views in the batch being the negatives (symmetric, temperature τ)
     future       for each horizon H (PretrainConfig.future_horizons_days), the actions and the
                  properties the user will have within H days, each a multi-label softmax (the
                  mean negative log-likelihood of the distinct values that occur, as in
                  PinnerFormer's dense all-action loss), and log1p of how many events (0:
                  silent); views whose horizon runs past the end of the data are left out
     gap          the time to the next event as a distribution over log-scale buckets (discrete
                  survival): the bucket it fell in, or, when the data ended first (censored),
                  any bucket at or beyond the time observed
     loss         the weighted sum, weights in PretrainConfig (0 switches an objective off)

The future and gap objectives aim at what readers of the embedding predict (activity, churn,
propensity over days to weeks), as behavioral foundation models such as BaseModel do; masked,
next and contrastive teach the sequence itself.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.batch import EventBatch
from model.beat import Beat, log_bucket
from model.config import BeatConfig
from model.pretrain_config import OBJECTIVES, PretrainConfig
from model.views import ViewBatch
from model.vocab import OOV_ID


def mask_events(
    batch: EventBatch, fraction: float, generator: torch.Generator | None = None
) -> tuple[EventBatch, Tensor]:
    """Hide a random `fraction` of the real events' ids, and at least one per non-empty row;
    returns the masked batch and where ([B, L] bool). Times and amounts stay: the model is
    asked what happened, not when or for how much."""
    u = torch.rand(batch.action_ids.shape, generator=generator, device=batch.action_ids.device)
    u = u.masked_fill(~batch.padding_mask, 2.0)  # [B, L], padding is never picked
    hidden = ((u < fraction) | (u == u.min(dim=1, keepdim=True).values)) & batch.padding_mask
    masked = replace(
        batch,
        action_ids=batch.action_ids.masked_fill(hidden, OOV_ID),
        property_ids=batch.property_ids.masked_fill(hidden, OOV_ID),
    )
    return masked, hidden


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
        chunk = batch.rows(rows, width)  # [n, width]
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


class FutureHead(nn.Module):
    """For each horizon: logits over actions and over properties, and log1p(event count)."""

    def __init__(self, in_size: int, config: BeatConfig, horizons: int) -> None:
        super().__init__()
        self.horizons = horizons
        self.action = nn.Linear(in_size, horizons * config.action_vocab_size)
        self.property = nn.Linear(in_size, horizons * config.property_vocab_size)
        self.count = nn.Linear(in_size, horizons)

    def loss(self, x: Tensor, views: ViewBatch) -> Tensor:
        # x: [R, in_size]; targets [R, H, V]. Means over the cells (view, horizon) that count,
        # as masked sums: every head's parameters stay in the graph even when no cell counts
        # (a batch of censored views), which DDP needs on every rank.
        known = views.future_known.float()  # [R, H]: the horizon ends before the data does
        counts = views.future_counts  # [R, H]
        R, H = known.shape
        squared = (self.count(x) - counts.log1p()).square()  # [R, H]
        loss = (squared * known).sum() / known.sum().clamp_min(1)
        active = known * (counts > 0)  # a silent horizon names no value
        for layer, target in (
            (self.action, views.future_actions),
            (self.property, views.future_properties),
        ):
            log_p = F.log_softmax(layer(x).view(R, H, -1).float(), dim=-1)  # [R, H, V]
            nll = -(target * log_p).sum(-1) / target.sum(-1).clamp_min(1)  # [R, H]
            loss = loss + (nll * active).sum() / active.sum().clamp_min(1)
        return loss


class GapHead(nn.Module):
    """The time to the next event as a distribution over log-scale buckets (model/beat.py's
    log_bucket over the model's window_days; longer gaps share the last bucket)."""

    def __init__(self, in_size: int, config: BeatConfig, buckets: int) -> None:
        super().__init__()
        self.buckets, self.window_days = buckets, config.window_days
        self.logits = nn.Linear(in_size, buckets - 1)  # log_bucket's 1 .. buckets-1

    def loss(self, x: Tensor, gap_days: Tensor, censored: Tensor) -> Tensor:
        # x: [R, in_size]; gap_days: [R]; censored: [R] bool (the gap is at least gap_days)
        log_p = F.log_softmax(self.logits(x).float(), dim=-1)  # [R, K]
        bucket = log_bucket(gap_days.double(), self.buckets, self.window_days) - 1  # [R]
        observed = log_p.gather(1, bucket[:, None])[:, 0]
        at_or_after = torch.arange(log_p.shape[1], device=x.device) >= bucket[:, None]  # [R, K]
        survived = log_p.masked_fill(~at_or_after, -torch.inf).logsumexp(dim=1)
        return -torch.where(censored, survived, observed).mean()


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
        size = model.config.embedding_size
        self.masked_head = EventHead(model.config.hidden_size, model.config)
        self.next_head = EventHead(size, model.config)
        self.future_head = FutureHead(size, model.config, len(config.future_horizons_days))
        self.gap_head = GapHead(size, model.config, config.gap_buckets)

    def forward(
        self, views: ViewBatch, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """Losses (scalars): one per objective (OBJECTIVES) and their weighted sum "loss"."""
        config = self.config
        originals = views.inputs  # [2B, L]: A of every user, then B
        inputs, hidden = mask_events(originals, config.mask_fraction, generator)
        # embedding [2B, E]; states [N masked, H]
        embedding, states = _forward_in_buckets(self.model, inputs, hidden, config.length_buckets)
        B = len(views) // 2
        has_next = views.has_next
        losses = {
            "masked": self.masked_head.loss(
                states, originals.action_ids[hidden], originals.property_ids[hidden]
            ),
            "next": self.next_head.loss(
                embedding[has_next], views.next_action[has_next], views.next_property[has_next]
            ),
            "contrastive": info_nce(embedding[:B], embedding[B:], config.temperature),
            "future": self.future_head.loss(embedding, views),
            "gap": self.gap_head.loss(embedding, views.gap_days, views.gap_censored),
        }
        losses["loss"] = sum(
            getattr(config, f"{name}_weight") * losses[name] for name in OBJECTIVES
        )
        return losses
