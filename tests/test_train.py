"""The pretraining loop: outputs, schedule, exact resume after SIGKILL, and torchrun (DDP)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from safetensors.torch import load_file

from model import BeatConfig, BeatEncoder, EventWindow, PretrainConfig
from model.model_dir import WEIGHTS_FILE
from model.pretraining import OBJECTIVES
from model.run_dir import load_pretrainer
from model.sequences import write_sequences
from model.train import TrainConfig, lr_factor, make_optimizer, train
from model.train_checkpoints import latest_checkpoint
from model.training_data import TrainingData
from model.vocab import Vocabulary
from stream.synthetic import SyntheticEvents

from conftest import synthetic_sequences

REPO = Path(__file__).resolve().parent.parent
# Small enough for seconds on two shared cores; views of up to 8 events keep steps cheap.
PRETRAIN = PretrainConfig(min_view_events=3, max_view_events=8)


@pytest.fixture(scope="module")
def sequences() -> pa.Table:
    start = datetime(2024, 3, 1, tzinfo=UTC)
    return synthetic_sequences(SyntheticEvents(120, seed=1), start, start + timedelta(days=10))


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread, as the subprocesses get (OMP_NUM_THREADS=1): a tiny model gains
    nothing from more on two shared cores, and the resume test compares bits across processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny() -> BeatConfig:
    return BeatConfig.preset("tiny")


def quick(**overrides) -> TrainConfig:
    values = dict(steps=12, batch_size=8, lr=3e-3, warmup_steps=2, checkpoint_every=5, log_every=2)
    return TrainConfig(**{**values, **overrides})


def weights(out_dir: Path) -> dict[str, torch.Tensor]:
    return {
        **load_file(out_dir / "model" / WEIGHTS_FILE),
        **load_file(out_dir / "pretrain_heads.safetensors"),
    }


# --- pieces ----------------------------------------------------------------------------------


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    config = TrainConfig(steps=110, warmup_steps=10, min_lr_ratio=0.1)
    factors = [lr_factor(step, config) for step in range(110)]
    assert factors[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert factors[10] == pytest.approx(1.0)
    assert factors[60] == pytest.approx(0.55)  # half way: the mean of 1 and the floor
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[-1] == pytest.approx(0.1, abs=1e-3)


def test_weight_decay_applies_to_linear_weights_only():
    from model import Beat
    from model.pretraining import BeatPretrainer

    pretrainer = BeatPretrainer(Beat(tiny()))
    decayed, plain = make_optimizer(pretrainer, TrainConfig(), torch.device("cpu")).param_groups
    names = {id(p): n for n, p in pretrainer.named_parameters()}
    decayed_names = {names[id(p)] for p in decayed["params"]}
    plain_names = {names[id(p)] for p in plain["params"]}
    assert "model.blocks.0.attn.qkv.weight" in decayed_names
    assert "masked_head.action.weight" in decayed_names
    for name in (
        "model.embed.action.weight",
        "model.blocks.0.ln_1.weight",
        "model.blocks.0.attn.qkv.bias",
        "model.summary",
    ):
        assert name in plain_names
    assert len(decayed_names) + len(plain_names) == len(names)
    assert decayed["weight_decay"] == 0.01 and plain["weight_decay"] == 0.0


def test_training_data_draws_views_of_every_user_each_epoch(sequences):
    data = TrainingData.build(sequences, quick().vocabulary_sizes(tiny()), min_events=8)
    assert data.num_users == int(
        (pc.list_value_length(sequences["event_time"]).to_numpy() >= 8).sum()
    )
    newest = pc.max(pc.list_flatten(sequences["event_time"])).as_py()
    assert data.events.data_end_ms == newest
    # one epoch of positions visits each user once; the next epoch is another order
    first = data.users(0, data.num_users, seed=0)
    second = data.users(data.num_users, data.num_users, seed=0)
    assert sorted(first) == list(range(data.num_users))
    assert sorted(second) == list(range(data.num_users)) and not np.array_equal(first, second)
    assert np.array_equal(data.users(5, 10, seed=0), first[5:15])

    users = np.arange(data.num_users)
    sizes = (tiny().action_vocab_size, tiny().property_vocab_size)
    views = data.views(users, PretrainConfig(max_view_events=16), sizes, np.random.default_rng(0))
    again = data.views(users, PretrainConfig(max_view_events=16), sizes, np.random.default_rng(0))
    assert len(views) == 2 * data.num_users and torch.equal(
        views.inputs.event_times, again.inputs.event_times
    )
    events = data.events
    for row in (0, 1, data.num_users - 1):  # view B of these users: a run of their own events
        real = views.inputs.padding_mask[data.num_users + row]
        times = views.inputs.event_times[data.num_users + row][real].numpy()
        start = events.starts[row]
        whole = events.event_time[start : start + events.lengths[row]]
        offset = int(np.searchsorted(whole, times[0]))
        assert np.array_equal(whole[offset : offset + len(times)], times)


def test_vocabulary_from_arrow_counts_matches_vocabulary_build(sequences):
    flat = pc.list_flatten(sequences["property"]).to_pylist()
    assert None in flat
    assert Vocabulary.from_column(sequences["property"], 20) == Vocabulary.build(flat, 20)


def test_config_errors_name_the_setting(sequences, tmp_path):
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(steps=10, warmup_steps=10)
    with pytest.raises(ValueError, match="max_actions=600 exceeds"):
        TrainConfig(max_actions=600).vocabulary_sizes(tiny())
    with pytest.raises(ValueError, match="batch_size=500 needs"):
        train(sequences, tmp_path, tiny(), PRETRAIN, quick(batch_size=500))


# --- a run -----------------------------------------------------------------------------------


@pytest.mark.training
def test_train_writes_a_servable_model_heads_log_and_two_checkpoints(sequences, tmp_path):
    result = train(sequences, tmp_path, tiny(), PRETRAIN, quick())
    assert result.steps == 12 and result.resumed_from == 0
    assert result.events_per_s > 0 and result.tokens_per_s >= result.events_per_s
    assert set(result.final_losses) == {"loss", *OBJECTIVES}

    log = [json.loads(line) for line in result.log_path.read_text().splitlines()]
    assert [line["step"] for line in log] == [2, 4, 6, 8, 10, 12]
    assert log[0]["lr"] == pytest.approx(3e-3 * 2 / 2)  # step 2 used the second warmup factor
    for key in (
        "masked",
        "next",
        "contrastive",
        "grad_norm",
        "events_per_s",
        "tokens_per_s",
        "elapsed_s",
    ):
        assert np.isfinite(log[-1][key])
    assert [p.name for p in sorted(result.checkpoint_dir.iterdir())] == [
        "step-00000010",
        "step-00000012",
    ]

    encoder = BeatEncoder.from_pretrained(result.model_dir, device="cpu")
    assert encoder.model_version == result.model_version
    window = EventWindow(
        [1_709_251_200_000, 1_709_254_800_000], ["page_view", "purchase"], [None, None]
    )
    assert encoder.encode([window]).shape == (1, 768)

    pretrainer = load_pretrainer(tmp_path)
    saved = weights(tmp_path)
    for name, tensor in pretrainer.state_dict().items():
        assert torch.equal(tensor, saved[name.removeprefix("model.")])

    # a finished run resumed does nothing more; different settings are refused
    again = train(sequences, tmp_path, tiny(), PRETRAIN, quick())
    assert again.resumed_from == 12 and again.model_version == result.model_version
    with pytest.raises(ValueError, match="train.lr=0.003.*0.001"):
        train(sequences, tmp_path, tiny(), PRETRAIN, quick(lr=1e-3))


@pytest.mark.training
def test_pretraining_lowers_the_loss(sequences, tmp_path):
    result = train(
        sequences,
        tmp_path,
        tiny(),
        PRETRAIN,
        quick(steps=60, batch_size=16, log_every=10, checkpoint_every=60),
    )
    log = [json.loads(line) for line in result.log_path.read_text().splitlines()]
    assert log[-1]["loss"] < 0.85 * log[0]["loss"], (log[0]["loss"], log[-1]["loss"])


# --- exact resume after SIGKILL --------------------------------------------------------------


def train_command(sequences_file: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [
        "--sequences",
        str(sequences_file),
        "--out",
        str(out),
        "--preset",
        "tiny",
        "--steps",
        str(steps),
        "--batch-size",
        "8",
        "--lr",
        "3e-3",
        "--warmup-steps",
        "2",
        "--checkpoint-every",
        "5",
        "--log-every",
        "5",
        "--min-view-events",
        str(PRETRAIN.min_view_events),
        "--max-view-events",
        str(PRETRAIN.max_view_events),
        *extra,
    ]


@pytest.mark.broker  # starts training processes
def test_a_run_killed_after_a_checkpoint_resumes_to_exactly_the_uninterrupted_weights(
    sequences, tmp_path
):
    steps = 30  # the kill lands around step 5, well before the end
    path = tmp_path / "sequences.parquet"
    write_sequences(sequences, path)
    straight = tmp_path / "straight"
    # The reference in this process, through the same command line (same defaults).
    from model.train import main

    main(train_command(path, straight, steps))

    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "model.train", *train_command(path, killed, steps)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 60
    while latest_checkpoint(killed / "checkpoints") is None:
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "no checkpoint within 60 s"
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    stopped_at = int(latest_checkpoint(killed / "checkpoints").name.removeprefix("step-"))
    assert stopped_at < steps and not (killed / "model").exists()

    resumed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {stopped_at}" in resumed.stdout
    a, b = weights(straight), weights(killed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # the log holds each step once, as if the run had never stopped
    log = [
        json.loads(line)["step"] for line in (killed / "train_log.jsonl").read_text().splitlines()
    ]
    assert log == list(range(5, steps + 1, 5))


# --- torchrun --------------------------------------------------------------------------------


@pytest.mark.broker  # starts training processes
def test_torchrun_with_two_processes_trains_and_saves_the_model(sequences, tmp_path):
    path = tmp_path / "sequences.parquet"
    write_sequences(sequences, path)
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [
        str(torchrun),
        "--nproc_per_node=2",
        "--standalone",
        "-m",
        "model.train",
        *train_command(path, out, 3),
        "--device",
        "cpu",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    began = time.monotonic()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    print(f"torchrun, 2 processes, 3 steps: {time.monotonic() - began:.1f} s")
    assert (out / "model" / WEIGHTS_FILE).is_file()
    assert done.stdout.count("after step 3") == 1  # only rank 0 reports
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in log] == [3]
