"""Training checkpoints: what a run saves so that, killed and restarted with the same command,
it ends with exactly the weights of an uninterrupted run (model/train.py says why the step
number is all the sampler and the random draws need).

out_dir/checkpoints/step-NNNNNNNN/trainer.pt (model/run_dir.py). Not to be confused with
model/model_dir.py, the model directory a finished run serves from.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from model.config import BeatConfig
from model.pretraining import BeatPretrainer, PretrainConfig
from model.run_dir import CHECKPOINT_FILE

if TYPE_CHECKING:  # model.train imports this module
    from model.train import TrainConfig

KEEP_CHECKPOINTS = 2
# Settings a resumed run may change: they do not alter what the steps compute.
RESUMABLE_CHANGES = {"checkpoint_every", "log_every", "device"}


@dataclass
class TrainState:
    """What a checkpoint saves and restores, and what a resume must match."""

    pretrainer: BeatPretrainer
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    settings: dict[str, Any]  # run_settings()
    fingerprint: str  # TrainingData.fingerprint()

    @property
    def batch_size(self) -> int:
        return self.settings["train"]["batch_size"]


def run_settings(beat: BeatConfig, pretrain: PretrainConfig, train: TrainConfig) -> dict[str, Any]:
    return {
        "beat": beat.to_dict(),
        "pretrain": dataclasses.asdict(pretrain),
        "train": dataclasses.asdict(train),
    }


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint (temporary directories of an interrupted write are not
    named step-*, so they never count)."""
    done = sorted(p for p in checkpoints.glob("step-*") if (p / CHECKPOINT_FILE).is_file())
    return done[-1] if done else None


def remove_temporaries(checkpoints: Path) -> None:
    """Drop what a run killed while writing a checkpoint left behind."""
    for stale in checkpoints.glob(".tmp-*"):
        shutil.rmtree(stale)


def save_checkpoint(checkpoints: Path, step: int, elapsed: float, state: TrainState) -> Path:
    """Write to a temporary directory, rename it into place, then drop all but the newest
    KEEP_CHECKPOINTS: a kill at any moment leaves the previous checkpoint intact."""
    name = f"step-{step:08d}"
    temporary = checkpoints / f".tmp-{name}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    with open(temporary / CHECKPOINT_FILE, "wb") as file:
        torch.save(
            {
                "step": step,
                "sampler_position": step * state.batch_size,
                "elapsed_s": elapsed,
                "pretrainer": state.pretrainer.state_dict(),
                "optimizer": state.optimizer.state_dict(),
                "scheduler": state.scheduler.state_dict(),
                "settings": state.settings,
                "data": state.fingerprint,
            },
            file,
        )
        file.flush()
        os.fsync(file.fileno())
    final = checkpoints / name
    temporary.rename(final)
    for old in sorted(checkpoints.glob("step-*"))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old)
    return final


def restore(latest: Path, state: TrainState, device: torch.device) -> tuple[int, float]:
    """Load a checkpoint written by the same settings and data into `state`; returns
    (step, elapsed_s)."""
    saved = torch.load(latest / CHECKPOINT_FILE, map_location=device, weights_only=True)
    check_resumable(saved["settings"], state.settings, latest)
    if saved["data"] != state.fingerprint:
        raise ValueError(
            f"{latest} was trained on other sequences; pass the same data to "
            f"resume, or start over with resume=False (--no-resume)"
        )
    if saved["sampler_position"] != saved["step"] * state.batch_size:
        raise ValueError(
            f"{latest}: sampler position {saved['sampler_position']} is not "
            f"step {saved['step']} x batch_size {state.batch_size}"
        )
    state.pretrainer.load_state_dict(saved["pretrainer"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    return saved["step"], saved["elapsed_s"]


def check_resumable(saved: dict[str, Any], current: dict[str, Any], source: Path) -> None:
    for part in ("beat", "pretrain", "train"):
        for key in sorted(set(saved[part]) | set(current[part])):
            old, new = saved[part].get(key), current[part].get(key)
            if old != new and key not in RESUMABLE_CHANGES:
                raise ValueError(
                    f"{source} was written with {part}.{key}={old!r}, this run has {new!r}: "
                    f"resume with the same settings, or start over with resume=False (--no-resume)"
                )
