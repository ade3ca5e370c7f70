"""BEAT model package: architecture, padding invariance, model directories, serving encoder."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file, save_file

from model import Beat, BeatConfig, BeatEncoder, EventWindow, Vocabulary, init_model_dir
from model.batch import EventBatch
from model.beat import GapEncoding, WindowStatistics, log_bucket
from model.inference import length_batches, staged_ahead
from model.vocab import NONE_ID, OOV_ID, PAD_ID

ACTIONS = ["page_view", "search", "add_to_cart", "purchase", "login", "card_payment"]
PROPERTIES = ["web", "ios", "android", "store_12", "store_40"]
T0 = 1_735_689_600_000  # 2025-01-01T00:00:00Z in unix ms
DAY = 86_400_000


def make_window(rng: np.random.Generator, n: int) -> EventWindow:
    gaps = rng.exponential(scale=DAY / 4, size=n).astype(np.int64)
    properties = rng.choice(np.array(PROPERTIES + [None], dtype=object), size=n)
    return EventWindow(
        event_time_ms=T0 + np.cumsum(gaps),
        action=rng.choice(np.array(ACTIONS, dtype=object), size=n),
        property=properties,
    )


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("beat-tiny")
    init_model_dir(directory, "tiny", ACTIONS * 3 + ["search"], PROPERTIES, seed=1)
    return directory


@pytest.fixture(scope="module")
def encoder(tiny_dir) -> BeatEncoder:
    return BeatEncoder.from_pretrained(tiny_dir, device="cpu", max_batch=4)


def random_batch(config: BeatConfig, B: int, L: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    action_ids = torch.randint(1, config.action_vocab_size, (B, L), generator=g)
    property_ids = torch.randint(1, config.property_vocab_size, (B, L), generator=g)
    # ascending event times → ages counted back from each row's newest event
    times = T0 + torch.cumsum(torch.randint(1, DAY, (B, L), generator=g), dim=1)
    time_gaps = (times[:, -1:] - times).double() / DAY
    return action_ids, property_ids, time_gaps, times


# --- configuration -------------------------------------------------------------------------


def test_default_config_matches_model_card_size():
    config = BeatConfig()
    shape = (config.hidden_size, config.num_layers, config.num_heads, config.max_events)
    assert shape == (768, 12, 12, 256)
    with torch.device("meta"):
        model = Beat(config)
    # the card's transformer; the window statistics' two projections come on top (3.4 %)
    statistics = sum(p.numel() for n, p in model.named_parameters() if n.startswith("statistics"))
    card = model.num_parameters() - statistics
    assert abs(card - 86.4e6) / 86.4e6 < 0.01, card
    assert statistics == 768 * (10 + 3 + 2 * (512 + 1024)) + 768 * 768  # 3: lifetime


def test_presets_are_configs_with_the_feast_embedding_size():
    small = BeatConfig.preset("small")
    assert small.hidden_size < 768 and small.embedding_size == 768 and small.name == "small"
    with torch.device("meta"):
        assert Beat(small).num_parameters() < 2_000_000
    with pytest.raises(ValueError, match="unknown BEAT preset"):
        BeatConfig.preset("huge")


def test_config_json_round_trip_and_unknown_keys():
    config = BeatConfig.preset("small")
    config.use_gap_encoding = False
    assert BeatConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="rotary"):
        BeatConfig.from_dict({**config.to_dict(), "rotary": True})
    with pytest.raises(ValueError, match="divisible"):
        BeatConfig(hidden_size=100, num_heads=3)


# --- vocabulary ----------------------------------------------------------------------------


def test_vocabulary_orders_by_frequency_and_maps_unknowns(tmp_path):
    vocab = Vocabulary.build(["b", "a", "c", "a", None, "b", "a", "d"], max_size=5)
    assert vocab.tokens == ["a", "b"]  # 3 reserved ids + the 2 most frequent; ties cut by value
    ids = vocab.lookup(np.array(["a", "b", "zzz", None, "<pad>"], dtype=object))
    assert ids.dtype == np.int64
    assert ids.tolist() == [3, 4, OOV_ID, NONE_ID, OOV_ID]  # "<pad>" the string is not padding
    assert PAD_ID not in ids
    assert vocab.lookup(np.array([["a"], ["b"]])).shape == (2, 1)  # numpy str arrays work too
    vocab.save(tmp_path / "v.json")
    assert Vocabulary.load(tmp_path / "v.json") == vocab


def test_vocabulary_from_counts_ranks_like_build():
    vocab = Vocabulary.from_counts({"c": 1, "b": 2, "a": 3, "d": 2}, max_size=6)
    assert vocab.tokens == ["a", "b", "d"]  # ties by value
    assert Vocabulary.build(["c", "b", "a", "a", "d", "b", "a", "d"], 6) == vocab
    with pytest.raises(ValueError, match="max_size must be at least 3"):
        Vocabulary.from_counts({"a": 1}, max_size=2)


def test_vocabulary_lookup_column_matches_lookup_across_chunks():
    vocab = Vocabulary(["a", "b"])
    # chunks with different values, nulls, and an empty chunk
    column = pa.chunked_array([["a", None, "zzz"], [], ["b", "b", None, "a"]], pa.string())
    ids = vocab.lookup_column(column)
    assert ids.dtype == np.int64
    assert ids.tolist() == vocab.lookup(np.array(column.to_pylist(), dtype=object)).tolist()
    assert ids.tolist() == [3, NONE_ID, OOV_ID, 4, 4, NONE_ID, 3]
    assert vocab.lookup_column(column.chunk(2)).tolist() == [4, 4, NONE_ID, 3]
    assert vocab.lookup_column(pa.chunked_array([], pa.string())).shape == (0,)


# --- the model -----------------------------------------------------------------------------


def test_output_shapes_and_zeroed_padding_states():
    config = BeatConfig.preset("tiny")
    model = Beat(config).eval()
    action_ids, property_ids, time_gaps, times = random_batch(config, B=3, L=7)
    action_ids[1, 4:] = 0
    out = model(action_ids, property_ids, time_gaps, event_times=times)
    assert out["embedding"].shape == (3, config.embedding_size)
    assert out["hidden_states"].shape == (3, 7, config.hidden_size)
    assert torch.all(out["hidden_states"][1, 4:] == 0)
    assert torch.all(out["hidden_states"][1, :4].abs().sum(-1) > 0)
    with pytest.raises(ValueError, match="at most"):
        model(*random_batch(config, B=1, L=config.max_events + 1)[:3])


def test_padding_and_batch_do_not_change_the_embedding():
    config = BeatConfig.preset("tiny")
    model = Beat(config).eval()
    action_ids, property_ids, time_gaps, times = random_batch(config, B=1, L=9)
    alone = model(action_ids, property_ids, time_gaps, event_times=times)["embedding"][0]

    # The same sequence, right-padded to 30 with garbage (NaN ages) in the padded slots, next to
    # a full row and a fully padded row.
    others = random_batch(config, B=3, L=30, seed=5)
    batch = [t.clone() for t in others]
    for column, value in zip(batch, (action_ids, property_ids, time_gaps, times)):
        column[0, :9] = value[0]
    batch[2][0, 9:] = float("nan")
    mask = torch.zeros(3, 30, dtype=torch.bool)
    mask[0, :9] = True
    mask[1] = True
    out = model(batch[0], batch[1], batch[2], padding_mask=mask, event_times=batch[3])
    torch.testing.assert_close(out["embedding"][0], alone, atol=1e-5, rtol=0)
    assert torch.isfinite(out["embedding"]).all()


def test_temporal_flags_switch_the_time_signals_off():
    config = BeatConfig.preset("tiny")
    action_ids, property_ids, time_gaps, times = random_batch(config, B=2, L=6)
    stretched = time_gaps * 3  # same order, different ages and gaps
    shifted = times + 3 * 3_600_000  # three hours later: same ages, other hours of the day

    def embed(model: Beat, gaps: torch.Tensor, event_times: torch.Tensor) -> torch.Tensor:
        return model(action_ids, property_ids, gaps, event_times=event_times)["embedding"]

    model = Beat(config).eval()
    base = embed(model, time_gaps, times)
    assert not torch.allclose(base, embed(model, stretched, times))
    assert not torch.allclose(base, embed(model, time_gaps, shifted))

    off = BeatConfig.preset("tiny")
    off.use_age_encoding = off.use_gap_encoding = off.use_periodic_encoding = False
    # (the window statistics drop their recency features with the age encoding)
    blind = Beat(off).eval()
    assert blind.num_parameters() < model.num_parameters()
    torch.testing.assert_close(embed(blind, time_gaps, times), embed(blind, stretched, shifted))


def test_amounts_reach_the_model_and_no_amount_is_not_zero():
    config = BeatConfig.preset("tiny")
    model = Beat(config).eval()
    action_ids, property_ids, time_gaps, times = random_batch(config, B=1, L=6)

    def embed(model: Beat, values: torch.Tensor | None) -> torch.Tensor:
        out = model(action_ids, property_ids, time_gaps, event_times=times, values=values)
        return out["embedding"]

    none = torch.full((1, 6), torch.nan)
    zero, small, large = (torch.full((1, 6), v) for v in (0.0, 9.99, 2500.0))
    torch.testing.assert_close(embed(model, None), embed(model, none))  # no values: none
    outputs = [embed(model, v) for v in (none, zero, small, large)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.allclose(outputs[i], outputs[j], atol=1e-4), (i, j)
    off = BeatConfig.preset("tiny")
    off.use_value_encoding = off.use_window_statistics = False
    blind = Beat(off).eval()
    torch.testing.assert_close(embed(blind, none), embed(blind, large))


def test_window_statistics_count_recency_and_amounts():
    config = BeatConfig.preset("tiny")
    statistics = WindowStatistics(config)
    ages = torch.tensor([[40.0, 20.0, 5.0, 0.5, 0.0]], dtype=torch.float64)  # days before as-of
    mask = torch.tensor([[True, True, True, True, False]])
    actions = torch.tensor([[3, 3, 4, 3, 9]])
    values = torch.tensor([[10.0, torch.nan, -4.0, 2.0, 99.0]])
    earlier = tuple(torch.tensor([v], dtype=torch.float64) for v in (6.0, 100.0, 365.0))
    features = statistics(actions, actions + 1, ages, mask, values, earlier)[0]
    count, with_amount, total, last_day, last_week, last_month, newest, oldest, span, month = (
        features[:10].tolist()
    )
    lifetime_count, lifetime_total, tenure = features[10:13].tolist()
    assert lifetime_count == pytest.approx(np.log1p(4 + 6))
    assert lifetime_total == pytest.approx(np.log1p(8.0 + 100.0))
    assert tenure == pytest.approx(np.log1p(365.0))
    assert count == pytest.approx(np.log1p(4)) and with_amount == pytest.approx(np.log1p(3))
    assert total == pytest.approx(np.log1p(8.0))  # 10 - 4 + 2; the padded 99 is not counted
    assert [last_day, last_week, last_month] == pytest.approx(np.log1p([1, 2, 3]).tolist())
    assert newest == pytest.approx(np.log1p(0.5)) and oldest == pytest.approx(np.log1p(40))
    assert span == pytest.approx(np.log1p(39.5)) and month == pytest.approx(-np.log1p(2.0))
    sketch = features[13 : 13 + config.action_vocab_size]
    assert sketch[3] == pytest.approx(np.log1p(3)) and sketch[4] == pytest.approx(np.log1p(1))
    assert sketch[9] == 0  # padding is never counted
    assert statistics.num_features == len(features)
    nothing_earlier = tuple(torch.zeros(1, dtype=torch.float64) for _ in range(3))
    empty = statistics(actions, actions, ages, torch.zeros_like(mask), values, nothing_earlier)
    assert torch.equal(empty, torch.zeros_like(empty))


@pytest.mark.parametrize(
    "off, missing",
    [
        (  # before amounts and window statistics
            ("use_value_encoding", "use_window_statistics", "use_lifetime_statistics"),
            ("use_value_encoding", "use_window_statistics", "use_lifetime_statistics",
             "value_buckets"),
        ),
        (("use_lifetime_statistics",), ("use_lifetime_statistics",)),  # before lifetime
    ],
)
def test_a_model_directory_from_before_a_feature_still_loads(tmp_path, off, missing):
    old = BeatConfig.preset("tiny")
    for key in off:
        setattr(old, key, False)
    model = Beat(old).eval()
    model.save_pretrained(tmp_path, Vocabulary.build(ACTIONS, 64), Vocabulary.build(PROPERTIES, 64))
    document = json.loads((tmp_path / "config.json").read_text())
    for key in missing:
        del document["config"][key]  # written before these keys existed
    (tmp_path / "config.json").write_text(json.dumps(document))
    encoder = BeatEncoder.from_pretrained(tmp_path)
    assert all(not getattr(encoder.model.config, key) for key in off)
    window = make_window(np.random.default_rng(0), 12)
    expected = (
        model(**EventBatch.from_windows([window], encoder.actions, encoder.properties).inputs())[
            "embedding"
        ]
        .detach()
        .numpy()
    )
    np.testing.assert_allclose(encoder.encode([window]), expected, atol=1e-6)


def test_log_buckets_are_monotone_and_reserve_zero():
    days = torch.tensor([0.0, 1e-6, 1 / 86400, 1 / 24, 1.0, 30.0, 90.0, 400.0], dtype=torch.float64)
    buckets = log_bucket(days, num_buckets=64, window_days=90.0)
    assert buckets.min() >= 1 and buckets.max() == 63
    assert torch.all(buckets[1:] >= buckets[:-1])
    assert len(set(buckets[2:7].tolist())) == 5  # second, hour, day, month, window all differ


def test_gap_to_previous_event_skips_padding_wherever_it_sits():
    config = BeatConfig.preset("tiny")
    gap = GapEncoding(config)
    with torch.no_grad():  # make the embedding read out its bucket id in channel 0
        gap.buckets.weight.zero_()
        gap.buckets.weight[:, 0] = torch.arange(config.time_buckets, dtype=torch.float32)
    # ages 5, 2, 2, 0 days → gaps: none, 3 days, 0, 2 days; once left- and once middle-padded
    age = torch.tensor([[0.0, 5, 2, 2, 0], [5, 2, 0, 2, 0]], dtype=torch.float64)
    mask = torch.tensor([[False, True, True, True, True], [True, True, False, True, True]])
    buckets = gap(age, mask)[..., 0].long()
    gaps = torch.tensor([3.0, 0.0, 2.0], dtype=torch.float64)
    expected = log_bucket(gaps, config.time_buckets, config.window_days)
    assert buckets[0].tolist() == [0, 0, *expected.tolist()]
    assert buckets[1].tolist() == [0, expected[0].item(), 0, *expected[1:].tolist()]


# --- model directories ---------------------------------------------------------------------


def test_model_dir_round_trip_gives_identical_embeddings(tmp_path):
    config = BeatConfig.preset("tiny")
    model = Beat(config).eval()
    actions, properties = Vocabulary.build(ACTIONS, 64), Vocabulary.build(PROPERTIES, 64)
    version = model.save_pretrained(tmp_path, actions, properties)
    assert version.startswith("beat-tiny-") and len(version) == len("beat-tiny-") + 8
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json",
        "model.safetensors",
        "vocab_actions.json",
        "vocab_properties.json",
    ]
    document = json.loads((tmp_path / "config.json").read_text())
    assert document["format_version"] == 1 and document["model_version"] == version

    loaded = Beat.from_pretrained(tmp_path)
    inputs = random_batch(config, B=2, L=8)
    expected = model(*inputs[:3], event_times=inputs[3])["embedding"]
    assert torch.equal(loaded(*inputs[:3], event_times=inputs[3])["embedding"], expected)
    # same content → same version; an explicit version is kept as given
    assert model.save_pretrained(tmp_path / "again", actions, properties) == version
    assert model.save_pretrained(tmp_path / "named", actions, properties, "v7") == "v7"
    assert BeatEncoder.from_pretrained(tmp_path / "named").model_version == "v7"


def test_loading_a_wrong_shaped_tensor_names_it(tiny_dir, tmp_path):
    for file in tiny_dir.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["blocks.0.mlp.fc.weight"] = torch.zeros(5, 5)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.fc\.weight"):
        Beat.from_pretrained(tmp_path)

    del tensors["blocks.0.mlp.fc.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.fc\.weight.*missing"):
        BeatEncoder.from_pretrained(tmp_path)

    (tmp_path / "vocab_properties.json").unlink()
    with pytest.raises(ValueError, match="vocab_properties.json"):
        Beat.from_pretrained(tmp_path)


def test_vocabulary_larger_than_the_embedding_table_is_refused(tmp_path):
    config = BeatConfig.preset("tiny")
    too_many = Vocabulary(f"a{i}" for i in range(config.action_vocab_size))
    with pytest.raises(ValueError, match="vocab_actions.json"):
        Beat(config).save_pretrained(tmp_path, too_many, Vocabulary([]))


# --- serving encoder -----------------------------------------------------------------------


def test_encoder_batching_keeps_order_and_matches_one_at_a_time(encoder):
    rng = np.random.default_rng(0)
    windows = [make_window(rng, n) for n in (13, 1, 64, 0, 40, 7, 64, 2, 25, 50)]
    batched = encoder.encode(windows)
    assert batched.shape == (len(windows), 768) and batched.dtype == np.float32
    assert np.isfinite(batched).all()
    single = np.concatenate([encoder.encode([window]) for window in windows])
    np.testing.assert_allclose(batched, single, atol=1e-5, rtol=0)
    assert not np.allclose(batched[0], batched[2], atol=1e-3)  # different users differ


def test_the_next_batch_is_staged_in_another_thread_while_the_current_one_is_used():
    staged = {item: threading.Event() for item in range(8)}
    threads = set()

    def stage(item: int) -> int:
        threads.add(threading.current_thread().name)
        staged[item].set()
        if item == 4:
            raise ValueError("window 4 is broken")
        return item * 10

    got = []
    for value in staged_ahead([0, 1, 2, 3], stage):
        item = value // 10
        # While the caller holds this one, the next is staged (a sequential loop would
        # stage it only after the caller asks for it).
        assert item == 3 or staged[item + 1].wait(10), f"{item + 1} not staged ahead"
        got.append(value)
    assert got == [0, 10, 20, 30] and len(threads) == 1
    assert threads.pop().startswith("beat-stage")
    assert list(staged_ahead([7], stage)) == [70]
    with pytest.raises(ValueError, match="window 4"):  # a staging error reaches the caller
        list(staged_ahead([3, 4, 5], stage))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_encoding_on_cuda_from_pinned_batches_matches_the_cpu(tiny_dir):
    rng = np.random.default_rng(3)
    windows = [make_window(rng, n) for n in (13, 1, 64, 0, 40, 7, 64, 2, 25, 50)]
    on_cpu = BeatEncoder.from_pretrained(tiny_dir, device="cpu", max_batch=4).encode(windows)
    on_gpu = BeatEncoder.from_pretrained(tiny_dir, device="cuda", max_batch=4).encode(windows)
    np.testing.assert_allclose(on_gpu, on_cpu, atol=5e-2, rtol=0)  # bf16 on the GPU
    cosine = (on_gpu * on_cpu).sum(1) / np.linalg.norm(on_gpu, axis=1) / np.linalg.norm(
        on_cpu, axis=1)
    assert cosine.min() > 0.99


def test_encoder_reads_the_newest_max_events_within_the_window(encoder):
    rng = np.random.default_rng(1)
    max_events = encoder.model.config.max_events
    long = make_window(rng, max_events + 30)
    newest = EventWindow(
        long.event_time_ms[-max_events:], long.action[-max_events:], long.property[-max_events:]
    )
    # the 30 events cut off still count in the user's lifetime statistics
    kept_history = EventWindow(
        newest.event_time_ms, newest.action, newest.property,
        earlier_events=30, first_event_ms=int(long.event_time_ms[0]),
    )
    np.testing.assert_allclose(
        encoder.encode([long]), encoder.encode([kept_history]), atol=1e-5, rtol=0
    )
    assert not np.allclose(encoder.encode([long]), encoder.encode([newest]), atol=1e-4)

    # an event older than window_days before the newest one leaves the window for the history
    recent = make_window(rng, 5)
    stale_time = recent.event_time_ms[-1] - 91 * DAY
    stale = EventWindow(
        np.concatenate([[stale_time], recent.event_time_ms]),
        np.concatenate([np.array(["purchase"], dtype=object), recent.action]),
        np.concatenate([np.array(["web"], dtype=object), recent.property]),
        np.concatenate([[12.5], recent.value]),
    )
    recent_with_history = EventWindow(
        recent.event_time_ms, recent.action, recent.property,
        earlier_events=1, earlier_value=12.5, first_event_ms=int(stale_time),
    )
    np.testing.assert_allclose(
        encoder.encode([stale]), encoder.encode([recent_with_history]), atol=1e-5, rtol=0
    )


def test_encoder_uses_relative_ages_and_unordered_input(encoder):
    window = make_window(np.random.default_rng(2), 20)
    week_later = EventWindow(window.event_time_ms + 7 * DAY, window.action, window.property)
    reversed_ = EventWindow(window.event_time_ms[::-1], window.action[::-1], window.property[::-1])
    base = encoder.encode([window])
    np.testing.assert_allclose(encoder.encode([week_later]), base, atol=1e-5, rtol=0)
    np.testing.assert_allclose(encoder.encode([reversed_]), base, atol=1e-5, rtol=0)


def test_batch_ages_count_back_from_as_of_and_default_to_the_newest_event():
    rng = np.random.default_rng(4)
    windows = [make_window(rng, 5), make_window(rng, 3)]
    vocab = Vocabulary(ACTIONS), Vocabulary(PROPERTIES)
    default = EventBatch.from_windows(windows, *vocab)
    for row, window in enumerate(windows):  # the old inputs: newest event 0, days before it
        ages = (window.event_time_ms[-1] - window.event_time_ms) / DAY
        np.testing.assert_array_equal(default.time_gaps[row, : len(window)].numpy(), ages)

    newest = np.array([w.event_time_ms[-1] for w in windows])
    silent = EventBatch.from_windows(windows, *vocab, as_of_ms=newest + [3 * DAY, DAY // 2])
    shift = silent.time_gaps - default.time_gaps
    torch.testing.assert_close(shift[0, :5], torch.full((5,), 3.0, dtype=torch.float64))
    torch.testing.assert_close(shift[1, :3], torch.full((3,), 0.5, dtype=torch.float64))
    assert (silent.time_gaps[1, 3:] == 0).all()  # padding untouched
    # as_of at or before the newest event (clock skew) is the newest event
    for as_of in (newest, newest - DAY, int(newest.min()) - DAY):
        assert torch.equal(
            EventBatch.from_windows(windows, *vocab, as_of).time_gaps, default.time_gaps
        )


def test_encoder_as_of_tells_the_embedding_how_long_the_user_has_been_silent(encoder):
    rng = np.random.default_rng(5)
    window = make_window(rng, 20)
    newest = int(window.event_time_ms[-1])
    base = encoder.encode([window])
    # as of the newest event is the default; later, the same window is a different user state
    np.testing.assert_array_equal(encoder.encode([window], as_of_ms=newest), base)
    week = encoder.encode([window], as_of_ms=newest + 7 * DAY)
    assert not np.allclose(week, base, atol=1e-3)
    # one as_of for all windows, or one per window, in the windows' order (batching reorders)
    windows = [make_window(rng, n) for n in (30, 2, 11)] + [window]
    as_of = np.array([w.event_time_ms[-1] for w in windows]) + np.array([1, 2, 3, 7]) * DAY
    each = encoder.encode(windows, as_of_ms=as_of)
    np.testing.assert_allclose(each[-1], week[0], atol=1e-5, rtol=0)
    for i, w in enumerate(windows):
        np.testing.assert_allclose(
            each[i], encoder.encode([w], as_of_ms=int(as_of[i]))[0], atol=1e-5, rtol=0
        )
    shared = encoder.encode(windows, as_of_ms=newest + 7 * DAY)
    np.testing.assert_allclose(shared[-1], week[0], atol=1e-5, rtol=0)
    # ages past the window saturate in the time encodings (no periodic wrap-around of the
    # slowest sinusoid); only the window statistics go on counting the days of silence
    days = encoder.model.config.window_days
    plain_config = dataclasses.replace(encoder.model.config, use_window_statistics=False)
    plain = BeatEncoder(Beat(plain_config), encoder.actions, encoder.properties, "plain")
    for model, saturates in ((plain, True), (encoder, False)):
        far = [model.encode([window], as_of_ms=newest + (days + k) * DAY) for k in (0, 10)]
        assert np.allclose(far[0], far[1], atol=1e-5, rtol=0) == saturates


def test_unknown_actions_and_properties_encode_as_oov(encoder):
    window = make_window(np.random.default_rng(3), 6)
    unseen = EventWindow(
        window.event_time_ms,
        np.array(["teleport", "page_view", "???", "login", "x", "y"], dtype=object),
        np.array([None, "moon_base", "web", None, "store_99", "ios"], dtype=object),
    )
    assert encoder.actions.lookup(unseen.action).tolist()[0] == OOV_ID
    assert encoder.properties.lookup(unseen.property).tolist()[:2] == [NONE_ID, OOV_ID]
    embedding = encoder.encode([unseen, window])
    assert np.isfinite(embedding).all()
    # two different unseen values are the same OOV token
    renamed_actions = np.array(["warp", "page_view", "!!", "login", "p", "q"], dtype=object)
    renamed = EventWindow(unseen.event_time_ms, renamed_actions, unseen.property)
    np.testing.assert_allclose(encoder.encode([renamed])[0], embedding[0], atol=1e-5, rtol=0)


def test_model_package_imports_no_kafka_feast_or_stream():
    code = (
        "import sys; from model import *; "  # every name: the package imports them lazily
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('stream', 'feast', 'faust', 'confluent_kafka', 'kafka', 'redis')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo)
    assert result.returncode == 0, result.stdout + result.stderr


# --- length-aware batching and transformers ------------------------------------------------


def test_length_batches_cover_every_row_once_with_little_padding():
    lengths = np.random.default_rng(0).integers(0, 257, size=1000)
    batches = length_batches(lengths, max_batch=64, bucket_width=16)
    rows = np.concatenate(batches)
    assert sorted(rows) == list(range(1000))
    for batch in batches:
        assert 1 <= len(batch) <= 64
        assert lengths[batch].max() - lengths[batch].min() < 16  # padding per row < 16 events
    padded = sum(len(b) * lengths[b].max() for b in batches)
    assert padded < 1.1 * lengths.sum()
    assert len(length_batches(np.array([], dtype=np.int64), 64, 16)) == 0


def test_auto_model_loads_a_model_dir_with_the_model_card_snippet(tiny_dir):
    pytest.importorskip("transformers", reason="the optional `hf` extra is not installed")
    from transformers import AutoConfig, AutoModel

    import model.hf  # noqa: F401  registers BEAT with the Auto classes

    assert json.loads((tiny_dir / "config.json").read_text())["model_type"] == "beat"
    assert AutoConfig.from_pretrained(tiny_dir).beat_config() == BeatConfig.preset("tiny")
    hf_model = AutoModel.from_pretrained(tiny_dir)
    config = hf_model.config.beat_config()
    action_ids, property_ids, time_gaps, _ = random_batch(config, B=2, L=5)
    outputs = hf_model(action_ids, property_ids, time_gaps)
    assert outputs["embedding"].shape == (2, 768)
    reference = Beat.from_pretrained(tiny_dir)(action_ids, property_ids, time_gaps)
    torch.testing.assert_close(outputs["embedding"], reference["embedding"], atol=0, rtol=0)
