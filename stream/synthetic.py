"""A synthetic user population with planted structure, emitting behavioral events as Arrow
batches in the EVENT_SCHEMA layout (stream/event_contract.py).

The population is there to be *checked*, not only to produce load: each user has a
persona (distinct action mixes, favourite properties, daily and weekly rhythms), some users
churn, activity is Zipf-distributed, and events come in sessions. ``personas()`` tells
evaluation what was planted, so an embedding can be tested for recovering it. Generation
works on whole columns, so it feeds Kafka, pretraining and tests at millions of events per
second.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa

from stream.event_contract import (
    DAY_MS,
    EVENT_SCHEMA,
    HOUR_MS,
    U64,
    epoch_ms,
    hex_ids,
    key64,
    mix64,
    string_map,
)

# ---------------------------------------------------------------------------------------
# Catalog: every action and property the generator can emit (model vocabularies use it).
# ---------------------------------------------------------------------------------------

ACTIONS = [
    "page_view", "search", "view_item", "add_to_cart", "remove_from_cart", "wishlist_add",
    "purchase", "card_payment", "card_declined", "refund", "login", "logout",
    "password_reset", "support_call", "review", "app_open", "game_start", "level_up",
    "booking", "check_in",
]  # fmt: skip
MONEY_ACTIONS = ("purchase", "card_payment", "refund")

# What an action is done to; None: the action has no property.
_PROPERTY_KIND_SIZES = {
    "page": 24,
    "category": 80,
    "merchant": 160,
    "game": 30,
    "destination": 40,
    "topic": 12,
}
_ACTION_PROPERTY_KIND = {
    "page_view": "page", "search": "category", "view_item": "category", "add_to_cart": "category",
    "remove_from_cart": "category", "wishlist_add": "category", "purchase": "category",
    "card_payment": "merchant", "card_declined": "merchant", "refund": "merchant",
    "login": None, "logout": None, "password_reset": None, "support_call": "topic",
    "review": "category", "app_open": None, "game_start": "game", "level_up": "game",
    "booking": "destination", "check_in": "destination",
}  # fmt: skip
PROPERTIES = [f"{kind}_{i:03d}" for kind, size in _PROPERTY_KIND_SIZES.items() for i in range(size)]
CHANNELS = ["web", "ios", "android"]


@dataclass(frozen=True)
class _Persona:
    """How one kind of user behaves; the planted structure evaluation looks for."""

    name: str
    share: float  # of the population
    sessions_per_day: float  # for a user of mean activity, averaged over the week
    events_per_session: float  # mean of a geometric length
    gap_median_s: float  # between events inside a session
    mix: Mapping[str, float]  # action weights; unnamed actions get _MIX_FLOOR
    hour_peaks: tuple[tuple[float, float, float], ...]  # (hour UTC, width h, height)
    weekday: tuple[float, ...]  # Monday..Sunday intensity
    value_scale: float  # multiplies the typical amount of money actions


PERSONAS = [
    _Persona(
        "shopper", 0.30, 1.2, 9, 25,
        {"page_view": 10, "search": 8, "view_item": 14, "add_to_cart": 6, "remove_from_cart": 1.5,
         "wishlist_add": 2, "purchase": 3, "card_payment": 3, "refund": 0.4, "login": 2,
         "logout": 1, "review": 1, "app_open": 2},
        ((12.5, 1.5, 0.6), (20.5, 2.0, 1.0)), (0.9, 0.9, 0.9, 0.95, 1.1, 1.3, 1.2), 1.5,
    ),
    _Persona(
        "browser", 0.28, 2.0, 6, 20,
        {"page_view": 25, "search": 10, "view_item": 10, "add_to_cart": 1, "wishlist_add": 1.5,
         "purchase": 0.3, "card_payment": 0.3, "login": 2, "logout": 1.5, "app_open": 5,
         "review": 0.3},
        ((8.0, 1.5, 0.7), (13.0, 2.0, 0.5), (21.5, 2.0, 1.0)), (1, 1, 1, 1, 1, 0.9, 0.9), 0.8,
    ),
    _Persona(
        "gamer", 0.14, 1.5, 12, 30,
        {"app_open": 6, "login": 3, "game_start": 12, "level_up": 9, "purchase": 1,
         "card_payment": 1.5, "page_view": 3, "logout": 2, "review": 0.5},
        ((22.5, 2.5, 1.0), (17.0, 2.0, 0.5)), (0.8, 0.8, 0.8, 0.9, 1.2, 1.5, 1.4), 0.3,
    ),
    _Persona(
        "traveller", 0.12, 0.35, 7, 40,
        {"search": 8, "page_view": 6, "booking": 3, "check_in": 2, "card_payment": 3,
         "purchase": 0.5, "login": 2, "view_item": 2, "support_call": 0.5, "refund": 0.3,
         "logout": 1},
        ((10.0, 2.5, 0.8), (15.0, 2.5, 0.7)), (1.2, 1.2, 1.1, 1.1, 1.0, 0.6, 0.8), 6.0,
    ),
    _Persona(
        "complainer", 0.10, 0.6, 5, 45,
        {"support_call": 5, "refund": 3, "login": 2, "page_view": 5, "purchase": 1.5,
         "card_payment": 1.5, "review": 2, "view_item": 3, "logout": 1, "password_reset": 0.6},
        ((11.0, 2.0, 1.0), (15.5, 2.0, 0.8)), (1.3, 1.2, 1.2, 1.2, 1.1, 0.4, 0.3), 1.0,
    ),
    _Persona(  # card testing: long night-time bursts of tiny payments, many declined
        "fraudster", 0.06, 0.8, 16, 3,
        {"login": 2, "password_reset": 1.5, "card_payment": 14, "card_declined": 9,
         "page_view": 1, "purchase": 1},
        ((3.0, 1.5, 1.0),), (1, 1, 1, 1, 1, 1, 1), 0.06,
    ),
]  # fmt: skip

# Actions that tend to follow each other (a shopping funnel, game loops, card testing...);
# every persona's transition matrix is its mix re-weighted by these affinities.
_FLOWS = [
    ("search", "view_item", 3), ("search", "booking", 2), ("view_item", "add_to_cart", 2),
    ("view_item", "view_item", 1), ("add_to_cart", "purchase", 3), ("purchase", "card_payment", 4),
    ("card_payment", "card_declined", 1), ("card_declined", "card_payment", 3),
    ("login", "page_view", 1), ("app_open", "game_start", 2), ("game_start", "level_up", 3),
    ("level_up", "game_start", 1), ("booking", "card_payment", 3), ("booking", "check_in", 1),
    ("support_call", "refund", 3), ("refund", "review", 1), ("password_reset", "login", 4),
]  # fmt: skip
_SESSION_OPENERS = ("login", "app_open", "page_view", "search")
_MIX_FLOOR = 0.1
_TYPICAL_AMOUNT = {"purchase": 30.0, "card_payment": 20.0, "refund": 35.0}
_AMOUNT_SIGMA = 0.8
_GAP_SIGMA = 1.3  # lognormal spread of in-session gaps: seconds to tens of minutes
_MAX_SESSION_EVENTS = 64
_ACTIVITY_ZIPF = 0.7  # user activity ∝ rank^-s
_MAX_ACTIVITY = 100.0  # times the mean: keeps the very top users plausible at 100k users
_PROPERTY_ZIPF = 1.1
_FAVOURITES = 4  # per user and property kind, drawn from the persona's top _FAVOURITE_POOL
_FAVOURITE_POOL = 30
_FAVOURITE_SHARE = 0.4  # of property draws that pick one of the user's favourites


def _persona_tables() -> dict[str, np.ndarray]:
    """The personas as arrays indexed [persona, ...], so sampling is a gather."""
    action = {a: i for i, a in enumerate(ACTIONS)}
    mix = np.full((len(PERSONAS), len(ACTIONS)), _MIX_FLOOR)
    for p, persona in enumerate(PERSONAS):
        for name, weight in persona.mix.items():
            mix[p, action[name]] = weight
    affinity = np.zeros((len(ACTIONS), len(ACTIONS)))
    for before, after, strength in _FLOWS:
        affinity[action[before], action[after]] = strength
    opener = np.isin(ACTIONS, _SESSION_OPENERS)

    hours = np.arange(24)
    intensity = np.empty((len(PERSONAS), 7, 24))
    for p, persona in enumerate(PERSONAS):
        daily = np.full(24, 0.08)
        for peak, width, height in persona.hour_peaks:
            distance = np.minimum(np.abs(hours - peak), 24 - np.abs(hours - peak))
            daily += height * np.exp(-0.5 * (distance / width) ** 2)
        intensity[p] = np.outer(persona.weekday, daily)
        intensity[p] /= intensity[p].mean()

    amount = np.full((len(PERSONAS), len(ACTIONS)), np.nan)
    for name, typical in _TYPICAL_AMOUNT.items():
        amount[:, action[name]] = typical * np.array([p.value_scale for p in PERSONAS])

    return {
        "start_cdf": _cdf(mix * (1 + 4 * opener)),  # [P, A]
        "next_cdf": _cdf(mix[:, None, :] * (1 + 3 * affinity[None])),  # [P, A, A]
        "intensity": intensity,  # [P, weekday, hour], mean 1 per persona
        "hour_cdf": _cdf(intensity),  # [P, weekday, hour]
        "day_intensity": intensity.mean(axis=2),  # [P, weekday]
        "session_mean": np.array([p.events_per_session for p in PERSONAS], dtype=float),
        "gap_median_s": np.array([p.gap_median_s for p in PERSONAS], dtype=float),
        "sessions_per_day": np.array([p.sessions_per_day for p in PERSONAS]),
        "share": np.array([p.share for p in PERSONAS]),
        "amount": amount,  # [P, A], NaN for actions without a value
    }


def _cdf(weights: np.ndarray) -> np.ndarray:
    """Cumulative distribution along the last axis, ending at exactly 1."""
    cdf = np.cumsum(weights, axis=-1)
    cdf /= cdf[..., -1:]
    cdf[..., -1] = 1.0
    return cdf


def _draw(cdf_rows: np.ndarray, u: np.ndarray) -> np.ndarray:
    """One categorical draw per row of cdf_rows, from uniforms u."""
    return np.minimum((cdf_rows < u[:, None]).sum(axis=1), cdf_rows.shape[1] - 1)


_T = _persona_tables()
_MONEY = np.isin(ACTIONS, MONEY_ACTIONS)
_KIND_NAMES = list(_PROPERTY_KIND_SIZES)
_KIND_OF_ACTION = np.array(
    [_KIND_NAMES.index(k) if (k := _ACTION_PROPERTY_KIND[a]) else -1 for a in ACTIONS]
)
_KIND_SIZES = np.array(list(_PROPERTY_KIND_SIZES.values()))
_KIND_OFFSETS = np.concatenate([[0], np.cumsum(_KIND_SIZES)[:-1]])
_PROPERTY_ZIPF_CDF = [_cdf(np.arange(1, n + 1) ** -_PROPERTY_ZIPF) for n in _KIND_SIZES]
_ACTIONS_ARROW = pa.array(ACTIONS)
_PROPERTIES_ARROW = pa.array(PROPERTIES)
_CHANNELS_ARROW = pa.array(CHANNELS)


@dataclass
class _Events:
    """Generated events as numpy columns (indices into the catalog), before they become a batch."""

    user: np.ndarray  # int64 user index
    time_ms: np.ndarray  # int64
    action: np.ndarray  # int64 into ACTIONS
    property: np.ndarray  # int64 into PROPERTIES, -1: none
    value: np.ndarray  # float64, NaN: none
    id_word: np.ndarray  # uint64, unique per event

    def take(self, index: np.ndarray | slice) -> _Events:
        return _Events(*(column[index] for column in vars(self).values()))

    @staticmethod
    def concat(parts: list[_Events]) -> _Events:
        return _Events(
            *(np.concatenate(columns) for columns in zip(*(vars(p).values() for p in parts)))
        )


# ---------------------------------------------------------------------------------------
# The synthetic population
# ---------------------------------------------------------------------------------------

_HISTORY, _LIVE, _POPULATION = 1, 2, 3


class SyntheticEvents:
    """A deterministic synthetic user population that emits behavioral events.

    Users get a persona (``PERSONAS``: action mix and transitions, favourite properties,
    hour-of-day and day-of-week rhythm, session length and pace, amounts), a Zipf-distributed
    activity level, a channel, and (a ``churn_fraction`` of them) a churn: activity falls
    linearly to zero, starting somewhere in the first 10–70 % of
    ``[origin, origin + churn_horizon_days]`` and taking 10–30 % of that horizon.
    Histories placed after the horizon therefore no longer contain churners. Everything is a
    function of ``seed`` and the arguments: the same calls give the same events.
    """

    actions: list[str] = ACTIONS
    properties: list[str] = PROPERTIES
    persona_names: list[str] = [p.name for p in PERSONAS]

    def __init__(
        self,
        n_users: int = 10_000,
        seed: int = 0,
        *,
        churn_fraction: float = 0.15,
        origin: datetime = datetime(2024, 1, 1, tzinfo=UTC),
        churn_horizon_days: float = 180.0,
    ) -> None:
        if n_users < 1:
            raise ValueError(f"n_users must be at least 1, not {n_users}")
        self.n_users = n_users
        self.seed = seed
        rng = np.random.default_rng([_POPULATION, seed & 0xFFFFFFFF])
        self._persona = rng.choice(len(PERSONAS), size=n_users, p=_T["share"] / _T["share"].sum())
        self._activity = self._zipf_activity(rng, n_users) * _T["sessions_per_day"][self._persona]
        self._channel = rng.choice(len(CHANNELS), size=n_users, p=[0.45, 0.3, 0.25])
        self._favourite_key = mix64(np.arange(n_users, dtype=U64) ^ key64(seed, _POPULATION))
        # Each persona ranks each property kind differently: its popular subset.
        self._ranking = np.zeros((len(PERSONAS), len(_KIND_SIZES), _KIND_SIZES.max()), np.int64)
        for p, k in itertools.product(range(len(PERSONAS)), range(len(_KIND_SIZES))):
            self._ranking[p, k, : _KIND_SIZES[k]] = _KIND_OFFSETS[k] + rng.permutation(
                _KIND_SIZES[k]
            )
        self._churner = rng.random(n_users) < churn_fraction
        horizon_ms = churn_horizon_days * DAY_MS
        self._churn_start = epoch_ms(origin) + rng.uniform(0.1, 0.7, n_users) * horizon_ms
        self._churn_length = rng.uniform(0.1, 0.3, n_users) * horizon_ms
        width = max(6, len(str(n_users - 1)))
        self._user_ids = pa.array(
            np.char.add("u", np.char.zfill(np.arange(n_users).astype(str), width))
        )

    @staticmethod
    def _zipf_activity(rng: np.random.Generator, n_users: int) -> np.ndarray:
        """Relative activity per user: rank^-s over a random ranking, mean about 1."""
        activity = rng.permutation(n_users).astype(float) + 1.0
        activity **= -_ACTIVITY_ZIPF
        activity /= activity.mean()
        return np.minimum(activity, _MAX_ACTIVITY)

    def personas(self) -> pa.Table:
        """What was planted: each user's persona, churn flag and mean sessions per day."""
        return pa.table(
            {
                "user_id": self._user_ids,
                "persona": pa.array(np.array(self.persona_names)[self._persona]),
                "churner": pa.array(self._churner),
                "sessions_per_day": pa.array(self._activity),
            }
        )

    # -- history --------------------------------------------------------------------------

    def history(
        self, start: datetime, end: datetime, batch_size: int = 50_000
    ) -> Iterator[pa.RecordBatch]:
        """Events with start <= event_time < end, in event-time order, in batches of at most
        batch_size rows. Each day is generated from its own seed, so overlapping ranges agree
        (up to sessions running over a range's first midnight)."""
        start_ms, end_ms = epoch_ms(start), epoch_ms(end)
        if start_ms >= end_ms:
            raise ValueError(f"history needs start < end, got {start} .. {end}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        return self._history(start_ms, end_ms, batch_size)

    def _history(self, start_ms: int, end_ms: int, batch_size: int) -> Iterator[pa.RecordBatch]:
        spill = None  # events of sessions that ran past the previous day's end
        for day in range(start_ms // DAY_MS, -(-end_ms // DAY_MS)):
            events = self._day(day)
            if spill is not None:
                events = _Events.concat([spill, events])
            events = events.take(np.argsort(events.time_ms, kind="stable"))
            cut = np.searchsorted(events.time_ms, min((day + 1) * DAY_MS, end_ms))
            ready, spill = events.take(slice(0, cut)), events.take(slice(cut, None))
            ready = ready.take(slice(np.searchsorted(ready.time_ms, start_ms), None))
            for first in range(0, len(ready.time_ms), batch_size):
                yield self._batch(ready.take(slice(first, first + batch_size)))

    def _day(self, day: int) -> _Events:
        """All sessions that start on one UTC day (days since the epoch), expanded to events."""
        rng = np.random.default_rng([_HISTORY, self.seed & 0xFFFFFFFF, day & 0xFFFFFFFF])
        weekday = (day + 3) % 7  # 1970-01-01 was a Thursday
        expected = self._activity * _T["day_intensity"][self._persona, weekday]
        expected *= self._still_active((day + 0.5) * DAY_MS)
        users = self._pick_users(rng, np.cumsum(expected), rng.poisson(expected.sum()))
        hour = _draw(_T["hour_cdf"][self._persona[users], weekday], rng.random(len(users)))
        start_ms = day * DAY_MS + hour * HOUR_MS + rng.integers(0, HOUR_MS, len(users))
        users, time_ms, action = self._sessions(rng, users, start_ms)
        counter = (np.uint64(day & 0x7FFFFFFF) << U64(32)) | np.arange(len(users), dtype=U64)
        return self._events(
            rng, users, time_ms, action, mix64(counter ^ key64(self.seed, _HISTORY))
        )

    def _sessions(
        self, rng: np.random.Generator, users: np.ndarray, start_ms: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Whole sessions as (user, time_ms, action) per event: a geometric number of events,
        lognormal gaps, actions from the persona's Markov chain."""
        persona = self._persona[users]
        length = np.minimum(rng.geometric(1 / _T["session_mean"][persona]), _MAX_SESSION_EVENTS)
        session = np.repeat(np.arange(len(users)), length)
        first = np.cumsum(length) - length
        gap_s = rng.lognormal(np.log(_T["gap_median_s"][persona[session]]), _GAP_SIGMA)
        gap_s[first] = 0.0
        elapsed_s = np.cumsum(gap_s)
        time_ms = start_ms[session] + np.round(
            (elapsed_s - elapsed_s[first][session]) * 1000
        ).astype(np.int64)

        action = np.empty(len(session), dtype=np.int64)
        previous = np.full(len(users), -1)
        for position in range(int(length.max(initial=0))):
            going = np.flatnonzero(length > position)
            previous[going] = self._next_actions(rng, persona[going], previous[going])
            action[first[going] + position] = previous[going]
        return users[session], time_ms, action

    def _events(
        self,
        rng: np.random.Generator,
        users: np.ndarray,
        time_ms: np.ndarray,
        action: np.ndarray,
        id_word: np.ndarray,
    ) -> _Events:
        """Completes (user, time, action) triples with properties and amounts."""
        persona = self._persona[users]
        amount = _T["amount"][persona, action] * rng.lognormal(0.0, _AMOUNT_SIGMA, len(users))
        value = np.where(_MONEY[action], np.maximum(np.round(amount, 2), 0.01), np.nan)
        return _Events(
            users, time_ms, action, self._properties(rng, users, persona, action), value, id_word
        )

    @staticmethod
    def _next_actions(
        rng: np.random.Generator, persona: np.ndarray, previous: np.ndarray
    ) -> np.ndarray:
        """One Markov step per row; previous == -1 opens a session."""
        rows = np.where(
            (previous < 0)[:, None],
            _T["start_cdf"][persona],
            _T["next_cdf"][persona, np.maximum(previous, 0)],
        )
        return _draw(rows, rng.random(len(persona)))

    def _properties(
        self, rng: np.random.Generator, users: np.ndarray, persona: np.ndarray, action: np.ndarray
    ) -> np.ndarray:
        """A Zipf draw over the persona's ranking of the action's property kind, or one of the
        user's few favourites (themselves among the persona's top picks); -1 when the action
        has no property."""
        kind = _KIND_OF_ACTION[action]
        out = np.full(len(action), -1, dtype=np.int64)
        for k, cdf in enumerate(_PROPERTY_ZIPF_CDF):
            rows = np.flatnonzero(kind == k)
            rank = np.searchsorted(cdf, rng.random(len(rows)))
            which = rng.integers(0, _FAVOURITES, len(rows)).astype(U64)
            favourite = mix64(self._favourite_key[users[rows]] ^ U64(k << 8) ^ which)
            favourite = (favourite % U64(min(_FAVOURITE_POOL, _KIND_SIZES[k]))).astype(np.int64)
            rank = np.where(rng.random(len(rows)) < _FAVOURITE_SHARE, favourite, rank)
            out[rows] = self._ranking[persona[rows], k, rank]
        return out

    def _still_active(self, time_ms: float) -> np.ndarray:
        """Per user activity multiplier at a time: 1, or a churner's linear fade to 0."""
        fade = np.clip(1 - (time_ms - self._churn_start) / self._churn_length, 0.0, 1.0)
        return np.where(self._churner, fade, 1.0)

    @staticmethod
    def _pick_users(rng: np.random.Generator, cumulative_weights: np.ndarray, n: int) -> np.ndarray:
        """n users drawn with replacement, proportionally to their weights."""
        total = cumulative_weights[-1]
        if n == 0 or total <= 0:
            return np.empty(0, dtype=np.int64)
        picked = np.searchsorted(cumulative_weights, rng.random(n) * total, side="right")
        return np.minimum(picked, len(cumulative_weights) - 1)

    # -- live -----------------------------------------------------------------------------

    def live(
        self, rate_per_s: float, start: datetime | None = None, interval_ms: int = 100
    ) -> Iterator[pa.RecordBatch]:
        """An endless stream: one batch per interval_ms of event time, every event in a batch
        stamped with the batch's instant (start, start + interval_ms, ...; start defaults to
        the moment the first batch is drawn), about rate_per_s events per second on average
        (Poisson per batch).

        The generator never sleeps; the caller paces, e.g. sends a batch when the wall clock
        reaches its event_time, so event_time is "now" and freshness can be measured
        downstream. The total rate is fixed; who acts follows activity, churn (churned users
        stay silent) and the personas' rhythm at that hour. Sessions carry on across batches:
        each batch is first filled with the next events of sessions whose next event is due,
        the rest opens new sessions, so the stream settles into the same bursty structure as
        ``history``."""
        if rate_per_s <= 0 or interval_ms <= 0:
            raise ValueError(
                f"live needs rate_per_s > 0 and interval_ms > 0, got {rate_per_s}, {interval_ms}"
            )
        return self._live(rate_per_s, start, interval_ms)

    def _live(
        self, rate_per_s: float, start: datetime | None, interval_ms: int
    ) -> Iterator[pa.RecordBatch]:
        # Now is when the first batch is drawn, not when live() was called: a producer that
        # got ready in between would send every event late by that much.
        start_ms = epoch_ms(start if start is not None else datetime.now(UTC))
        rng = np.random.default_rng([_LIVE, self.seed & 0xFFFFFFFF, start_ms & 0xFFFFFFFFFFFF])
        id_key = key64(self.seed, _LIVE, start_ms)
        sessions = _OpenSessions(rng, self._persona)
        emitted = 0
        hour, cumulative_weights = start_ms // HOUR_MS, np.cumsum(self._live_weights(start_ms))
        for tick in itertools.count():
            now_ms = start_ms + tick * interval_ms
            if now_ms // HOUR_MS != hour:  # rhythms and churn move by the hour
                hour, cumulative_weights = now_ms // HOUR_MS, np.cumsum(self._live_weights(now_ms))
            n = rng.poisson(rate_per_s * interval_ms / 1000)
            going = sessions.due(now_ms, n)
            opened = self._pick_users(rng, cumulative_weights, n - len(going))
            users = np.concatenate([sessions.user[going], opened])
            previous = np.concatenate([sessions.previous[going], np.full(len(opened), -1)])
            action = self._next_actions(rng, self._persona[users], previous)
            sessions.advance(going, action[: len(going)], now_ms)
            sessions.open(opened, action[len(going) :], now_ms)
            id_word = mix64(np.arange(emitted, emitted + len(users), dtype=U64) ^ id_key)
            emitted += len(users)
            yield self._batch(
                self._events(rng, users, np.full(len(users), now_ms), action, id_word)
            )

    def _live_weights(self, time_ms: int) -> np.ndarray:
        """How likely each user is to open a session at this hour."""
        weekday, hour = (time_ms // DAY_MS + 3) % 7, (time_ms // HOUR_MS) % 24
        return (
            self._activity
            * _T["intensity"][self._persona, weekday, hour]
            * self._still_active(time_ms)
        )

    def _batch(self, events: _Events) -> pa.RecordBatch:
        n = len(events.user)
        attributes = string_map(
            np.arange(n),
            pa.array(np.full(n, "channel")),
            _CHANNELS_ARROW.take(self._channel[events.user]),
            n,
        )
        return pa.RecordBatch.from_arrays(
            [
                self._user_ids.take(events.user),
                hex_ids(events.id_word),
                pa.array(events.time_ms, pa.timestamp("ms", tz="UTC")),
                _ACTIONS_ARROW.take(events.action),
                _PROPERTIES_ARROW.take(pa.array(events.property, mask=events.property < 0)),
                pa.array(events.value, mask=np.isnan(events.value)),
                attributes,
            ],
            schema=EVENT_SCHEMA,
        )


class _OpenSessions:
    """Live sessions between events: who, their last action, events left, when the next is due.

    Slots of finished sessions are reused (due at _FREE) instead of compacting the arrays,
    so a batch costs two comparisons over the open sessions, not copies of them."""

    _FREE = np.iinfo(np.int64).max

    def __init__(self, rng: np.random.Generator, persona: np.ndarray) -> None:
        self.rng = rng
        self.persona = persona  # of every user
        self.user = np.empty(0, np.int64)
        self.previous = np.empty(0, np.int64)
        self.left = np.empty(0, np.int64)
        self.due_ms = np.empty(0, np.int64)

    def due(self, now_ms: int, limit: int) -> np.ndarray:
        """Sessions whose next event is due, the most overdue first, at most limit."""
        due = np.flatnonzero(self.due_ms <= now_ms)
        if len(due) > limit:
            due = due[np.argpartition(self.due_ms[due], limit - 1)[:limit]] if limit else due[:0]
        return due

    def advance(self, rows: np.ndarray, action: np.ndarray, now_ms: int) -> None:
        """Records the events just emitted for rows; finished sessions free their slots."""
        self.previous[rows] = action
        self.left[rows] -= 1
        gaps = self._gaps_ms(self.user[rows])
        self.due_ms[rows] = np.where(self.left[rows] > 0, now_ms + gaps, self._FREE)

    def open(self, users: np.ndarray, action: np.ndarray, now_ms: int) -> None:
        """New sessions whose first event was just emitted; one-event sessions end at once."""
        mean = _T["session_mean"][self.persona[users]]
        left = np.minimum(self.rng.geometric(1 / mean), _MAX_SESSION_EVENTS) - 1
        more = left > 0
        slots = self._free_slots(int(more.sum()))
        self.user[slots] = users[more]
        self.previous[slots] = action[more]
        self.left[slots] = left[more]
        self.due_ms[slots] = now_ms + self._gaps_ms(users[more])

    def _free_slots(self, n: int) -> np.ndarray:
        free = np.flatnonzero(self.due_ms == self._FREE)
        if len(free) < n:  # grow geometrically, like a vector
            grow = max(n - len(free), len(self.due_ms), 1024)
            free = np.concatenate([free, np.arange(len(self.due_ms), len(self.due_ms) + grow)])
            for name in ("user", "previous", "left"):
                setattr(self, name, np.concatenate([getattr(self, name), np.zeros(grow, np.int64)]))
            self.due_ms = np.concatenate([self.due_ms, np.full(grow, self._FREE)])
        return free[:n]

    def _gaps_ms(self, users: np.ndarray) -> np.ndarray:
        median_s = _T["gap_median_s"][self.persona[users]]
        return np.round(self.rng.lognormal(np.log(median_s), _GAP_SIGMA) * 1000).astype(np.int64)
