"""What a training run reports: train_log.jsonl (model/run_dir.py), its throughput, and the
progress bar.

Each line of the log covers the steps since the previous one: the step and lr, the mean of each
of LOSSES and of the gradient norm over those steps and all ranks, the events and tokens per
second of all ranks, and the seconds the run has trained (resumed runs count the time before).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor, nn

from model.beat import Beat
from model.distributed import Distributed
from model.run_dir import LOSSES


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


class TrainLog:
    """Sums the steps' losses and gradient norms on the device, so a step waits for no sync,
    until write() turns them into a line; rank 0 appends the lines to `path`."""

    def __init__(self, path: Path, counter: EventCounter, world: Distributed) -> None:
        self.path, self.counter, self.world = path, counter, world
        self.last: dict[str, float] = {}  # the newest line
        self.start_window()

    def start_window(self) -> None:
        self.counts_before = self.counter.read()  # [events, tokens]
        self.began = time.perf_counter()
        self.sums: Tensor | None = None  # [losses..., grad norm] float64
        self.steps = 0

    def add(self, losses: dict[str, Tensor], grad_norm: Tensor) -> None:
        values = torch.stack([*(losses[name].detach() for name in LOSSES), grad_norm]).double()
        self.sums = values if self.sums is None else self.sums + values
        self.steps += 1

    def write(self, step: int, lr: float, elapsed: float) -> dict[str, float]:
        """The window's means over steps and ranks, and its throughput over all ranks; the
        next window starts now."""
        counts = self.counter.read() - self.counts_before  # [2]
        values = self.world.all_sum(torch.cat([self.sums / self.steps, counts])).tolist()
        seconds = time.perf_counter() - self.began
        means = [value / self.world.world_size for value in values[:-2]]
        self.last = {
            "step": step,
            "lr": lr,
            **dict(zip((*LOSSES, "grad_norm"), means)),
            "steps_per_s": self.steps / seconds,
            "events_per_s": values[-2] / seconds,
            "tokens_per_s": values[-1] / seconds,
            "elapsed_s": elapsed,
        }
        self.start_window()
        if self.world.main:
            with self.path.open("a") as log:
                log.write(json.dumps(self.last) + "\n")
        return self.last


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


def rates(line: dict[str, float]) -> str:
    """A log line's throughput, for the progress bar."""
    return (
        f"{line['steps_per_s']:.2f} step/s  "
        f"{line['events_per_s']:,.0f} events/s  "
        f"{line['tokens_per_s']:,.0f} tokens/s"
    )
