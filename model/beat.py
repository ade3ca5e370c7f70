"""BEAT: a transformer encoder over one user's behavioral event sequence.

Inputs, one row per user, events oldest → newest:

    action_ids    [B, L] long    vocabulary ids; 0 is padding
    property_ids  [B, L] long    vocabulary ids; 0 is padding
    time_gaps     [B, L] float   age of each event in days (>= 0), counted back from the row's
                                 reference time ("as of"): the newest event's age is how long the
                                 user had been silent by then (0 when the reference time is the
                                 newest event itself)
    padding_mask  [B, L] bool    True for a real event (default: action_ids != 0)
    event_times   [B, L] int64 or float64 unix milliseconds, optional; used only for the
                                 hour-of-day and day-of-week signals (UTC)
    values        [B, L] float   the event's amount, optional; NaN where an event has none
                                 (a page view), which the model tells apart from an amount of 0
    earlier_events, earlier_value, first_event_age   [B] float, optional: the user's history
                                 before the window (events, their amounts' sum, and days since
                                 the first event); absent means the window is all there was

Padding may sit anywhere (the encoder pads on the right); what a padded slot holds never
matters. The gap to the previous event is derived here from time_gaps. There is no position
embedding: event ages already order the sequence, and ties (events in the same millisecond)
are genuinely unordered.

Output: {"embedding": [B, embedding_size], "hidden_states": [B, L, hidden_size]}; the hidden
states of padded slots are zero.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import BeatConfig
from model.model_dir import WEIGHTS_FILE, check_tensors, load_model_dir, save_model_dir
from model.vocab import Vocabulary

SECONDS_PER_DAY = 86_400
MS_PER_DAY = 86_400_000
AGE_FREQUENCIES = 16  # sinusoids over the window, periods from window_days down to one hour
VALUE_SATURATION = 1e6  # amounts beyond ±VALUE_SATURATION share the outermost value buckets


def log_bucket(days: Tensor, num_buckets: int, window_days: float) -> Tensor:
    """Bucket durations (days, >= 0) on a log scale into 1 .. num_buckets-1; 0 stays reserved.

    Log scale because what matters is relative: 10 s vs 1 min is as telling as 1 day vs 6 days.
    Buckets span sub-second to window_days evenly in log(1 + seconds); longer goes to the last.
    """
    scale = (num_buckets - 2) / math.log1p(window_days * SECONDS_PER_DAY)
    buckets = (torch.log1p(days.clamp_min(0) * SECONDS_PER_DAY) * scale).long()
    return buckets.clamp_max(num_buckets - 2) + 1


class AgeEncoding(nn.Module):
    """How long before the reference time an event happened: a learned embedding of the
    log-bucketed age plus a learned projection of fixed sinusoids spanning the window.

    Ages beyond window_days (a silence plus a whole window) saturate: the last bucket, and the
    sinusoids of window_days, whose slowest wave would otherwise wrap around and make an event
    100 days old look like one 10 days old."""

    def __init__(self, config: BeatConfig) -> None:
        super().__init__()
        self.window_days = config.window_days
        self.buckets = nn.Embedding(config.time_buckets, config.hidden_size)  # 0: padding
        self.sinusoids = nn.Linear(2 * AGE_FREQUENCIES, config.hidden_size, bias=False)

    def forward(self, age: Tensor, mask: Tensor) -> Tensor:
        # age: [B, L] float64 days, 0 at padding; mask: [B, L] bool
        bucket = log_bucket(age, self.buckets.num_embeddings, self.window_days)
        bucket = bucket.masked_fill(~mask, 0)  # [B, L]
        periods = torch.logspace(  # [F] days, geometric from the whole window to one hour
            math.log10(self.window_days),
            math.log10(1 / 24),
            AGE_FREQUENCIES,
            dtype=torch.float64,
            device=age.device,
        )
        angles = age.clamp_max(self.window_days)[..., None] * (2 * math.pi / periods)  # [B, L, F]
        waves = torch.cat([angles.sin(), angles.cos()], dim=-1)  # [B, L, 2F]
        return self.buckets(bucket) + self.sinusoids(waves.to(self.sinusoids.weight.dtype))


class GapEncoding(nn.Module):
    """Time since the user's previous event, log-bucketed, as a learned embedding (HSTU)."""

    def __init__(self, config: BeatConfig) -> None:
        super().__init__()
        self.window_days = config.window_days
        self.buckets = nn.Embedding(config.time_buckets, config.hidden_size)  # 0: no previous

    def forward(self, age: Tensor, mask: Tensor) -> Tensor:
        # age: [B, L] float64 days; mask: [B, L] bool
        # The previous real event is the youngest real event before this one: a running minimum
        # of ages that skips padding, so it works wherever the padding sits.
        real_age = age.masked_fill(~mask, math.inf)
        previous = torch.cummin(real_age, dim=1).values.roll(1, dims=1)  # [B, L]
        previous[:, 0] = math.inf
        has_previous = mask & previous.isfinite()
        gap = torch.where(has_previous, previous - age, 0.0)  # [B, L] days
        bucket = log_bucket(gap, self.buckets.num_embeddings, self.window_days)
        return self.buckets(bucket.masked_fill(~has_previous, 0))  # [B, L, H]


