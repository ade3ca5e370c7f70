"""Model directories: everything that defines one model version, and nothing pickled.

model.safetensors       weights (safetensors)
config.json             {"format_version": 1, "model_type": "beat", "model_version": "...",
                         "config": {...}}; model_type lets transformers' AutoConfig find
                         BEAT (see model/hf.py)
vocab_actions.json      Vocabulary of event actions
vocab_properties.json   Vocabulary of event properties
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.config import BeatConfig
from model.vocab import Vocabulary

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
ACTIONS_FILE = "vocab_actions.json"
PROPERTIES_FILE = "vocab_properties.json"
MODEL_TYPE = "beat"


@dataclass
class ModelDir:
    """The parsed contents of a model directory."""

    config: BeatConfig
    tensors: dict[str, torch.Tensor]
    actions: Vocabulary
    properties: Vocabulary
    model_version: str


def model_version_of(
    config: BeatConfig,
    tensors: Mapping[str, torch.Tensor],
    actions: Vocabulary,
    properties: Vocabulary,
) -> str:
    """A version string derived from the content: same weights, config and vocabularies, same
    version; so a re-exported model does not force a backfill, and a changed one always does."""
    digest = hashlib.sha256()
    digest.update(json.dumps(config.to_dict(), sort_keys=True).encode())
    digest.update(json.dumps([actions.tokens, properties.tokens]).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return f"beat-{config.name}-{digest.hexdigest()[:8]}"


def save_model_dir(
    directory: str | Path,
    config: BeatConfig,
    tensors: Mapping[str, torch.Tensor],
    actions: Vocabulary,
    properties: Vocabulary,
    model_version: str | None = None,
) -> str:
    """Write a model directory (created if needed, files overwritten); returns the version."""
    directory = Path(directory)
    check_vocabularies(config, actions, properties, directory)
    if model_version is None:
        model_version = model_version_of(config, tensors, actions, properties)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    save_file(weights, str(directory / WEIGHTS_FILE), metadata={"model_version": model_version})
    document = {
        "format_version": FORMAT_VERSION,
        "model_type": MODEL_TYPE,
        "model_version": model_version,
        "config": config.to_dict(),
    }
    (directory / CONFIG_FILE).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    actions.save(directory / ACTIONS_FILE)
    properties.save(directory / PROPERTIES_FILE)
    return model_version


def load_model_dir(directory: str | Path) -> ModelDir:
    """Read and validate a model directory; raises ValueError naming what is wrong."""
    directory = Path(directory)
    for name in (WEIGHTS_FILE, CONFIG_FILE, ACTIONS_FILE, PROPERTIES_FILE):
        if not (directory / name).is_file():
            raise ValueError(f"model directory {directory} has no {name}")
    document = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    if document.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{directory / CONFIG_FILE}: format_version {document.get('format_version')!r} "
            f"is not {FORMAT_VERSION}, the one this code reads"
        )
    config = BeatConfig.from_dict(document["config"])
    actions = Vocabulary.load(directory / ACTIONS_FILE)
    properties = Vocabulary.load(directory / PROPERTIES_FILE)
    check_vocabularies(config, actions, properties, directory)
    try:
        tensors = load_file(str(directory / WEIGHTS_FILE), device="cpu")
    except SafetensorError as error:
        raise ValueError(f"{directory / WEIGHTS_FILE}: {error}") from error
    return ModelDir(config, tensors, actions, properties, document["model_version"])


def check_vocabularies(
    config: BeatConfig, actions: Vocabulary, properties: Vocabulary, directory: Path
) -> None:
    # An id past the embedding table would fail deep inside the forward pass, on a GPU as an
    # opaque device assert; refuse the directory instead.
    for vocabulary, size, file in (
        (actions, config.action_vocab_size, ACTIONS_FILE),
        (properties, config.property_vocab_size, PROPERTIES_FILE),
    ):
        if len(vocabulary) > size:
            raise ValueError(
                f"{directory / file}: {len(vocabulary)} ids do not fit the model's table of {size}"
            )


def check_tensors(
    tensors: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: str
) -> None:
    """Raise ValueError naming the first missing, unexpected or wrong-shaped tensor."""
    for name, reference in expected.items():
        if name not in tensors:
            raise ValueError(f"{source}: tensor {name!r} is missing")
        if tensors[name].shape != reference.shape:
            raise ValueError(
                f"{source}: tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                f"the config implies {tuple(reference.shape)}"
            )
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise ValueError(f"{source}: unexpected tensors {unexpected}")
