"""Is BEAT worth it? Its embeddings and heads against simple baselines on the held-out future.

Everything is measured on a temporal split of users' histories at a cutoff time
(model.sequences.split_at): models and baselines see only the events before the cutoff (each
user's "history"), and are scored on the events at or after it (the "future").

  masked      each user's first future events follow the newest history events in one window;
              a fraction of the future events is hidden (model.pretraining.mask_events) and the
              pretraining masked head names their action and property: top-1 accuracy, against
              always naming the most popular value
  next        the first future event, from the embedding of the history, with the next head:
              HitRate@1 and @10 of action and property, against a first-order Markov chain
              (transition counts of the history events, popularity breaking ties and filling
              unseen rows) and the most popular values
  churn       users with history; churned = no event within churn_days after the cutoff.
              Logistic regression on the BEAT embedding, on hand-made RFM features, and on both;
              gradient boosting on RFM. Fit on a stratified half of the users, AUC on the other
              half with bootstrap intervals, and a paired interval of BEAT - best hand-made
  segments    k-means on the embeddings, a PCA map, and what the users of each segment do

Values are compared in the model's vocabulary ids: a value the vocabulary cannot name (the
out-of-vocabulary id) is never predicted by anyone and counts as a miss for every method.
Intervals are 95 % percentile bootstraps over users (for AUC stratified by label); differences
are paired (each resample draws the same users for both models).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold, cross_val_predict, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import Tensor

from model.batch import EventBatch
from model.beat import MS_PER_DAY, Beat
from model.inference import BeatEncoder, length_batches
from model.model_dir import load_model_dir
from model.pretraining import BeatPretrainer, mask_events
from model.run_dir import HEADS_FILE, LOG_FILE, MODEL_DIR, load_pretrainer
from model.sequences import keep_events, lengths, split_at, starts, to_windows
from model.vocab import OOV_ID, Vocabulary

FIELDS = ("action", "property")
PROBE_STRENGTHS = np.logspace(-3, 1, 5)  # inverse L2 strengths C tried by every logistic probe
PROBE_FOLDS = 3  # cross-validation folds that choose C, within the training users
BOOTSTRAP_CHUNK = 5_000_000  # resampling multiplicities held at once (float64: 40 MB)


@dataclass
class EvalConfig:
    mask_fraction: float = 0.15  # of the future events in each masked-task window
    future_share: float = 0.5  # at most this share of a masked-task window is future events
    ks: tuple[int, ...] = (1, 10)  # HitRate@k of the next event
    churn_days: float = 30.0  # churned = no event within this many days after the cutoff
    propensity_days: float = 30.0  # propensity = the most valuable action within these days
    probe_users: int = 2000  # users of the next-event probes (a multinomial fit per field)
    test_fraction: float = 0.5  # of the users, held out (stratified) to score the churn models
    top_actions: int = 16  # the most frequent actions get a count feature each in RFM
    segments: int = 6  # k of k-means
    bootstrap: int = 1000  # resamples per interval
    seed: int = 0
    batch_size: int = 64  # users per forward pass

    def __post_init__(self) -> None:
        if not 0 < self.mask_fraction < 1 or not 0 < self.future_share < 1:
            raise ValueError(
                f"mask_fraction and future_share must be in (0, 1), got "
                f"{self.mask_fraction}, {self.future_share}"
            )
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.churn_days <= 0 or self.segments < 2 or self.bootstrap < 10 or min(self.ks) < 1:
            raise ValueError(
                "need churn_days > 0, segments >= 2, bootstrap >= 10 and every k >= 1; got "
                f"{self.churn_days}, {self.segments}, {self.bootstrap}, {self.ks}"
            )


# --- shared helpers ------------------------------------------------------------------------


def _flat(table: pa.Table, column: str) -> pa.Array:
    return pc.list_flatten(table[column]).combine_chunks()


def _user_of_event(table: pa.Table) -> np.ndarray:
    """Row (user) index of every event in flattened order, int64 [events]."""
    return np.repeat(np.arange(table.num_rows), lengths(table))


def _interval(samples: np.ndarray) -> list[float]:
    return [float(np.nanpercentile(samples, 2.5)), float(np.nanpercentile(samples, 97.5))]


def _resample_weights(
    groups: list[np.ndarray], n: int, resamples: int, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    """Bootstrap multiplicities, float64 [chunk, n] per chunk of resamples: each group of
    indices (e.g. the positives and the negatives) is resampled with replacement on its own."""
    chunk = max(1, BOOTSTRAP_CHUNK // max(n, 1))
    for first in range(0, resamples, chunk):
        rows = min(chunk, resamples - first)
        offsets = (np.arange(rows) * n)[:, None]  # [rows, 1]
        draws = np.concatenate([rng.choice(g, (rows, len(g))) for g in groups], axis=1)
        yield (
            np.bincount((draws + offsets).ravel(), minlength=rows * n)
            .reshape(rows, n)
            .astype(float)
        )


def ratio_with_interval(
    numerator: np.ndarray, denominator: np.ndarray, resamples: int, rng: np.random.Generator
) -> dict[str, Any]:
    """sum(numerator) / sum(denominator) over users (both [n]), with a bootstrap over users."""
    samples = np.concatenate(
        [
            (w @ numerator) / np.maximum(w @ denominator, 1e-12)
            for w in _resample_weights([np.arange(len(numerator))], len(numerator), resamples, rng)
        ]
    )
    return {"value": float(numerator.sum() / denominator.sum()), "ci95": _interval(samples)}


def weighted_auc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC of scores [n] for boolean labels [n] under each row of weights [R, n]
    (multiplicities of a bootstrap; a row of ones is the plain AUC). Ties count one half."""
    order = np.argsort(scores, kind="stable")
    sorted_scores, labels, weights = scores[order], labels[order], weights[:, order]
    group_starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    positives = np.add.reduceat(weights * labels, group_starts, axis=1)  # [R, G]
    negatives = np.add.reduceat(weights * ~labels, group_starts, axis=1)  # [R, G]
    below = np.cumsum(negatives, axis=1) - negatives  # negatives scored lower than the group
    pairs = positives.sum(axis=1) * negatives.sum(axis=1)  # [R]
    return (positives * (below + 0.5 * negatives)).sum(axis=1) / pairs


