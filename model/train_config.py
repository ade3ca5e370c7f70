"""The training loop's settings (TrainConfig, model/train.py runs them) and the command-line
options made from such dataclasses; no torch, so that `beat`'s command line is built without it."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any, get_args, get_origin, get_type_hints

from model.config import BeatConfig
from model.vocab import SPECIAL_TOKENS


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
