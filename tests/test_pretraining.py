"""BEAT pretraining: view sampling, masking, the three objectives, and a short training run on
synthetic users with planted personas."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from model import Beat, BeatConfig, EventBatch, EventWindow, Vocabulary
from model.pretraining import (
    BeatPretrainer,
    PretrainConfig,
    _forward_in_buckets,
    _stack,
    info_nce,
    mask_events,
    sample_views,
)
from model.vocab import OOV_ID
from stream.synthetic import SyntheticEvents

STEPS = 250


def synthetic_windows(
    events: SyntheticEvents, start: datetime, end: datetime, max_events: int
) -> dict[str, EventWindow]:
    """Each user's newest max_events events in [start, end)."""
    table = pa.Table.from_batches(list(events.history(start, end)))
    table = table.sort_by([("user_id", "ascending"), ("event_time", "ascending")])
    users = table["user_id"].to_numpy(zero_copy_only=False)
    times = pc.cast(table["event_time"], pa.int64()).to_numpy()
    actions = table["action"].to_numpy(zero_copy_only=False)
    properties = np.array(table["property"].to_pylist(), dtype=object)
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])  # each user's first row
    windows = {}
    for first, stop in zip(starts, np.r_[starts[1:], len(users)]):
        newest = slice(max(first, stop - max_events), stop)
        windows[users[first]] = EventWindow(times[newest], actions[newest], properties[newest])
    return windows


