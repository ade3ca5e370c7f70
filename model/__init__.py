"""BEAT, a transformer foundation model over users' behavioral event sequences.

Standalone: nothing here imports Kafka, Feast or the `stream` package. `import model.hf`
registers BEAT with transformers' Auto classes (the optional `hf` extra).
"""

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
