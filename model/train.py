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

out_dir/
    model/                     the model directory (model/checkpoint.py), BeatEncoder-loadable
    pretrain_heads.safetensors the pretraining heads and PretrainConfig (see load_pretrainer)
    train_log.jsonl            one line per log_every steps
    checkpoints/step-NNNNNNNN/ trainer.pt: weights, heads, optimizer, scheduler, step, sampler
                               position, configs; written to a temporary directory and renamed,
                               the newest two kept

    python -m model.train --sequences FILE.parquet --out DIR --preset small --steps 2000
    torchrun --nproc_per_node=4 -m model.train --sequences FILE.parquet --out DIR ...
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.distributed as dist
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from model.beat import Beat
from model.checkpoint import check_tensors
from model.config import PRESETS, BeatConfig
from model.pretraining import OBJECTIVES, BeatPretrainer, PretrainConfig
from model.sequences import lengths, read_sequences, starts
from model.views import UserEvents, ViewBatch, sample_views
from model.vocab import SPECIAL_TOKENS, Vocabulary

MODEL_DIR = "model"
HEADS_FILE = "pretrain_heads.safetensors"
LOG_FILE = "train_log.jsonl"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_FILE = "trainer.pt"
KEEP_CHECKPOINTS = 2
# Settings a resumed run may change: they do not alter what the steps compute.
RESUMABLE_CHANGES = {"checkpoint_every", "log_every", "device"}


@dataclass
class TrainConfig:
    """The training loop's settings (the architecture is BeatConfig, the objectives
    PretrainConfig)."""

    steps: int = 1000
    batch_size: int = 64  # users per step, over all ranks
    lr: float = 1e-3  # peak, reached after warmup_steps
    weight_decay: float = 0.01
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    grad_clip: float = 1.0  # max global gradient norm
    checkpoint_every: int = 200
    log_every: int = 10
    seed: int = 0
    device: str = "auto"  # "auto" (CUDA when available), "cpu", "cuda"
    bf16: bool = True  # autocast to bfloat16, on CUDA only (on CPU it is slower)
    max_actions: int | None = None  # vocabulary sizes incl. reserved ids; None: the model's table
    max_properties: int | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"TrainConfig.{name} must be at least 1, got {getattr(self, name)}"
                )
        if self.batch_size < 2:
            raise ValueError(
                "TrainConfig.batch_size must be at least 2: the contrastive loss "
                "takes its negatives from the other users of the batch"
            )
        if self.lr <= 0 or self.weight_decay < 0 or self.grad_clip <= 0:
            raise ValueError(
                f"TrainConfig needs lr > 0, weight_decay >= 0 and grad_clip > 0; got "
                f"lr={self.lr}, weight_decay={self.weight_decay}, grad_clip={self.grad_clip}"
            )
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(
                f"TrainConfig.warmup_steps must be in [0, steps={self.steps}), "
                f"got {self.warmup_steps}"
            )
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(
                f"TrainConfig.device must be 'auto', 'cpu' or 'cuda', got {self.device!r}"
            )
        for name in ("max_actions", "max_properties"):
            size = getattr(self, name)
            if size is not None and size <= len(SPECIAL_TOKENS):
                raise ValueError(
                    f"TrainConfig.{name} must exceed the {len(SPECIAL_TOKENS)} "
                    f"reserved ids, got {size}"
                )

    def vocabulary_sizes(self, beat: BeatConfig) -> tuple[int, int]:
        """(actions, properties): the vocabularies' sizes, checked against the model's tables."""
        sizes = []
        for name, table_name in (
            ("max_actions", "action_vocab_size"),
            ("max_properties", "property_vocab_size"),
        ):
            wanted, table = getattr(self, name), getattr(beat, table_name)
            if wanted is not None and wanted > table:
                raise ValueError(
                    f"TrainConfig.{name}={wanted} exceeds the model's table of "
                    f"{table} ids; lower it or raise BeatConfig.{table_name}"
                )
            sizes.append(table if wanted is None else wanted)
        return sizes[0], sizes[1]


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


# --- data ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)  # a batch spans at most two epochs
def epoch_order(num_users: int, seed: int, epoch: int) -> np.ndarray:
    """The order users are visited in during one epoch."""
    return np.random.default_rng([seed, 0, epoch]).permutation(num_users)