# --- masked events -------------------------------------------------------------------------


def masked_windows(
    sequences: pa.Table, history_lengths: np.ndarray, max_events: int, future_share: float
) -> tuple[pa.Table, np.ndarray]:
    """Each user with future events as one window: up to future_share * max_events of the
    first future events, after as many of the newest history events as still fit.

    sequences: every user's whole history; history_lengths: events before the cutoff per user.
    Returns (the windows' table, only users with future events; history events per window [n]).
    """
    n = lengths(sequences)  # [U]
    future = np.minimum(n - history_lengths, int(max_events * future_share))  # [U]
    context = np.minimum(history_lengths, max_events - future)  # [U]
    position = np.arange(n.sum()) - np.repeat(starts(sequences), n)  # [events]
    user = _user_of_event(sequences)
    keep = (position >= (history_lengths - context)[user]) & (
        position < (history_lengths + future)[user]
    )
    has_future = future > 0
    windows = keep_events(sequences, keep).filter(pa.array(has_future))
    return windows, context[has_future]


@torch.inference_mode()
def masked_accuracy(
    pretrainer: BeatPretrainer,
    actions: Vocabulary,
    properties: Vocabulary,
    windows: pa.Table,
    context: np.ndarray,
    config: EvalConfig,
    device: torch.device,
) -> dict[str, np.ndarray]:
    """Per window, how many future events were hidden and how many of their actions and
    properties the masked head named (top-1): {"masked", "action", "property"}, each int64 [n]."""
    generator = torch.Generator().manual_seed(config.seed)
    model, head = pretrainer.model.to(device).eval(), pretrainer.masked_head.to(device).eval()
    event_windows = to_windows(windows)
    counts = {name: np.zeros(len(event_windows), np.int64) for name in ("masked", *FIELDS)}
    for rows in length_batches(lengths(windows), config.batch_size, bucket_width=16):
        batch = EventBatch.from_windows([event_windows[i] for i in rows], actions, properties)
        width = batch.padding_mask.shape[1]
        future = batch.padding_mask & (
            torch.arange(width) >= torch.from_numpy(context[rows])[:, None]
        )
        # Mask among the future events only (at least one per window), then let the model see
        # the whole window again.
        hidden_batch, hidden = mask_events(
            replace(batch, padding_mask=future), config.mask_fraction, generator
        )
        inputs = replace(hidden_batch, padding_mask=batch.padding_mask)
        states = _forward(model, inputs, device)["hidden_states"][hidden.to(device)]  # [N, H]
        row = torch.nonzero(hidden)[:, 0].numpy()  # [N] window of each hidden event
        counts["masked"][rows] += np.bincount(row, minlength=len(rows))
        for name, layer, ids in (
            ("action", head.action, batch.action_ids),
            ("property", head.property, batch.property_ids),
        ):
            named = _nameable(layer(states)).argmax(dim=1)  # [N]
            correct = (named == ids[hidden].to(device)).cpu().numpy()
            counts[name][rows] += np.bincount(row, weights=correct, minlength=len(rows)).astype(
                np.int64
            )
    return counts