def histories(n: int, seed: int = 0) -> EventBatch:
    """n rows of 10..40 events, with times one hour apart and distinct ids."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(10, 41, (n,), generator=g)
    mask = torch.arange(40) < lengths[:, None]
    ids = torch.where(mask, torch.arange(3, 43).expand(n, 40), 0)
    times = torch.where(mask, 1_735_689_600_000 + torch.arange(40) * 3_600_000, 0)
    return EventBatch(ids, ids + 100, torch.zeros(n, 40, dtype=torch.float64), mask, times)


# --- sampling and masking ------------------------------------------------------------------


def test_views_are_adjacent_windows_followed_by_their_next_event():
    batch = histories(64)
    config = PretrainConfig(min_view_events=3, max_view_events=12)
    views = sample_views(batch, config, torch.Generator().manual_seed(1))
    for row in range(64):
        a = views.a.action_ids[row][views.a.padding_mask[row]]
        b = views.b.action_ids[row][views.b.padding_mask[row]]
        assert 3 <= len(a) <= 12 and 3 <= len(b) <= 12
        # ids are consecutive along the history: A ends right before B, and each view's next
        # event is the one right after it
        assert torch.equal(a, torch.arange(a[0], a[0] + len(a)))
        assert torch.equal(b, torch.arange(a[-1] + 1, a[-1] + 1 + len(b)))
        assert views.next_a[0][row] == b[0] and views.next_b[0][row] == b[-1] + 1
        assert views.next_b[1][row] == b[-1] + 1 + 100
        # ages count back from the event after each view, in days (events are an hour apart):
        # the newest event of a view is as old as the silence that followed it
        for view, n in ((views.a, len(a)), (views.b, len(b))):
            ages = view.time_gaps[row][view.padding_mask[row]]
            torch.testing.assert_close(ages, torch.arange(n, 0, -1).double() / 24)
    assert len(set(views.a.lengths.tolist())) > 3  # lengths vary
    with pytest.raises(ValueError, match="at least 7 events"):
        sample_views(EventBatch(*(t[:, :6] for t in batch.inputs().values())), config)


def test_masking_hides_about_15_percent_of_real_events_and_never_padding():
    batch = histories(400)
    masked, hidden = mask_events(batch, 0.15, torch.Generator().manual_seed(0))
    assert not (hidden & ~batch.padding_mask).any()
    assert hidden.any(dim=1).all()  # at least one per row
    share = hidden.sum() / batch.padding_mask.sum()
    assert 0.13 < share < 0.19, share
    assert (masked.action_ids[hidden] == OOV_ID).all()
    assert (masked.property_ids[hidden] == OOV_ID).all()
    assert torch.equal(masked.action_ids[~hidden], batch.action_ids[~hidden])
    assert torch.equal(masked.time_gaps, batch.time_gaps)


def test_info_nce_rewards_matching_pairs():
    a = torch.randn(16, 32)
    assert info_nce(a, a, 0.1) < 0.01
    assert info_nce(a, torch.randn(16, 32), 0.1) > 1.0


def test_loss_is_the_configured_weighted_sum():
    config = BeatConfig.preset("tiny")
    weights = PretrainConfig(masked_weight=0.5, next_weight=2.0, contrastive_weight=0.25)
    pretrainer = BeatPretrainer(Beat(config), weights)
    losses = pretrainer(histories(8), torch.Generator().manual_seed(0))
    expected = 0.5 * losses["masked"] + 2.0 * losses["next"] + 0.25 * losses["contrastive"]
    torch.testing.assert_close(losses["loss"], expected)
    losses["loss"].backward()
    assert pretrainer.model.summary.grad is not None
    assert pretrainer.masked_head.action.weight.grad.abs().sum() > 0


# --- length buckets ------------------------------------------------------------------------


@pytest.mark.parametrize("buckets", [1, 3, 4, 100])
def test_bucketed_forward_matches_one_padded_pass(buckets):
    torch.manual_seed(0)
    model = Beat(BeatConfig.preset("tiny")).eval()  # dropout off: the same computation
    batch, selected = mask_events(histories(29), 0.3, torch.Generator().manual_seed(1))
    widths = []  # of every forward pass
    model.register_forward_pre_hook(lambda m, a, kw: widths.append(kw["action_ids"].shape[1]),
                                    with_kwargs=True)
    embedding, states = _forward_in_buckets(model, batch, selected, buckets)
    assert len(widths) == min(buckets, 29) and max(widths) == int(batch.lengths.max())
    one_pass = model(**batch.inputs())
    torch.testing.assert_close(embedding, one_pass["embedding"])
    torch.testing.assert_close(states, one_pass["hidden_states"][selected])


def one_pass_losses(pretrainer: BeatPretrainer, batch: EventBatch, seed: int) -> dict:
    """The losses as computed before length buckets: one pass over the 2B views padded to the
    longest; the reference the bucketed forward must reproduce."""
    config, generator = pretrainer.config, torch.Generator().manual_seed(seed)
    views = sample_views(batch, config, generator)
    originals = _stack(views.a, views.b)
    inputs, hidden = mask_events(originals, config.mask_fraction, generator)
    out = pretrainer.model(**inputs.inputs())
    next_ids = [torch.cat([views.next_a[i], views.next_b[i]]) for i in (0, 1)]
    B = len(batch)
    losses = {
        "masked": pretrainer.masked_head.loss(out["hidden_states"][hidden],
                                              originals.action_ids[hidden],
                                              originals.property_ids[hidden]),
        "next": pretrainer.next_head.loss(out["embedding"], *next_ids),
        "contrastive": info_nce(out["embedding"][:B], out["embedding"][B:], config.temperature),
    }
    losses["loss"] = sum(losses.values())  # weights of 1
    return losses


def test_bucketed_losses_match_the_one_pass_losses_with_less_padding():
    torch.manual_seed(0)
    config = PretrainConfig(min_view_events=3, max_view_events=30, length_buckets=4)
    pretrainer = BeatPretrainer(Beat(BeatConfig.preset("tiny")), config).eval()  # no dropout
    tokens = []  # positions each forward pass computes
    pretrainer.model.register_forward_pre_hook(
        lambda m, a, kw: tokens.append(kw["action_ids"].numel()), with_kwargs=True
    )
    batch = histories(64)
    bucketed = pretrainer(batch, torch.Generator().manual_seed(2))
    expected = one_pass_losses(pretrainer, batch, seed=2)
    for name in ("loss", "masked", "next", "contrastive"):
        torch.testing.assert_close(bucketed[name], expected[name])
    assert len(tokens) == 5  # four buckets, then the one pass
    assert sum(tokens[:4]) < 0.8 * tokens[4], tokens


# --- a short pretraining run ---------------------------------------------------------------


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x, test_y) -> float:
    """Accuracy of a multinomial logistic regression (standardized features, L2)."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    probe = torch.nn.Linear(train_x.shape[1], int(train_y.max()) + 1)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=200)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(probe(train_x), train_y)
        loss = loss + 1e-3 * probe.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return (probe(test_x).argmax(1) == test_y).float().mean().item()


