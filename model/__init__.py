"""BEAT, a transformer foundation model over users' behavioral event sequences.

Standalone: nothing here imports Kafka, Feast or the `stream` package. `import model.hf`
registers BEAT with transformers' Auto classes (the optional `hf` extra).

The names below are imported on first use, so that `model.config`, `model.event_window`,
`model.pretrain_config` and `model.train_config` import no torch: the stream worker and
`beat`'s command line need only those, and torch's import costs about a second per process.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from model.batch import EventBatch, EventWindow
    from model.beat import Beat
    from model.config import BeatConfig
    from model.inference import BeatEncoder, init_model_dir
    from model.pretraining import BeatPretrainer, PretrainConfig
    from model.vocab import Vocabulary

__all__ = [
    "Beat",
    "BeatConfig",
    "BeatEncoder",
    "BeatPretrainer",
    "EventBatch",
    "EventWindow",
    "PretrainConfig",
    "Vocabulary",
    "init_model_dir",
]

_MODULE = {
    "Beat": "model.beat",
    "BeatConfig": "model.config",
    "BeatEncoder": "model.inference",
    "BeatPretrainer": "model.pretraining",
    "EventBatch": "model.batch",
    "EventWindow": "model.event_window",
    "PretrainConfig": "model.pretrain_config",
    "Vocabulary": "model.vocab",
    "init_model_dir": "model.inference",
}


def __getattr__(name: str) -> Any:
    if name not in _MODULE:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(import_module(_MODULE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