def _forward(model: torch.nn.Module, batch: EventBatch, device: torch.device) -> dict[str, Tensor]:
    with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
        return model(**batch.to(device).inputs())


def _nameable(logits: Tensor) -> Tensor:
    """Logits [N, V] as float32 with padding and OOV at -inf: no method ever names them."""
    logits = logits.float().clone()
    logits[:, [0, OOV_ID]] = -torch.inf
    return logits


# --- next event ----------------------------------------------------------------------------


@dataclass
class TransitionBaseline:
    """Ranks every id after a given previous id: by transition count, then popularity (so a
    previous id never seen with a successor falls back to pure popularity), then by id."""

    ranks: np.ndarray  # int64 [V, V]: ranks[previous, candidate], 0 = best
    popularity_ranks: np.ndarray  # int64 [V]

    @classmethod
    def fit(cls, ids: np.ndarray, user: np.ndarray, size: int) -> TransitionBaseline:
        """ids: the training events' ids in flattened order; user: their user index [events];
        size: the vocabulary size. Pairs are consecutive events of the same user."""
        popularity = np.bincount(ids, minlength=size).astype(float)  # [V]
        same_user = user[1:] == user[:-1]
        pairs = ids[:-1][same_user] * size + ids[1:][same_user]
        transitions = np.bincount(pairs, minlength=size * size).reshape(size, size).astype(float)
        # popularity / (total + 1) < 1: it orders only candidates with equal transition counts
        scores = transitions + popularity / (popularity.sum() + 1)  # [V, V]
        scores[:, [0, OOV_ID]] = popularity[[0, OOV_ID]] = -np.inf  # never named, as in _nameable
        return cls(_ranks(scores), _ranks(popularity[None])[0])

    def markov_ranks(self, previous: np.ndarray, target: np.ndarray) -> np.ndarray:
        return self.ranks[previous, target]

    def popular_ranks(self, target: np.ndarray) -> np.ndarray:
        return self.popularity_ranks[target]


def _ranks(scores: np.ndarray) -> np.ndarray:
    """Rank of every column within its row, highest score first, ties by lower id ([R, V])."""
    order = np.argsort(-scores, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(scores.shape[1])[None], axis=1)
    return ranks


def _model_ranks(logits: Tensor, target: Tensor) -> np.ndarray:
    """Rank of each row's target among the ids the model may name (int64 [N]); a target the
    model may not name (padding, OOV) gets rank V, a miss at any k."""
    logits = _nameable(logits)
    own = logits.gather(1, target[:, None])  # [N, 1]
    ranks = (logits > own).sum(dim=1)
    return torch.where(torch.isfinite(own[:, 0]), ranks, logits.shape[1]).cpu().numpy()


