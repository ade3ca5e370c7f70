"""Pretrain BEAT on users' event histories (the table of model/sequences.py).

One step:
1. The sampler takes the next batch_size training users from a seeded permutation of them (a new
   permutation every epoch); under torchrun every rank takes its own slice of those users.
2. Each user contributes two views as of a random moment, and what follows them
   (model/views.py): every part of a long history is trained on, not only its end.
3. BeatPretrainer computes the losses (bf16 autocast on CUDA); AdamW (weight decay on
   Linear weights only, not on biases, norms, embeddings or the summary token) with linear
   warmup and cosine decay to lr * min_lr_ratio; gradients clipped to grad_clip.

Every random draw of step s (crops, views, masks, dropout) comes from generators seeded by
(seed, s, rank), so the step number alone fixes what a step does: a run killed at any point and
restarted with the same command resumes from its newest checkpoint and ends with exactly the
weights of an uninterrupted run (bitwise on CPU; on every rank under DDP, which saving one
rank's RNG state would not give).

The run writes out_dir as model/run_dir.py lays it out. The other parts of training:
    model/training_data.py      the training users' events, the sampler, the views
    model/train_checkpoints.py  saving, finding and restoring checkpoints
    model/train_log.py          train_log.jsonl, the throughput counters, the progress bar
    model/distributed.py        torchrun's ranks and process group

    python -m model.train --sequences FILE.parquet --out DIR --preset small --steps 2000
    torchrun --nproc_per_node=4 -m model.train --sequences FILE.parquet --out DIR ...
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from model.beat import Beat
from model.config import PRESETS, BeatConfig
from model.distributed import Distributed, setup
from model.pretraining import BeatPretrainer, PretrainConfig
from model.run_dir import CHECKPOINTS_DIR, HEADS_FILE, LOG_FILE, LOSSES, MODEL_DIR, save_model
from model.sequences import read_sequences
from model.train_checkpoints import (
    TrainState,
    latest_checkpoint,
    remove_temporaries,
    restore,
    run_settings,
    save_checkpoint,
)
from model.train_config import TrainConfig, add_options, given
from model.train_log import EventCounter, TrainLog, progress_bar, rates, trim_log
from model.training_data import TrainingData
from model.views import ViewBatch


@dataclass
class TrainResult:
    steps: int  # the step the run ended at (resumed runs count the steps before the resume)
    resumed_from: int  # 0 when it started fresh
    wall_seconds: float  # this process's training loop
    events_per_s: float  # real events in the model's inputs (both views), all ranks
    tokens_per_s: float  # positions the model computed: padding and summary token included
    seconds_per_step: float
    final_losses: dict[str, float]  # the last log window's means
    model_version: str
    model_dir: Path
    heads_path: Path
    log_path: Path
    checkpoint_dir: Path


# --- optimization ----------------------------------------------------------------------------


def make_optimizer(
    pretrainer: nn.Module, config: TrainConfig, device: torch.device
) -> torch.optim.AdamW:
    """AdamW; weight decay on Linear weights only (decaying embeddings would shrink rare ids'
    vectors for being rare, and biases, norms and the summary token have no scale to limit)."""
    decay, no_decay = [], []
    for module in pretrainer.modules():
        for name, param in module.named_parameters(recurse=False):
            linear_weight = isinstance(module, nn.Linear) and name == "weight"
            (decay if linear_weight else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, fused=device.type == "cuda")  # one kernel


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of the peak lr at step (0-based): linear warmup, then cosine to min_lr_ratio."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / (config.steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine


# --- the step --------------------------------------------------------------------------------


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of everything random in one step of one rank."""
    return int(np.random.SeedSequence([seed, 1, step, rank]).generate_state(1)[0])


