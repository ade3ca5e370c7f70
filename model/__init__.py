"""BEAT, a transformer foundation model over users' behavioral event sequences.

Standalone: nothing here imports Kafka, Feast or the `stream` package.
"""

from model.beat import Beat
from model.config import BeatConfig
from model.inference import BeatEncoder, EventWindow, init_model_dir
from model.vocab import Vocabulary

__all__ = ["Beat", "BeatConfig", "BeatEncoder", "EventWindow", "Vocabulary", "init_model_dir"]