def hit_rates(
    ranks: np.ndarray, ks: tuple[int, ...], resamples: int, rng: np.random.Generator
) -> dict[str, Any]:
    """HitRate@k (target ranked among the k best) with bootstrap intervals over users."""
    ones = np.ones(len(ranks))
    return {
        f"hit@{k}": ratio_with_interval((ranks < k).astype(float), ones, resamples, rng) for k in ks
    }


# --- churn ---------------------------------------------------------------------------------


def churn_labels(future: pa.Table, cutoff_ms: int, churn_days: float) -> np.ndarray:
    """True for users with no event in [cutoff, cutoff + churn_days) (bool [users])."""
    return ~future_labels(future, cutoff_ms, churn_days)


def check_label_window(sequences: pa.Table, cutoff_ms: int, churn_days: float) -> None:
    """The data must reach the end of the churn window (within its last day), else a user who
    is merely not yet seen again would be called churned."""
    newest = pc.max(_flat(sequences, "event_time")).as_py()
    needed = cutoff_ms + (churn_days - 1) * MS_PER_DAY
    if newest is None or newest < needed:
        raise ValueError(
            f"churn labels need events up to cutoff + churn_days ({churn_days:g} days, "
            f"{_iso(cutoff_ms + churn_days * MS_PER_DAY)}); the newest event is "
            f"{'none' if newest is None else _iso(newest)}. Use an earlier cutoff, more data, or a "
            f"smaller EvalConfig.churn_days"
        )


def rfm_features(
    history: pa.Table, cutoff_ms: int, top_actions: int
) -> tuple[list[str], np.ndarray]:
    """Hand-made features of users with at least one event before the cutoff: (names,
    float64 [users, features]). Durations in days; counts and money as log1p."""
    n = lengths(history)
    if (n == 0).any():
        raise ValueError("rfm_features needs users with at least one event")
    first, user = starts(history), _user_of_event(history)
    times = _flat(history, "event_time").to_numpy()
    age = (cutoff_ms - times) / MS_PER_DAY  # [events] days before the cutoff
    value = np.nan_to_num(_flat(history, "value").to_numpy(zero_copy_only=False).astype(float))

    gap = np.r_[0.0, np.diff(times) / MS_PER_DAY]  # [events] days since the previous event
    gap[first] = 0.0  # a user's first event has none
    gaps = np.maximum(n - 1, 1)
    gap_mean = np.bincount(user, gap, len(n)) / gaps
    gap_std = np.sqrt(np.maximum(np.bincount(user, gap**2, len(n)) / gaps - gap_mean**2, 0))

    def per_user(weights: np.ndarray) -> np.ndarray:
        return np.bincount(user, weights, len(n))

    features = {
        "recency_days": age[first + n - 1],
        "tenure_days": age[first],
        "log_events": np.log1p(n),
        "log_events_7d": np.log1p(per_user(age < 7)),
        "log_events_30d": np.log1p(per_user(age < 30)),
        "log_monetary": np.log1p(np.maximum(per_user(value), 0)),
        "gap_mean_days": gap_mean,
        "gap_std_days": gap_std,
        "gap_max_days": np.maximum.reduceat(gap, first),
    }
    codes = pc.dictionary_encode(_flat(history, "action"))
    action = codes.indices.to_numpy()  # [events] index into codes.dictionary
    for code in np.argsort(-np.bincount(action), kind="stable")[:top_actions]:
        features[f"log_{codes.dictionary[int(code)].as_py()}"] = np.log1p(per_user(action == code))
    return list(features), np.column_stack(list(features.values()))


def future_labels(
    future: pa.Table, cutoff_ms: int, days: float, action: str | None = None
) -> np.ndarray:
    """True for users with an event (of `action`, when given) in [cutoff, cutoff + days)
    (bool [users]); churn is its negation over all actions."""
    times = _flat(future, "event_time").to_numpy()
    hit = times < cutoff_ms + days * MS_PER_DAY
    if action is not None:
        hit &= np.asarray(pc.equal(_flat(future, "action"), action).fill_null(False))
    return np.bincount(_user_of_event(future), weights=hit, minlength=future.num_rows) > 0