def step_batch(
    data: TrainingData,
    step: int,
    pretrainer: BeatPretrainer,
    config: TrainConfig,
    world: Distributed,
) -> ViewBatch:
    """This rank's share of the step's users, two views of each. Seeds torch first, so the
    step's dropout and BeatPretrainer's views and masks come from the step's seed too."""
    seed = step_seed(config.seed, step, world.rank)
    torch.manual_seed(seed)
    users = data.users(step * config.batch_size, config.batch_size, config.seed)
    local = config.batch_size // world.world_size
    mine = users[world.rank * local : (world.rank + 1) * local]
    beat = pretrainer.model.config
    tables = (beat.action_vocab_size, beat.property_vocab_size)  # the targets' widths
    rng = np.random.default_rng(seed)
    return data.views(mine, pretrainer.config, tables, rng, beat.window_days)


def train_step(
    model: nn.Module,
    state: TrainState,
    batch: ViewBatch,
    config: TrainConfig,
    device: torch.device,
) -> tuple[dict[str, Tensor], Tensor, float]:
    """Forward, backward, clip and update; returns the losses, the gradient norm before
    clipping and the lr the update used. `model` is the pretrainer, or its DDP wrapper."""
    cuda_bf16 = config.bf16 and device.type == "cuda"
    with torch.autocast(device.type, torch.bfloat16, enabled=cuda_bf16):
        losses = model(batch)
    state.optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    grad_norm = nn.utils.clip_grad_norm_(state.pretrainer.parameters(), config.grad_clip)
    lr = state.optimizer.param_groups[0]["lr"]
    state.optimizer.step()
    state.scheduler.step()
    return losses, grad_norm, lr


# --- the run ---------------------------------------------------------------------------------


