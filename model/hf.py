"""BEAT in Hugging Face transformers' Auto classes (optional extra: pip install beatstream[hf]).

Importing this module registers model_type "beat" with AutoConfig and AutoModel, so a model
directory written by Beat.save_pretrained loads with the model card's snippet:

    import model.hf  # noqa: F401  (registers BEAT; `import model` alone stays transformers-free)
    from transformers import AutoModel

    beat = AutoModel.from_pretrained("path/to/model_dir")
    outputs = beat(action_ids, property_ids, time_gaps)
    outputs["embedding"]  # [B, 768]

Weights are read by Beat.from_pretrained (safetensors, the same shape and version checks), so
only local model directories load; nothing goes through pickle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from model.beat import Beat
from model.config import BeatConfig
from model.model_dir import MODEL_TYPE


class BeatHFConfig(PretrainedConfig):
    """config.json of a model directory: {"model_version": ..., "config": BeatConfig fields}."""

    model_type = MODEL_TYPE

    def __init__(
        self,
        config: dict[str, Any] | None = None,
        model_version: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.beat = BeatConfig.from_dict(config or {}).to_dict()
        self.model_version = model_version
        super().__init__(**kwargs)

    def beat_config(self) -> BeatConfig:
        return BeatConfig.from_dict(self.beat)


class BeatHFModel(PreTrainedModel):
    """A Beat model behind transformers' PreTrainedModel interface; forward is Beat.forward."""

    config_class = BeatHFConfig
    base_model_prefix = "beat"

    def __init__(self, config: BeatHFConfig, beat: Beat | None = None) -> None:
        super().__init__(config)
        self.beat = beat if beat is not None else Beat(config.beat_config())

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        return self.beat(*args, **kwargs)

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls, pretrained_model_name_or_path: str | Path, *args: Any, **kwargs: Any
    ) -> BeatHFModel:
        directory = Path(pretrained_model_name_or_path)
        if not directory.is_dir():
            raise ValueError(f"{directory} is not a local BEAT model directory")
        config = kwargs.get("config")
        if not isinstance(config, BeatHFConfig):
            config = BeatHFConfig.from_pretrained(directory)
        return cls(config, Beat.from_pretrained(directory)).eval()


AutoConfig.register(MODEL_TYPE, BeatHFConfig)
AutoModel.register(BeatHFConfig, BeatHFModel)