def most_valuable_action(history: pa.Table) -> str | None:
    """The action with the largest total value in the history (None: no event has a value)."""
    value = np.nan_to_num(_flat(history, "value").to_numpy(zero_copy_only=False).astype(float))
    if not value.any():
        return None
    codes = pc.dictionary_encode(_flat(history, "action"))
    totals = np.bincount(codes.indices.to_numpy(), weights=value)
    return codes.dictionary[int(np.argmax(totals))].as_py()


def cv_logistic(seed: int) -> Any:
    """Standardize, then a logistic regression whose L2 strength is chosen by cross-validated
    AUC on the training users alone: a 768-wide probe on a few hundred users overfits at any
    fixed strength, and BEAT + RFM would then score below RFM alone."""
    folds = StratifiedKFold(n_splits=PROBE_FOLDS, shuffle=True, random_state=seed)
    return make_pipeline(
        StandardScaler(),
        LogisticRegressionCV(
            Cs=PROBE_STRENGTHS,
            cv=folds,
            scoring="roc_auc",
            l1_ratios=(0.0,),
            use_legacy_attributes=False,
            tol=1e-3,
            max_iter=500,
        ),
    )


def probe_models(
    embeddings: np.ndarray,
    untrained: np.ndarray,
    rfm: np.ndarray,
    labels: np.ndarray,
    config: EvalConfig,
    task: str = "churn",
) -> dict[str, Any]:
    """Fit each model of a yes/no task on a stratified share of the users and score the rest:
    AUC with a bootstrap interval per model, and paired differences against the best
    hand-made model and against the untrained network's embeddings (the floor: what a random
    network with temporal encodings carries, recency above all)."""
    if min(labels.sum(), (~labels).sum()) < 4:
        raise ValueError(
            f"{task} needs at least 4 users of each label; got {int(labels.sum())} positive "
            f"of {len(labels)}: choose another cutoff or horizon (EvalConfig)"
        )
    train, test = train_test_split(
        np.arange(len(labels)),
        test_size=config.test_fraction,
        stratify=labels,
        random_state=config.seed,
    )
    candidates = {
        "beat_logistic": (cv_logistic(config.seed), embeddings),
        "untrained_logistic": (cv_logistic(config.seed), untrained),
        "rfm_logistic": (cv_logistic(config.seed), rfm),
        "rfm_boosting": (HistGradientBoostingClassifier(random_state=config.seed), rfm),
        "beat_rfm_logistic": (cv_logistic(config.seed), np.hstack([embeddings, rfm])),
    }
    scores = {
        name: model.fit(x[train], labels[train]).predict_proba(x[test])[:, 1]
        for name, (model, x) in candidates.items()
    }
    y = labels[test]
    rng = np.random.default_rng(config.seed)
    samples = {name: [] for name in scores}
    groups = [np.flatnonzero(y), np.flatnonzero(~y)]
    for weights in _resample_weights(groups, len(y), config.bootstrap, rng):
        for name, s in scores.items():
            samples[name].append(weighted_auc(s, y, weights))
    aucs = {name: float(weighted_auc(s, y, np.ones((1, len(y))))[0]) for name, s in scores.items()}
    samples = {name: np.concatenate(parts) for name, parts in samples.items()}
    best = max(("rfm_logistic", "rfm_boosting"), key=aucs.get)

    def difference(model: str, versus: str) -> dict[str, Any]:
        return {
            "versus": versus,
            "value": aucs[model] - aucs[versus],
            "ci95": _interval(samples[model] - samples[versus]),
        }

    return {
        "train_users": len(train),
        "test_users": len(test),
        "test_positive_rate": float(y.mean()),
        "auc": {name: {"value": aucs[name], "ci95": _interval(samples[name])} for name in scores},
        # the best hand-made model is chosen on the same test users, which slightly favours it
        "beat_minus_best_handmade": difference("beat_logistic", best),
        "beat_rfm_minus_best_handmade": difference("beat_rfm_logistic", best),
        "beat_minus_untrained": difference("beat_logistic", "untrained_logistic"),
    }