def prepare(
    sequences: pa.Table,
    beat: BeatConfig,
    pretrain: PretrainConfig,
    config: TrainConfig,
    device: torch.device,
) -> tuple[TrainState, TrainingData]:
    """The model, heads, optimizer and schedule as of step 0, and the users that can train."""
    torch.manual_seed(config.seed)  # the initial weights; every step reseeds (step_batch)
    pretrainer = BeatPretrainer(Beat(beat), pretrain).to(device)
    min_events = 2 * pretrainer.config.min_view_events
    data = TrainingData.build(sequences, config.vocabulary_sizes(beat), min_events)
    if data.num_users < config.batch_size:
        raise ValueError(
            f"only {data.num_users} users have the {min_events} events two views need "
            f"(PretrainConfig.min_view_events={pretrain.min_view_events}); "
            f"TrainConfig.batch_size={config.batch_size} needs at least that many"
        )
    optimizer = make_optimizer(pretrainer, config, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    settings = run_settings(beat, pretrain, config)
    return TrainState(pretrainer, optimizer, scheduler, settings, data.fingerprint()), data


def start_or_resume(
    out_dir: Path, state: TrainState, world: Distributed, resume: bool, device: torch.device
) -> tuple[int, float]:
    """Ready out_dir and, with resume, load its newest checkpoint into `state`; returns the
    step and the training seconds the run continues from."""
    checkpoints, log_path = out_dir / CHECKPOINTS_DIR, out_dir / LOG_FILE
    if world.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            shutil.rmtree(checkpoints, ignore_errors=True)
            log_path.unlink(missing_ok=True)
        remove_temporaries(checkpoints)
    world.barrier()  # rank 0 has cleaned up before any rank looks for a checkpoint
    latest = latest_checkpoint(checkpoints) if resume else None
    step, elapsed = (0, 0.0) if latest is None else restore(latest, state, device)
    if world.main:
        trim_log(log_path, step)
    return step, elapsed


def train(
    sequences: pa.Table,
    out_dir: str | Path,
    beat_config: BeatConfig,
    pretrain_config: PretrainConfig | None = None,
    train_config: TrainConfig | None = None,
    resume: bool = True,
) -> TrainResult:
    """Pretrain a BEAT model on `sequences` (model/sequences.py) and write out_dir
    (model/run_dir.py). With resume, continue from out_dir's newest checkpoint when there is
    one; without, delete out_dir's checkpoints and log first."""
    config = train_config or TrainConfig()
    out_dir = Path(out_dir)
    world, device = setup(config.device, config.batch_size)
    pretrain = pretrain_config or PretrainConfig()
    state, data = prepare(sequences, beat_config, pretrain, config, device)
    step, elapsed_before = start_or_resume(out_dir, state, world, resume, device)
    resumed_from = step

    pretrainer = state.pretrainer
    counter = EventCounter(pretrainer.model, device)
    model = DistributedDataParallel(pretrainer) if world.world_size > 1 else pretrainer
    checkpoints, log = out_dir / CHECKPOINTS_DIR, TrainLog(out_dir / LOG_FILE, counter, world)
    began = time.perf_counter()
    pretrainer.train()
    with progress_bar(world.main) as progress:
        task = progress.add_task("train", total=config.steps, completed=step, rates="")
        while step < config.steps:
            batch = step_batch(data, step, pretrainer, config, world).to(device)
            losses, grad_norm, lr = train_step(model, state, batch, config, device)
            step += 1
            log.add(losses, grad_norm)
            progress.update(task, advance=1)
            elapsed = elapsed_before + time.perf_counter() - began
            if step % config.log_every == 0 or step == config.steps:
                progress.update(task, rates=rates(log.write(step, lr, elapsed)))
            if world.main and (step % config.checkpoint_every == 0 or step == config.steps):
                save_checkpoint(checkpoints, step, elapsed, state)
    wall = time.perf_counter() - began
    events, tokens = world.all_sum(counter.read()).tolist()

    version = save_model(out_dir, pretrainer, data.actions, data.properties) if world.main else ""
    world.close()
    trained = step - resumed_from
    return TrainResult(
        steps=step,
        resumed_from=resumed_from,
        wall_seconds=wall,
        events_per_s=events / wall if trained else 0.0,
        tokens_per_s=tokens / wall if trained else 0.0,
        seconds_per_step=wall / trained if trained else 0.0,
        final_losses={name: log.last[name] for name in LOSSES if name in log.last},
        model_version=version,
        model_dir=out_dir / MODEL_DIR,
        heads_path=out_dir / HEADS_FILE,
        log_path=out_dir / LOG_FILE,
        checkpoint_dir=checkpoints,
    )


# --- command line ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m model.train",
        description="Pretrain BEAT on a sequences file (beat export); under torchrun, with DDP. "
        "Options left out keep TrainConfig's and PretrainConfig's defaults and the preset's "
        "architecture.",
    )
    parser.add_argument("--sequences", type=Path, required=True, help="Parquet from beat export")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS))
    parser.add_argument(
        "--no-resume",
        action="store_true",
        help="start over, deleting the output directory's checkpoints",
    )
    add_options(parser, TrainConfig, "training (TrainConfig)")
    add_options(parser, PretrainConfig, "objectives (PretrainConfig)")
    add_options(parser, BeatConfig, "architecture (BeatConfig, over the preset)", skip=("name",))
    args = parser.parse_args(argv)
    try:
        beat = dataclasses.replace(BeatConfig.preset(args.preset), **given(args, BeatConfig))
        result = train(
            read_sequences(args.sequences),
            args.out,
            beat,
            PretrainConfig(**given(args, PretrainConfig)),
            TrainConfig(**given(args, TrainConfig)),
            resume=not args.no_resume,
        )
    except ValueError as error:
        parser.error(str(error))
    if result.model_version:  # rank 0
        losses = "  ".join(f"{k} {v:.4f}" for k, v in result.final_losses.items())
        print(
            f"{result.model_version} in {result.model_dir} after step {result.steps} "
            f"(resumed from {result.resumed_from}); {result.seconds_per_step:.3f} s/step, "
            f"{result.events_per_s:,.0f} events/s, {result.tokens_per_s:,.0f} tokens/s; {losses}"
        )


if __name__ == "__main__":
    main()