def test_pretraining_lowers_every_loss_and_separates_personas():
    torch.manual_seed(0)
    events = SyntheticEvents(800, seed=3)
    # Temporal split: pretrain on March; probe on each user's newest 12 events of April (short
    # windows, so that the action mix alone does not give the persona away).
    past = synthetic_windows(events, datetime(2024, 3, 1, tzinfo=UTC),
                             datetime(2024, 4, 1, tzinfo=UTC), 64)
    future = synthetic_windows(events, datetime(2024, 4, 1, tzinfo=UTC),
                               datetime(2024, 5, 1, tzinfo=UTC), 12)
    actions = Vocabulary.build((a for w in past.values() for a in w.action), 512)
    properties = Vocabulary.build((p for w in past.values() for p in w.property), 1024)
    train = [w for w in past.values() if len(w) >= 17]
    pool = EventBatch.from_windows(train, actions, properties)

    # Linear probe: embed the future windows, fit on 60 % of the users, test on the rest.
    persona_of = dict(zip(*(events.personas()[c].to_pylist() for c in ("user_id", "persona"))))
    users = sorted(u for u, w in future.items() if len(w) >= 5)
    labels = torch.tensor([events.persona_names.index(persona_of[u]) for u in users])
    probe_batch = EventBatch.from_windows([future[u] for u in users], actions, properties)
    split = int(0.6 * len(users))
    majority = labels[split:].bincount().max().item() / (len(users) - split)

    def persona_probe(model: Beat) -> float:
        with torch.inference_mode():
            embeddings = model.eval()(**probe_batch.inputs())["embedding"]
        model.train()
        return linear_probe(embeddings[:split], labels[:split], embeddings[split:], labels[split:])

    config = BeatConfig.preset("small")
    config.dropout = 0.0
    pretrainer = BeatPretrainer(Beat(config), PretrainConfig(max_view_events=32))
    untrained = persona_probe(pretrainer.model)
    optimizer = torch.optim.AdamW(pretrainer.parameters(), lr=2e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    history: dict[str, list[float]] = {"masked": [], "next": [], "contrastive": []}
    began = time.perf_counter()
    for _ in range(STEPS):
        rows = torch.randperm(len(pool), generator=g)[:32]
        batch = EventBatch(*(t[rows] for t in pool.inputs().values()))
        losses = pretrainer(batch, g)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        for name in history:
            history[name].append(losses[name].item())
    elapsed = time.perf_counter() - began

    report = {}
    for name, values in history.items():
        start, end = values[0], float(np.mean(values[-20:]))
        report[name] = (round(start, 3), round(end, 3))
    print(f"\n{STEPS} steps in {elapsed:.1f}s; loss (first step, mean of last 20): {report}")
    for name, (start, end) in report.items():
        assert end < 0.7 * start, (name, start, end)

    accuracy = persona_probe(pretrainer.model)
    print(f"linear probe: accuracy {accuracy:.3f} after pretraining, {untrained:.3f} before, "
          f"majority class {majority:.3f}")
    assert accuracy > majority + 0.3 and accuracy > untrained + 0.05