# --- segments ------------------------------------------------------------------------------


def segments(
    embeddings: np.ndarray, history: pa.Table, k: int, seed: int, top: int = 3
) -> dict[str, Any]:
    """k-means on the standardized embeddings of history's users; for each segment its size,
    top actions (share of its events), events per user and events per active (UTC) day; and a
    2-D PCA map of the users."""
    if len(embeddings) < k:
        raise ValueError(
            f"{len(embeddings)} users cannot form {k} segments; lower EvalConfig.segments"
        )
    x = StandardScaler().fit_transform(embeddings)
    segment = KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(x)  # [users]
    xy = PCA(n_components=2, random_state=seed).fit_transform(x)  # [users, 2]

    user = _user_of_event(history)
    day = _flat(history, "event_time").to_numpy() // MS_PER_DAY
    new_day = np.r_[True, (day[1:] != day[:-1]) | (user[1:] != user[:-1])]  # events are sorted
    events = np.bincount(segment, lengths(history), k)
    active_days = np.bincount(segment[user], new_day, k)
    users = np.bincount(segment, minlength=k)
    codes = pc.dictionary_encode(_flat(history, "action"))
    names = codes.dictionary.to_pylist()
    action_counts = np.bincount(
        segment[user] * len(names) + codes.indices.to_numpy(), minlength=k * len(names)
    ).reshape(k, len(names))
    rows = []
    for s in range(k):
        best = np.argsort(-action_counts[s], kind="stable")[:top]
        rows.append(
            {
                "segment": s,
                "users": int(users[s]),
                "share": float(users[s] / len(segment)),
                "top_actions": [
                    {"action": names[a], "share": float(action_counts[s, a] / max(events[s], 1))}
                    for a in best
                    if action_counts[s, a]
                ],
                "events_per_user": float(events[s] / users[s]),
                "events_per_active_day": float(events[s] / max(active_days[s], 1)),
            }
        )
    return {
        "k": k,
        "segments": rows,
        "map": {
            "user_id": history["user_id"].to_pylist(),
            "x": xy[:, 0].tolist(),
            "y": xy[:, 1].tolist(),
            "segment": segment.tolist(),
        },
    }


# --- the whole evaluation ------------------------------------------------------------------


