"""Serving: turn users' raw event windows into embeddings with a loaded BEAT model."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from model.batch import EventBatch, EventWindow
from model.beat import MS_PER_DAY, Beat
from model.config import BeatConfig
from model.model_dir import load_model_dir
from model.vocab import Vocabulary

Item = TypeVar("Item")
Staged = TypeVar("Staged")


def length_batches(lengths: np.ndarray, max_batch: int, bucket_width: int) -> list[np.ndarray]:
    """Row indices of each batch: windows sorted by length, grouped by length bucket
    (ceil(length / bucket_width)), at most max_batch per batch.

    A batch is padded to its longest window, so a batch never pads a row by bucket_width or
    more: compute goes to real events, and short windows never wait for long ones.
    """
    order = np.argsort(lengths, kind="stable")  # [N]
    bucket = -(-lengths[order] // bucket_width)  # [N], ascending
    batches = []
    for same in np.split(order, np.flatnonzero(np.diff(bucket)) + 1):
        batches += [same[i : i + max_batch] for i in range(0, len(same), max_batch)]
    return batches


def staged_ahead(items: Sequence[Item], stage: Callable[[Item], Staged]) -> Iterator[Staged]:
    """stage(item) of each item in order, the next one staged in a background thread while
    the caller works on the current one: a batch is tokenized and padded (numpy, holding the
    GIL) while the previous one runs through the model (torch's kernels release the GIL)."""
    if len(items) < 2:
        yield from map(stage, items)
        return
    with ThreadPoolExecutor(1, thread_name_prefix="beat-stage") as pool:
        ahead = pool.submit(stage, items[0])
        for item in items[1:]:
            current = ahead.result()
            ahead = pool.submit(stage, item)
            yield current
        yield ahead.result()


class BeatEncoder:
    """A BEAT model and its vocabularies, ready to encode windows (no gradients, eval mode)."""

    def __init__(
        self,
        model: Beat,
        actions: Vocabulary,
        properties: Vocabulary,
        model_version: str,
        device: str | torch.device = "cpu",
        max_batch: int = 64,
        compile: bool = False,
        bucket_width: int = 16,
    ) -> None:
        if max_batch < 1 or bucket_width < 1:
            raise ValueError(
                f"max_batch and bucket_width must be at least 1, got {max_batch}, {bucket_width}"
            )
        self.model = model.to(device).eval()
        self.actions = actions
        self.properties = properties
        self.device = torch.device(device)
        self.max_batch = max_batch
        self.bucket_width = bucket_width
        self._model_version = model_version
        # dynamic=True: batches come in every width up to max_events, compile once for all.
        self._forward = torch.compile(self.model, dynamic=True) if compile else self.model

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        device: str | torch.device | None = None,
        max_batch: int = 64,
        compile: bool = False,
    ) -> BeatEncoder:
        """Load a model directory; device defaults to CUDA when present, else CPU."""
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        saved = load_model_dir(directory)
        model = Beat.from_tensors(saved.config, saved.tensors, source=str(directory))
        return cls(
            model, saved.actions, saved.properties, saved.model_version, device, max_batch, compile
        )

    @property
    def model_version(self) -> str:
        return self._model_version

    @property
    def embedding_size(self) -> int:
        return self.model.config.embedding_size

    def encode(
        self, windows: Sequence[EventWindow], as_of_ms: int | Sequence[int] | None = None
    ) -> np.ndarray:
        """Embeddings float32 [N, embedding_size], in the order of `windows`.

        as_of_ms: the moment the embeddings describe (unix ms, one for all windows or one per
        window; serving passes "now"): the model then sees how long each user has been silent.
        None: as of each window's newest event. Each window is first cut to what the model
        reads: events within window_days of its newest event, then the newest max_events of
        those; the events cut off count in the user's earlier history (lifetime statistics), so
        a whole history and the stream's window of it give the same embedding. Windows are then
        encoded in length-aware batches (see length_batches), each padded
        only to its own longest window. On a GPU each batch is staged (tokenized, padded, in
        pinned memory) in a background thread while the previous one runs, and copied to the
        GPU without blocking the host.
        """
        clipped = [self._clip(window) for window in windows]
        as_of = None  # [N] unix ms, or each window's newest event
        if as_of_ms is not None:
            as_of = np.broadcast_to(np.asarray(as_of_ms, np.int64), len(windows))
        embeddings = np.empty((len(clipped), self.embedding_size), dtype=np.float32)
        lengths = np.array([len(window) for window in clipped], dtype=np.int64)
        batches = length_batches(lengths, self.max_batch, self.bucket_width)
        on_gpu = self.device.type == "cuda"

        def stage(rows: np.ndarray) -> EventBatch:
            batch = EventBatch.from_windows(
                [clipped[i] for i in rows],
                self.actions,
                self.properties,
                None if as_of is None else as_of[rows],
            )
            return batch.pin_memory() if on_gpu else batch

        # On a GPU the host stages the next batch while the GPU runs this one. On CPU both
        # would share the same cores: staging ahead there measured 5-15 % slower (one torch
        # thread, 2 shared cores: the threads contend for the GIL and the cores), so not.
        staged = staged_ahead(batches, stage) if on_gpu else map(stage, batches)
        # Results stay on the device until all are queued: one copy back, and no wait on the
        # GPU between batches (a per-batch .cpu() would make the host wait for each).
        done = [self.embed(batch) for batch in staged]
        if done:
            embeddings[np.concatenate(batches)] = torch.cat(done).cpu().numpy()
        return embeddings

    def _clip(self, window: EventWindow) -> EventWindow:
        times = window.event_time_ms
        if window.event_id_hash is not None:
            # The stream's order, (event_time, event-id hash), whatever the caller's order of
            # ties: the same events give the same embedding offline and online.
            order = np.lexsort((window.event_id_hash, times))
        elif np.any(times[1:] < times[:-1]):
            # the stream keeps windows ordered; callers building windows by hand may not
            order = np.argsort(times, kind="stable")
        else:
            order = None
        if order is not None:
            window = window.take(order)
            times = window.event_time_ms
        config = self.model.config
        if len(times) == 0:
            return window
        oldest_kept = times[-1] - config.window_days * MS_PER_DAY
        first_in_window = int(np.searchsorted(times, oldest_kept, side="left"))
        start = max(first_in_window, len(times) - config.max_events)
        return window.since(start)  # what is cut off joins the user's earlier history

    @torch.inference_mode()
    def embed(self, batch: EventBatch) -> torch.Tensor:
        """Embeddings float32 [B, embedding_size], on the encoder's device, of a padded batch."""
        batch = batch.to(self.device)
        # bf16 matmuls and flash attention on CUDA; on CPU, float32 (bf16 there is slower).
        with torch.autocast("cuda", torch.bfloat16, enabled=self.device.type == "cuda"):
            return self._forward(**batch.inputs())["embedding"].float()


def init_model_dir(
    directory: str | Path,
    preset: str,
    actions: Vocabulary | Iterable[str],
    properties: Vocabulary | Iterable[str | None],
    seed: int = 0,
) -> str:
    """Write a randomly initialised model directory (the untrained floor, or a start).

    actions / properties: the vocabularies, or the values to build them from (most frequent
    first, cut to the preset's table sizes). Returns the model version.
    """
    config = BeatConfig.preset(preset)

    def vocabulary(values: Vocabulary | Iterable[str | None], size: int) -> Vocabulary:
        return values if isinstance(values, Vocabulary) else Vocabulary.build(values, size)

    action_vocab = vocabulary(actions, config.action_vocab_size)
    property_vocab = vocabulary(properties, config.property_vocab_size)
    with torch.random.fork_rng(devices=[]):  # a seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        model = Beat(config)
    return model.save_pretrained(directory, action_vocab, property_vocab)
