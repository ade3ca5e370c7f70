"""Serving: turn users' raw event windows into embeddings with a loaded BEAT model."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.beat import MS_PER_DAY, Beat
from model.checkpoint import load_model_dir
from model.config import BeatConfig
from model.vocab import Vocabulary


@dataclass
class EventWindow:
    """One user's recent events as columns, oldest first.

    event_time_ms: int64 [n] unix milliseconds, ascending
    action:        str/object [n]
    property:      object [n]; None where an event has no property
    """

    event_time_ms: np.ndarray
    action: np.ndarray
    property: np.ndarray

    def __post_init__(self) -> None:
        self.event_time_ms = np.asarray(self.event_time_ms, dtype=np.int64)
        self.action = np.asarray(self.action, dtype=object)
        self.property = np.asarray(self.property, dtype=object)
        n = len(self.event_time_ms)
        if self.event_time_ms.ndim != 1 or len(self.action) != n or len(self.property) != n:
            raise ValueError(
                "EventWindow columns must be 1-d and of one length; got event_time_ms "
                f"{self.event_time_ms.shape}, action {self.action.shape}, "
                f"property {self.property.shape}"
            )

    def __len__(self) -> int:
        return len(self.event_time_ms)


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
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.model = model.to(device).eval()
        self.actions = actions
        self.properties = properties
        self.device = torch.device(device)
        self.max_batch = max_batch
        self._model_version = model_version

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, device: str | torch.device | None = None, max_batch: int = 64
    ) -> BeatEncoder:
        """Load a model directory; device defaults to CUDA when present, else CPU."""
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        saved = load_model_dir(directory)
        model = Beat.from_tensors(saved.config, saved.tensors, source=str(directory))
        return cls(model, saved.actions, saved.properties, saved.model_version, device, max_batch)

    @property
    def model_version(self) -> str:
        return self._model_version

    @property
    def embedding_size(self) -> int:
        return self.model.config.embedding_size

    def encode(self, windows: Sequence[EventWindow]) -> np.ndarray:
        """Embeddings float32 [N, embedding_size], in the order of `windows`.

        Each window is first cut to what the model reads: events within window_days of its
        newest event, then the newest max_events of those. Windows are sorted by length and
        encoded in batches of up to max_batch, each padded only to its own longest window, so
        short windows do not pay for long ones.
        """
        clipped = [self._clip(window) for window in windows]
        embeddings = np.empty((len(clipped), self.embedding_size), dtype=np.float32)
        order = np.argsort([len(window) for window in clipped], kind="stable")
        for start in range(0, len(order), self.max_batch):
            rows = order[start : start + self.max_batch]
            embeddings[rows] = self._encode_batch([clipped[i] for i in rows])
        return embeddings

    def _clip(self, window: EventWindow) -> EventWindow:
        times = window.event_time_ms
        if np.any(times[1:] < times[:-1]):
            # the stream keeps windows ordered; callers building windows by hand may not
            order = np.argsort(times, kind="stable")
            window = EventWindow(times[order], window.action[order], window.property[order])
            times = window.event_time_ms
        config = self.model.config
        if len(times) == 0:
            return window
        oldest_kept = times[-1] - config.window_days * MS_PER_DAY
        first_in_window = int(np.searchsorted(times, oldest_kept, side="left"))
        start = max(first_in_window, len(times) - config.max_events)
        return EventWindow(times[start:], window.action[start:], window.property[start:])

    @torch.inference_mode()
    def _encode_batch(self, windows: list[EventWindow]) -> np.ndarray:
        lengths = np.array([len(window) for window in windows])
        # Pad to at least one slot: an empty window is all padding, and the model still reads
        # its summary token.
        width = max(int(lengths.max()), 1)
        real = np.arange(width) < lengths[:, None]  # [b, width] bool, right-padded
        times = np.zeros((len(windows), width), dtype=np.int64)
        actions = np.zeros((len(windows), width), dtype=np.int64)
        properties = np.zeros((len(windows), width), dtype=np.int64)
        ages = np.zeros((len(windows), width), dtype=np.float64)

        # Boolean-mask assignment fills row by row, matching the order of the concatenation.
        flat_times = np.concatenate([window.event_time_ms for window in windows])
        times[real] = flat_times
        newest = np.repeat([w.event_time_ms[-1] if len(w) else 0 for w in windows], lengths)
        ages[real] = (newest - flat_times) / MS_PER_DAY
        actions[real] = self.actions.lookup(np.concatenate([w.action for w in windows]))
        properties[real] = self.properties.lookup(np.concatenate([w.property for w in windows]))

        def tensor(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(array).to(self.device, non_blocking=True)

        output = self.model(
            action_ids=tensor(actions),
            property_ids=tensor(properties),
            time_gaps=tensor(ages),
            padding_mask=tensor(real),
            event_times=tensor(times),
        )
        return output["embedding"].float().cpu().numpy()


def init_model_dir(
    directory: str | Path,
    preset: str,
    actions: Iterable[str],
    properties: Iterable[str],
    seed: int = 0,
) -> str:
    """Write a randomly initialised model directory (a stand-in until pretraining exists).

    actions / properties: the values to build vocabularies from (most frequent first, cut to the
    preset's table sizes). Returns the model version.
    """
    config = BeatConfig.preset(preset)
    action_vocab = Vocabulary.build(actions, config.action_vocab_size)
    property_vocab = Vocabulary.build(properties, config.property_vocab_size)
    with torch.random.fork_rng(devices=[]):  # a seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        model = Beat(config)
    return model.save_pretrained(directory, action_vocab, property_vocab)