def evaluate_model(
    model_dir: str | Path,
    sequences: pa.Table,
    cutoff_ms: int,
    config: EvalConfig | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Every metric of the module doc on sequences (the table of model/sequences.py) split at
    cutoff_ms; JSON-ready (model.report.write_report writes it).

    model_dir: a model.train output directory (model/, the pretraining heads, train_log.jsonl),
    or a plain model directory, which has no heads: then the masked and BEAT next-event metrics
    are left out, with the reason in results["masked"]["skipped"].
    """
    config = config or EvalConfig()
    check_label_window(sequences, cutoff_ms, config.churn_days)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    path = Path(model_dir)
    pretrainer = load_pretrainer(path) if (path / HEADS_FILE).is_file() else None
    saved = load_model_dir(path / MODEL_DIR if pretrainer is not None else path)
    model = (
        pretrainer.model
        if pretrainer is not None
        else Beat.from_tensors(saved.config, saved.tensors, str(path))
    )
    encoder = BeatEncoder(
        model, saved.actions, saved.properties, saved.model_version, device, config.batch_size
    )
    with torch.random.fork_rng(devices=[]):  # the floor: same architecture and vocabulary
        torch.manual_seed(config.seed)
        floor = BeatEncoder(
            Beat(saved.config),
            saved.actions,
            saved.properties,
            "untrained",
            device,
            config.batch_size,
        )

    past, future = split_at(sequences, cutoff_ms)
    history_lengths, future_lengths = lengths(past), lengths(future)
    active = pa.array(history_lengths > 0)
    history, after = past.filter(active), future.filter(active)
    # [active users, E], as served at the cutoff: as of it, so silence up to the cutoff shows. The
    # next-event metrics use the same embeddings: as of the first future event would tell the
    # model when the user comes back, which a server asking "now" never knows.
    windows = to_windows(history)
    embeddings = encoder.encode(windows, as_of_ms=cutoff_ms)
    untrained = floor.encode(windows, as_of_ms=cutoff_ms)
    rng = np.random.default_rng(config.seed)

    results: dict[str, Any] = {
        "model_version": saved.model_version,
        "model_dir": str(path),
        "train_log": str(path / LOG_FILE) if (path / LOG_FILE).is_file() else None,
        "config": asdict(config),
        "data": {
            "users": sequences.num_rows,
            "events": int(history_lengths.sum() + future_lengths.sum()),
            "cutoff": _iso(cutoff_ms),
            "events_before_cutoff": int(history_lengths.sum()),
            "events_after_cutoff": int(future_lengths.sum()),
            "users_with_history": history.num_rows,
            "users_with_future": int((future_lengths > 0).sum()),
        },
        "next_event": _next_event(
            pretrainer, encoder, embeddings, untrained, history, after, config, rng
        ),
    }
    if pretrainer is not None:
        windows, context = masked_windows(
            sequences, history_lengths, saved.config.max_events, config.future_share
        )
        counts = masked_accuracy(
            pretrainer, saved.actions, saved.properties, windows, context, config, device
        )
        results["masked"] = _masked_summary(counts, windows, context, history, encoder, config, rng)
    else:
        results["masked"] = {
            "skipped": f"{path} has no pretraining heads ({HEADS_FILE}): "
            "pass a model.train output directory"
        }

    labels = churn_labels(after, cutoff_ms, config.churn_days)
    names, rfm = rfm_features(history, cutoff_ms, config.top_actions)
    results["data"]["churn_rate"] = float(labels.mean())
    results["churn"] = {
        "churn_days": config.churn_days,
        "rfm_features": names,
        **probe_models(embeddings, untrained, rfm, labels, config),
    }
    results["propensity"] = _propensity(
        embeddings, untrained, rfm, history, after, cutoff_ms, config
    )
    results["segments"] = segments(embeddings, history, config.segments, config.seed)
    return results


def _propensity(
    embeddings: np.ndarray,
    untrained: np.ndarray,
    rfm: np.ndarray,
    history: pa.Table,
    future: pa.Table,
    cutoff_ms: int,
    config: EvalConfig,
) -> dict[str, Any]:
    """Any event of the data set's most valuable action (largest total value before the
    cutoff) within propensity_days after it, with the churn task's models."""
    action = most_valuable_action(history)
    if action is None:
        return {"skipped": "no event has a value, so no action is the most valuable"}
    labels = future_labels(future, cutoff_ms, config.propensity_days, action)
    task = f"propensity to {action}"
    return {
        "action": action,
        "days": config.propensity_days,
        "positive_rate": float(labels.mean()),
        **probe_models(embeddings, untrained, rfm, labels, config, task),
    }


def _probe_ranks(x: np.ndarray, target: np.ndarray, vocabulary_size: int, seed: int) -> np.ndarray:
    """Rank of each user's target under a multinomial logistic probe of x, predicted out of
    fold (each user by a probe fit on the other folds); ids no fold saw rank last."""
    folds = StratifiedKFold(n_splits=PROBE_FOLDS, shuffle=True, random_state=seed)
    seen, known = np.unique(target, return_counts=True)
    classes = seen[known >= PROBE_FOLDS]  # stratified folds need a few users of each
    common = np.isin(target, classes)
    scores = np.full((len(target), vocabulary_size), -np.inf)
    if len(classes) == 1:  # nothing to learn: the one class is every user's prediction
        scores[:, classes[0]] = 1.0
    elif len(classes) > 1:
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=300))
        with warnings.catch_warnings():  # a floor needs no converged optimum, slow to reach
            warnings.simplefilter("ignore", ConvergenceWarning)
            scores[np.ix_(common, classes)] = cross_val_predict(
                probe, x[common], target[common], cv=folds, method="predict_proba"
            )
    scores[:, [0, OOV_ID]] = -np.inf
    own = scores[np.arange(len(target)), target]
    ranks = (scores > own[:, None]).sum(axis=1)
    return np.where(np.isfinite(own), ranks, vocabulary_size)