class PeriodicEncoding(nn.Module):
    """Hour of day and day of week (UTC) as sin/cos pairs, linearly projected (PANTHER)."""

    def __init__(self, config: BeatConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(4, config.hidden_size, bias=False)

    def forward(self, event_times: Tensor) -> Tensor:
        # event_times: [B, L] unix ms. Take remainders in int64: float32 milliseconds near 2025
        # are only exact to about two minutes.
        ms = event_times.to(torch.int64)
        hour_of_day = (ms % MS_PER_DAY).double() / MS_PER_DAY  # [B, L] in [0, 1)
        day_of_week = ((ms // MS_PER_DAY + 3) % 7 + hour_of_day) / 7  # 1970-01-01 was a Thursday
        angles = 2 * math.pi * torch.stack([hour_of_day, day_of_week], dim=-1)  # [B, L, 2]
        waves = torch.cat([angles.sin(), angles.cos()], dim=-1)  # [B, L, 4]
        return self.proj(waves.to(self.proj.weight.dtype))


class ValueEncoding(nn.Module):
    """An event's amount: a learned embedding of its bucket on a signed log scale, plus a
    learned projection of the signed log itself (resolution within a bucket).

    Buckets: 0 padding, 1 no value (NaN: the event carries no amount), 2 exactly zero, then
    value_buckets - 3 even steps of sign(v) * log1p(|v|) over ±log1p(VALUE_SATURATION), about
    one e-fold each at the default 32. Log scale, fixed in advance, because amounts span
    cents to millions in every currency and the scale must not depend on one data set.
    """

    def __init__(self, config: BeatConfig) -> None:
        super().__init__()
        self.buckets = nn.Embedding(config.value_buckets, config.hidden_size)  # 0: padding
        self.magnitude = nn.Linear(1, config.hidden_size, bias=False)

    def forward(self, values: Tensor, mask: Tensor) -> Tensor:
        # values: [B, L] float, NaN where an event has no amount; mask: [B, L] bool
        present = mask & values.isfinite()
        amount = torch.where(present, values, 0.0).double()  # [B, L]
        scaled = (_signed_log1p(amount) / math.log1p(VALUE_SATURATION)).clamp(-1, 1)
        steps = self.buckets.num_embeddings - 3
        bucket = 3 + ((scaled + 1) / 2 * steps).long().clamp_max(steps - 1)  # [B, L]
        bucket = torch.where(amount == 0, 2, bucket).masked_fill(~present, 1).masked_fill(~mask, 0)
        magnitude = scaled.masked_fill(~present, 0.0)[..., None]  # [B, L, 1]
        return self.buckets(bucket) + self.magnitude(magnitude.to(self.magnitude.weight.dtype))


class WindowStatistics(nn.Module):
    """Aggregates of the whole window, as features [B, num_features]: what attention, which
    averages, cannot count (BaseModel feeds such count sketches beside its sequence encoder).

    Always: log1p of the number of events and of those with an amount, signed log1p of the sum
    of amounts, and count sketches: log1p of each action's and each property's count.
    With the age encoding on (these read the time before as-of, so they go when it goes):
    log1p of the events within the last 1, 7 and 30 days; log1p of the age in days of the
    newest and the oldest event and of the span between them (unclipped: no saturation at
    window_days); signed log1p of the amounts within 30 days; and the count sketches again
    over the last 7 days. All are zero for an empty window.
    With the lifetime statistics on, the same for the user's whole history, the window and the
    events before it: log1p of the number of events, signed log1p of the sum of amounts, and
    (with the age encoding) log1p of the days since the first event, the user's tenure. A
    window keeps a span of recent events; tenure and lifetime frequency lie outside it and
    are among the strongest signals of churn and of value.
    """

    RECENT_DAYS = (1.0, 7.0, 30.0)
    SKETCH_DAYS = 7.0

    def __init__(self, config: BeatConfig) -> None:
        super().__init__()
        self.vocab_sizes = (config.action_vocab_size, config.property_vocab_size)
        self.temporal = config.use_age_encoding
        self.lifetime = config.use_lifetime_statistics
        scalars = 3 + (len(self.RECENT_DAYS) + 4 if self.temporal else 0)
        scalars += (2 + self.temporal) if self.lifetime else 0
        sketches = (2 if self.temporal else 1) * sum(self.vocab_sizes)
        self.num_features = scalars + sketches

    def forward(
        self,
        action_ids: Tensor,
        property_ids: Tensor,
        age: Tensor,
        mask: Tensor,
        values: Tensor,
        earlier: tuple[Tensor, Tensor, Tensor],
    ) -> Tensor:
        # ids: [B, L]; age: [B, L] float64 days (0 at padding); mask: [B, L] bool; values: [B, L]
        # earlier: events before the window, their amounts' sum, days since the first event [B]
        real = mask.double()
        has_amount = mask & values.isfinite()
        amount = torch.where(has_amount, values.double(), 0.0)  # [B, L]
        scalars = [
            real.sum(1).log1p(),
            has_amount.double().sum(1).log1p(),
            _signed_log1p(amount.sum(1)),
        ]
        weights = [real]  # of the count sketches
        if self.temporal:
            newest = age.masked_fill(~mask, math.inf).amin(1)
            oldest = age.masked_fill(~mask, -math.inf).amax(1)
            newest, oldest = (torch.where(mask.any(1), t, 0.0) for t in (newest, oldest))
            scalars += [(real * (age < days)).sum(1).log1p() for days in self.RECENT_DAYS]
            scalars += [
                newest.log1p(),
                oldest.log1p(),
                (oldest - newest).log1p(),
                _signed_log1p((amount * (age < 30.0)).sum(1)),
            ]
            weights.append(real * (age < self.SKETCH_DAYS))
        if self.lifetime:
            earlier_events, earlier_value, first_event_age = (t.double() for t in earlier)
            scalars += [
                (real.sum(1) + earlier_events).log1p(),
                _signed_log1p(amount.sum(1) + earlier_value),
            ]
            if self.temporal:
                scalars.append(first_event_age.clamp_min(0).log1p())
        sketches = []
        for ids, size in zip((action_ids, property_ids), self.vocab_sizes):
            index = ids.masked_fill(~mask, 0)  # padded slots may hold anything
            for weight in weights:
                counts = torch.zeros(len(ids), size, dtype=torch.float64, device=ids.device)
                sketches.append(counts.scatter_add_(1, index, weight).log1p())  # [B, V]
        return torch.cat([torch.stack(scalars, dim=1), *sketches], dim=1)  # [B, F] float64


def _signed_log1p(x: Tensor) -> Tensor:
    return x.sign() * x.abs().log1p()


class EventEmbedding(nn.Module):
    """One token per event: action + property + the enabled temporal and value terms,
    normalized."""

    def __init__(self, config: BeatConfig) -> None:
        super().__init__()
        self.action = nn.Embedding(config.action_vocab_size, config.hidden_size, padding_idx=0)
        self.property = nn.Embedding(config.property_vocab_size, config.hidden_size, padding_idx=0)
        self.age = AgeEncoding(config) if config.use_age_encoding else None
        self.gap = GapEncoding(config) if config.use_gap_encoding else None
        self.periodic = PeriodicEncoding(config) if config.use_periodic_encoding else None
        self.value = ValueEncoding(config) if config.use_value_encoding else None
        self.norm = nn.LayerNorm(config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        action_ids: Tensor,
        property_ids: Tensor,
        time_gaps: Tensor,
        mask: Tensor,
        event_times: Tensor | None,
        values: Tensor | None,
    ) -> Tensor:
        x = self.action(action_ids) + self.property(property_ids)  # [B, L, H]
        # Padded slots may hold anything, NaN included; zero them so that nothing non-finite
        # can reach the attention scores (a NaN key poisons every row of softmax).
        age = torch.where(mask, time_gaps.double(), 0.0).clamp_min(0)  # [B, L] days
        if self.age is not None:
            x = x + self.age(age, mask)
        if self.gap is not None:
            x = x + self.gap(age, mask)
        if self.periodic is not None and event_times is not None:
            x = x + self.periodic(torch.where(mask, event_times, 0))
        if self.value is not None:
            # no values given: no event carries an amount (NaN), not an amount of zero
            values = torch.full_like(age, math.nan) if values is None else values
            x = x + self.value(values, mask)
        return self.dropout(self.norm(x))


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention; padded keys are masked out."""

    def __init__(self, config: BeatConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, keep: Tensor | None) -> Tensor:
        # x: [B, T, H]; keep: [B, 1, 1, T] bool, True where a key may be attended to; None: all
        B, T, H = x.shape
        q, k, v = self.qkv(x).split(H, dim=2)  # each [B, T, H]
        head_size = H // self.num_heads
        q, k, v = (t.view(B, T, self.num_heads, head_size).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(  # [B, nh, T, hd]
            q, k, v, attn_mask=keep, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).reshape(B, T, H)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: BeatConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.hidden_size, config.mlp_ratio * config.hidden_size)
        self.gelu = nn.GELU()
        self.proj = nn.Linear(config.mlp_ratio * config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(self.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, config: BeatConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size)
        self.attn = SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.hidden_size)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, keep: Tensor | None) -> Tensor:
        x = x + self.attn(self.ln_1(x), keep)
        return x + self.mlp(self.ln_2(x))


class Beat(nn.Module):
    def __init__(self, config: BeatConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = EventEmbedding(config)
        # A learned [CLS]-style token read out as the user's summary. It is never padding, so
        # every attention row has at least one key and even an empty window gives no NaN.
        self.summary = nn.Parameter(torch.empty(1, 1, config.hidden_size))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size)
        self.head = nn.Linear(config.hidden_size, config.embedding_size)
        # The window's aggregates, projected to the hidden size, enter the summary token (so
        # attention can use them) and the embedding itself (so a linear probe can read them,
        # whatever the blocks did).
        self.statistics = WindowStatistics(config) if config.use_window_statistics else None
        if self.statistics is not None:
            features = self.statistics.num_features
            self.statistics_in = nn.Linear(features, config.hidden_size, bias=False)
            self.statistics_out = nn.Linear(config.hidden_size, config.embedding_size, bias=False)

        self.apply(self._init_weights)
        nn.init.normal_(self.summary, std=0.02)
        # GPT-2: scale the residual projections so the residual stream's variance does not grow
        # with depth.
        for name, param in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
                nn.init.normal_(param, std=0.02 / math.sqrt(2 * config.num_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        action_ids: Tensor,
        property_ids: Tensor,
        time_gaps: Tensor,
        padding_mask: Tensor | None = None,
        event_times: Tensor | None = None,
        values: Tensor | None = None,
        earlier_events: Tensor | None = None,
        earlier_value: Tensor | None = None,
        first_event_age: Tensor | None = None,
    ) -> dict[str, Tensor]:
        B, L = action_ids.shape
        if L > self.config.max_events:
            raise ValueError(f"{L} events per row; BEAT takes at most {self.config.max_events}")
        if padding_mask is None:
            padding_mask = action_ids != 0

        x = self.embed(  # [B, L, H]
            action_ids, property_ids, time_gaps, padding_mask, event_times, values
        )
        summary = self.summary.expand(B, -1, -1)  # [B, 1, H]
        if self.statistics is not None:
            age = torch.where(padding_mask, time_gaps.double(), 0.0).clamp_min(0)
            amounts = torch.full_like(age, math.nan) if values is None else values
            none = torch.zeros(B, dtype=torch.float64, device=age.device)
            earlier = (
                none if earlier_events is None else earlier_events,
                none if earlier_value is None else earlier_value,
                age.amax(1) if first_event_age is None else first_event_age,  # the oldest event
            )
            stats = self.statistics(action_ids, property_ids, age, padding_mask, amounts, earlier)
            stats = self.statistics_in(stats.to(self.statistics_in.weight.dtype))  # [B, H]
            summary = summary + stats[:, None]
        x = torch.cat([summary, x], dim=1)  # [B, 1+L, H]
        # Keys to attend to, [B, 1, 1, 1+L]: the same for every head and query; the summary is
        # always kept. None when nothing is padded, so that SDPA may pick its flash kernels.
        keep = None
        if not bool(padding_mask.all()):
            keep = F.pad(padding_mask, (1, 0), value=True)[:, None, None, :]
        for block in self.blocks:
            x = block(x, keep)
        x = self.ln_f(x)

        embedding = self.head(x[:, 0])  # [B, E]
        if self.statistics is not None:
            embedding = embedding + self.statistics_out(stats)
        hidden_states = x[:, 1:].masked_fill(~padding_mask[..., None], 0.0)  # [B, L, H]
        return {"embedding": embedding, "hidden_states": hidden_states}

    def save_pretrained(
        self,
        directory: str | Path,
        actions: Vocabulary,
        properties: Vocabulary,
        model_version: str | None = None,
    ) -> str:
        """Write a model directory; returns its model version (default: a hash of its content)."""
        return save_model_dir(
            directory, self.config, self.state_dict(), actions, properties, model_version
        )

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> Beat:
        """Load the weights of a model directory (on CPU, in eval mode)."""
        saved = load_model_dir(directory)
        return cls.from_tensors(saved.config, saved.tensors, str(Path(directory) / WEIGHTS_FILE))

    @classmethod
    def from_tensors(
        cls, config: BeatConfig, tensors: dict[str, Tensor], source: str = "weights"
    ) -> Beat:
        """A model with these weights; ValueError (naming `source`) if they do not fit config."""
        # Build on the meta device (no memory, no random init) and adopt the loaded tensors.
        with torch.device("meta"):
            model = cls(config)
        check_tensors(tensors, model.state_dict(), source)
        model.load_state_dict(tensors, assign=True)
        return model.eval()