class TrainingData:
    """The training users' events as flat arrays, and the views each step draws from them."""

    def __init__(
        self,
        sequences: pa.Table,
        actions: Vocabulary,
        properties: Vocabulary,
        data_end_ms: int | None = None,
    ) -> None:
        flat = {name: pc.list_flatten(sequences[name]) for name in ("action", "property")}
        event_time = pc.list_flatten(sequences["event_time"]).to_numpy()  # [E] int64 ms
        values = pc.list_flatten(sequences["value"]).fill_null(np.nan)
        self.events = UserEvents(
            starts=starts(sequences),
            lengths=lengths(sequences),
            event_time=event_time,
            # int32: half the memory of int64, and any vocabulary fits
            action_ids=actions.lookup_column(flat["action"]).astype(np.int32),
            property_ids=properties.lookup_column(flat["property"]).astype(np.int32),
            values=values.to_numpy(zero_copy_only=False).astype(np.float32),
            # the end of what was observed: the newest event, unless the caller knows better
            data_end_ms=int(event_time.max()) if data_end_ms is None else data_end_ms,
        )
        self.actions, self.properties = actions, properties

    @classmethod
    def build(
        cls, sequences: pa.Table, beat: BeatConfig, train: TrainConfig, min_events: int
    ) -> TrainingData:
        """Keep the users with at least min_events events (fewer cannot give two views), and
        build the vocabularies from their events. The end of the data is the newest event of
        all users, the short ones included."""
        newest = pc.max(pc.list_flatten(sequences["event_time"])).as_py()
        kept = sequences.filter(pa.array(lengths(sequences) >= min_events))
        max_actions, max_properties = train.vocabulary_sizes(beat)
        actions = Vocabulary.from_column(kept["action"], max_actions)
        properties = Vocabulary.from_column(kept["property"], max_properties)
        return cls(kept, actions, properties, newest)

    @property
    def num_users(self) -> int:
        return len(self.events.lengths)

    def fingerprint(self) -> str:
        """Identifies the training data, so a resume on different data is refused."""
        digest = hashlib.sha256()
        events = self.events
        for array in (
            events.lengths,
            events.event_time,
            events.action_ids,
            events.property_ids,
            events.values,
        ):
            digest.update(np.ascontiguousarray(array).tobytes())
        digest.update(str(events.data_end_ms).encode())
        digest.update(json.dumps([self.actions.tokens, self.properties.tokens]).encode())
        return digest.hexdigest()

    def users(self, position: int, count: int, seed: int) -> np.ndarray:
        """Users [count] at sampler positions [position, position + count): position p is user
        permutation_{p // U}[p % U], a fresh seeded permutation of all U users per epoch."""
        positions = np.arange(position, position + count)
        epochs = positions // self.num_users
        users = np.empty(count, dtype=np.int64)
        for epoch in np.unique(epochs):  # one or two epochs per batch
            here = epochs == epoch
            order = epoch_order(self.num_users, seed, int(epoch))
            users[here] = order[positions[here] % self.num_users]
        return users

    def views(
        self,
        users: np.ndarray,
        config: PretrainConfig,
        vocab_sizes: tuple[int, int],
        rng: np.random.Generator,
    ) -> ViewBatch:
        """Two views of each user and their targets (model/views.py)."""
        return sample_views(
            self.events,
            users,
            config.min_view_events,
            config.max_view_events,
            config.future_horizons_days,
            vocab_sizes,
            rng,
        )


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


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of everything random in one step of one rank."""
    return int(np.random.SeedSequence([seed, 1, step, rank]).generate_state(1)[0])


# --- checkpoints -----------------------------------------------------------------------------


def checkpoint_path(checkpoints: Path, step: int) -> Path:
    return checkpoints / f"step-{step:08d}"


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint (temporary directories of an interrupted write are not
    named step-*, so they never count)."""
    done = sorted(p for p in checkpoints.glob("step-*") if (p / CHECKPOINT_FILE).is_file())
    return done[-1] if done else None


def save_checkpoint(checkpoints: Path, step: int, state: dict[str, Any]) -> Path:
    """Write to a temporary directory, rename it into place, then drop all but the newest
    KEEP_CHECKPOINTS: a kill at any moment leaves the previous checkpoint intact."""
    temporary = checkpoints / f".tmp-step-{step:08d}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    with open(temporary / CHECKPOINT_FILE, "wb") as file:
        torch.save(state, file)
        file.flush()
        os.fsync(file.fileno())
    final = checkpoint_path(checkpoints, step)
    temporary.rename(final)
    for old in sorted(checkpoints.glob("step-*"))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old)
    return final