def _next_event(
    pretrainer: BeatPretrainer | None,
    encoder: BeatEncoder,
    embeddings: np.ndarray,
    untrained: np.ndarray,
    history: pa.Table,
    future: pa.Table,
    config: EvalConfig,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """HitRate@k of each user's first future event (users with history and future)."""
    evaluated = lengths(future) > 0  # [active users]
    first_future = starts(future)[evaluated]
    last_history = (starts(history) + lengths(history) - 1)[evaluated]
    user = _user_of_event(history)
    out: dict[str, Any] = {"users": int(evaluated.sum())}
    for field, vocabulary in zip(FIELDS, (encoder.actions, encoder.properties)):
        train_ids = vocabulary.lookup_column(_flat(history, field))
        target = vocabulary.lookup_column(_flat(future, field))[first_future]  # [users evaluated]
        baseline = TransitionBaseline.fit(train_ids, user, len(vocabulary))
        ranks = {
            "markov": baseline.markov_ranks(train_ids[last_history], target),
            "popular": baseline.popular_ranks(target),
        }
        if pretrainer is not None:
            head = getattr(pretrainer.next_head.to(encoder.device).eval(), field)
            with torch.inference_mode():
                logits = head(torch.from_numpy(embeddings[evaluated]).to(encoder.device))
            ranks["beat"] = _model_ranks(logits, torch.from_numpy(target).to(encoder.device))
        out[field] = {
            name: hit_rates(r, config.ks, config.bootstrap, rng) for name, r in ranks.items()
        }
        # the floor: a linear probe of the untrained network's embeddings, next to the same probe
        # of BEAT's, on a sample of users (a multinomial fit per field is slow)
        sample = np.random.default_rng(config.seed).permutation(len(target))[: config.probe_users]
        out[field]["probes"] = {"users": len(sample)} | {
            name: hit_rates(
                _probe_ranks(x[evaluated][sample], target[sample], len(vocabulary), config.seed),
                config.ks,
                config.bootstrap,
                rng,
            )
            for name, x in (("untrained", untrained), ("beat", embeddings))
        }
    return out


def _masked_summary(
    counts: dict[str, np.ndarray],
    windows: pa.Table,
    context: np.ndarray,
    history: pa.Table,
    encoder: BeatEncoder,
    config: EvalConfig,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """Masked-head accuracy next to always naming the most popular history value. The
    baseline is scored on all future events of the windows (the hidden ones are a random
    sample of them)."""
    is_future = np.arange(lengths(windows).sum()) - np.repeat(starts(windows), lengths(windows))
    is_future = is_future >= np.repeat(context, lengths(windows))
    window = _user_of_event(windows)[is_future]
    out: dict[str, Any] = {"windows": len(context), "masked_events": int(counts["masked"].sum())}
    for field, vocabulary in zip(FIELDS, (encoder.actions, encoder.properties)):
        history_ids = vocabulary.lookup_column(_flat(history, field))
        popularity = np.bincount(history_ids, minlength=len(vocabulary))
        popularity[[0, OOV_ID]] = -1
        target = vocabulary.lookup_column(_flat(windows, field))[is_future]
        popular_hits = np.bincount(window, target == popularity.argmax(), len(context))
        future_events = np.bincount(window, minlength=len(context)).astype(float)
        out[field] = {
            "beat": ratio_with_interval(
                counts[field].astype(float), counts["masked"].astype(float), config.bootstrap, rng
            ),
            "popular": ratio_with_interval(popular_hits, future_events, config.bootstrap, rng),
        }
    return out


def _iso(ms: float) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")