def run_settings(beat: BeatConfig, pretrain: PretrainConfig, train: TrainConfig) -> dict[str, Any]:
    return {
        "beat": beat.to_dict(),
        "pretrain": dataclasses.asdict(pretrain),
        "train": dataclasses.asdict(train),
    }


def check_resumable(saved: dict[str, Any], current: dict[str, Any], source: Path) -> None:
    for part in ("beat", "pretrain", "train"):
        for key in sorted(set(saved[part]) | set(current[part])):
            old, new = saved[part].get(key), current[part].get(key)
            if old != new and key not in RESUMABLE_CHANGES:
                raise ValueError(
                    f"{source} was written with {part}.{key}={old!r}, this run has {new!r}: "
                    f"resume with the same settings, or start over with resume=False (--no-resume)"
                )


# --- saving the result -----------------------------------------------------------------------


def save_heads(path: Path, pretrainer: BeatPretrainer) -> None:
    heads = {k: v for k, v in pretrainer.state_dict().items() if not k.startswith("model.")}
    config = json.dumps(dataclasses.asdict(pretrainer.config))
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in heads.items()},
        str(path),
        metadata={"pretrain_config": config},
    )


def load_pretrainer(out_dir: str | Path) -> BeatPretrainer:
    """The trained model with its pretraining heads (eval mode, CPU), from a train() out_dir."""
    out_dir = Path(out_dir)
    model = Beat.from_pretrained(out_dir / MODEL_DIR)
    with safe_open(str(out_dir / HEADS_FILE), framework="pt") as file:
        config = PretrainConfig(**json.loads(file.metadata()["pretrain_config"]))
        heads = {name: file.get_tensor(name) for name in file.keys()}
    with torch.device("meta"):  # the heads' random init would be overwritten anyway
        pretrainer = BeatPretrainer(model, config)
    expected = {k: v for k, v in pretrainer.state_dict().items() if not k.startswith("model.")}
    check_tensors(heads, expected, str(out_dir / HEADS_FILE))
    pretrainer.load_state_dict(heads, strict=False, assign=True)
    return pretrainer.eval()


def save_model(out_dir: Path, pretrainer: BeatPretrainer, data: TrainingData) -> str:
    """out_dir/model (replaced whole) and the heads; returns the model version."""
    temporary, final = out_dir / f".tmp-{MODEL_DIR}", out_dir / MODEL_DIR
    shutil.rmtree(temporary, ignore_errors=True)
    version = pretrainer.model.save_pretrained(temporary, data.actions, data.properties)
    shutil.rmtree(final, ignore_errors=True)
    temporary.rename(final)
    save_heads(out_dir / HEADS_FILE, pretrainer)
    return version


# --- distributed -----------------------------------------------------------------------------


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    started_here: bool = False  # we called init_process_group, so we destroy it

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(config: TrainConfig) -> tuple[Distributed, torch.device]:
    """The process group (under torchrun: WORLD_SIZE > 1) and this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "TrainConfig.device='cuda' but torch finds no CUDA device; use device='auto' or 'cpu'"
        )
    cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size == 1:
        return Distributed(), device
    if config.batch_size % world_size:
        raise ValueError(
            f"TrainConfig.batch_size={config.batch_size} must be divisible by the "
            f"number of processes ({world_size})"
        )
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if cuda else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), started), device


class EventCounter:
    """Running totals of the events and positions Beat has seen (a forward pre-hook, because
    the views are made inside BeatPretrainer.forward)."""

    def __init__(self, model: Beat, device: torch.device) -> None:
        self.events = torch.zeros((), dtype=torch.float64, device=device)  # no sync per step
        self.tokens = 0
        model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module: nn.Module, args: tuple, kwargs: dict[str, Tensor]) -> None:
        mask = kwargs["padding_mask"]  # [2B, L]
        self.events += mask.sum()
        self.tokens += mask.shape[0] * (mask.shape[1] + 1)  # + the summary token

    def read(self) -> Tensor:
        """[events, tokens] float64, on the device."""
        tokens = torch.tensor(self.tokens, dtype=torch.float64, device=self.events.device)
        return torch.stack([self.events, tokens])


# --- the loop --------------------------------------------------------------------------------

LOSSES = ("loss", *OBJECTIVES)


@dataclass
class LogWindow:
    """The steps since the last log line; sums stay on the device until logged."""

    counts_before: Tensor  # EventCounter.read() when the window opened
    began: float = field(default_factory=time.perf_counter)
    sums: Tensor | None = None  # [losses..., grad norm] float64
    steps: int = 0

    def add(self, losses: dict[str, Tensor], grad_norm: Tensor) -> None:
        values = torch.stack([*(losses[name].detach() for name in LOSSES), grad_norm]).double()
        self.sums = values if self.sums is None else self.sums + values
        self.steps += 1


def all_sum(values: Tensor, world: Distributed) -> Tensor:
    if world.world_size > 1:
        dist.all_reduce(values)
    return values


def log_line(
    step: int,
    lr: float,
    elapsed: float,
    window: LogWindow,
    counter: EventCounter,
    world: Distributed,
) -> dict[str, float]:
    """The window's means over steps and ranks, and its throughput over all ranks."""
    counts = counter.read() - window.counts_before  # [2]
    values = all_sum(torch.cat([window.sums / window.steps, counts]), world).tolist()
    seconds = time.perf_counter() - window.began
    means = [value / world.world_size for value in values[:-2]]
    return {
        "step": step,
        "lr": lr,
        **dict(zip((*LOSSES, "grad_norm"), means)),
        "steps_per_s": window.steps / seconds,
        "events_per_s": values[-2] / seconds,
        "tokens_per_s": values[-1] / seconds,
        "elapsed_s": elapsed,
    }


def trim_log(path: Path, step: int) -> None:
    """Drop lines past `step`: a killed run may have logged steps its checkpoint does not hold."""
    if path.exists():
        lines = path.read_text().splitlines()
        path.write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= step))


def progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]pretrain"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rates]}"),
        TimeRemainingColumn(),
        disable=not enabled,
    )


def restore(
    latest: Path,
    pretrainer: BeatPretrainer,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    settings: dict[str, Any],
    fingerprint: str,
    device: torch.device,
) -> tuple[int, float]:
    """Load a checkpoint written by the same settings and data; returns (step, elapsed_s)."""
    state = torch.load(latest / CHECKPOINT_FILE, map_location=device, weights_only=True)
    check_resumable(state["settings"], settings, latest)
    if state["data"] != fingerprint:
        raise ValueError(
            f"{latest} was trained on other sequences; pass the same data to "
            f"resume, or start over with resume=False (--no-resume)"
        )
    batch_size = settings["train"]["batch_size"]
    if state["sampler_position"] != state["step"] * batch_size:
        raise ValueError(
            f"{latest}: sampler position {state['sampler_position']} is not "
            f"step {state['step']} x batch_size {batch_size}"
        )
    pretrainer.load_state_dict(state["pretrainer"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["step"], state["elapsed_s"]


def train(
    sequences: pa.Table,
    out_dir: str | Path,
    beat_config: BeatConfig,
    pretrain_config: PretrainConfig | None = None,
    train_config: TrainConfig | None = None,
    resume: bool = True,
) -> TrainResult:
    """Pretrain a BEAT model on `sequences` (model/sequences.py) and write out_dir (see the
    module doc). With resume, continue from out_dir's newest checkpoint when there is one;
    without, delete out_dir's checkpoints and log first."""
    pretrain_config = pretrain_config or PretrainConfig()
    config = train_config or TrainConfig()
    out_dir = Path(out_dir)
    checkpoints, log_path = out_dir / CHECKPOINTS_DIR, out_dir / LOG_FILE
    world, device = setup(config)
    torch.manual_seed(config.seed)  # the initial weights; every step reseeds (step_seed)

    pretrainer = BeatPretrainer(Beat(beat_config), pretrain_config).to(device)
    min_events = 2 * pretrainer.config.min_view_events
    vocab_sizes = (beat_config.action_vocab_size, beat_config.property_vocab_size)
    data = TrainingData.build(sequences, beat_config, config, min_events)
    if data.num_users < config.batch_size:
        raise ValueError(
            f"only {data.num_users} users have the {min_events} events two views need "
            f"(PretrainConfig.min_view_events={pretrain_config.min_view_events}); "
            f"TrainConfig.batch_size={config.batch_size} needs at least that many"
        )
    optimizer = make_optimizer(pretrainer, config, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    settings = run_settings(beat_config, pretrain_config, config)
    fingerprint = data.fingerprint()

    if world.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            shutil.rmtree(checkpoints, ignore_errors=True)
            log_path.unlink(missing_ok=True)
        for stale in checkpoints.glob(".tmp-*"):
            shutil.rmtree(stale)
    if world.world_size > 1:
        dist.barrier()  # rank 0 has cleaned up before any rank looks for a checkpoint
    latest = latest_checkpoint(checkpoints) if resume else None
    step, elapsed_before = 0, 0.0
    if latest is not None:
        step, elapsed_before = restore(
            latest, pretrainer, optimizer, scheduler, settings, fingerprint, device
        )
    resumed_from = step
    if world.main:
        trim_log(log_path, step)

    counter = EventCounter(pretrainer.model, device)
    model = DistributedDataParallel(pretrainer) if world.world_size > 1 else pretrainer
    local = config.batch_size // world.world_size  # this rank's users per step
    cuda_bf16 = config.bf16 and device.type == "cuda"
    began, line = time.perf_counter(), {}
    window = LogWindow(counter.read())
    pretrainer.train()
    with progress_bar(world.main) as progress:
        task = progress.add_task("train", total=config.steps, completed=step, rates="")
        while step < config.steps:
            seed = step_seed(config.seed, step, world.rank)
            torch.manual_seed(seed)  # dropout, and BeatPretrainer's views and masks
            users = data.users(step * config.batch_size, config.batch_size, config.seed)
            mine = users[world.rank * local : (world.rank + 1) * local]
            rng = np.random.default_rng(seed)
            batch = data.views(mine, pretrainer.config, vocab_sizes, rng).to(device)
            with torch.autocast(device.type, torch.bfloat16, enabled=cuda_bf16):
                losses = model(batch)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            grad_norm = nn.utils.clip_grad_norm_(pretrainer.parameters(), config.grad_clip)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            step += 1
            window.add(losses, grad_norm)
            progress.update(task, advance=1)

            elapsed = elapsed_before + time.perf_counter() - began
            if step % config.log_every == 0 or step == config.steps:
                line = log_line(step, lr, elapsed, window, counter, world)
                window = LogWindow(counter.read())
                if world.main:
                    with log_path.open("a") as log:
                        log.write(json.dumps(line) + "\n")
                progress.update(
                    task,
                    rates=f"{line['steps_per_s']:.2f} step/s  "
                    f"{line['events_per_s']:,.0f} events/s  "
                    f"{line['tokens_per_s']:,.0f} tokens/s",
                )
            if world.main and (step % config.checkpoint_every == 0 or step == config.steps):
                save_checkpoint(
                    checkpoints,
                    step,
                    {
                        "step": step,
                        "sampler_position": step * config.batch_size,
                        "elapsed_s": elapsed,
                        "pretrainer": pretrainer.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "settings": settings,
                        "data": fingerprint,
                    },
                )
    wall = time.perf_counter() - began
    events, tokens = all_sum(counter.read(), world).tolist()

    version = save_model(out_dir, pretrainer, data) if world.main else ""
    if world.started_here:
        dist.barrier()  # every rank returns once the model is written
        dist.destroy_process_group()
    trained = step - resumed_from
    return TrainResult(
        steps=step,
        resumed_from=resumed_from,
        wall_seconds=wall,
        events_per_s=events / wall if trained else 0.0,
        tokens_per_s=tokens / wall if trained else 0.0,
        seconds_per_step=wall / trained if trained else 0.0,
        final_losses={name: line[name] for name in LOSSES if name in line},
        model_version=version,
        model_dir=out_dir / MODEL_DIR,
        heads_path=out_dir / HEADS_FILE,
        log_path=log_path,
        checkpoint_dir=checkpoints,
    )


# --- command line ----------------------------------------------------------------------------


def add_options(
    parser: argparse.ArgumentParser, cls: type, title: str, skip: tuple[str, ...] = ()
) -> None:
    """One --option per dataclass field, default None (= keep the dataclass's or preset's)."""
    group = parser.add_argument_group(title)
    hints = get_type_hints(cls)
    for spec in dataclasses.fields(cls):
        if spec.name in skip:
            continue
        flag = "--" + spec.name.replace("_", "-")
        hint = hints[spec.name]
        kind = next((t for t in get_args(hint) if t is not type(None)), hint)  # int | None: int
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif get_origin(hint) is tuple:  # tuple[float, ...]: one or more values
            item = get_args(hint)[0]
            group.add_argument(
                flag, type=item, nargs="+", default=None, metavar=item.__name__.upper()
            )
        else:
            group.add_argument(flag, type=kind, default=None, metavar=kind.__name__.upper())


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    names = {spec.name for spec in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


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
