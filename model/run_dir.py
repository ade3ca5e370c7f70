"""A training run's output directory (model/train.py writes it; evaluation and report read it).

out_dir/
    model/                     the model directory (model/model_dir.py), BeatEncoder-loadable
    pretrain_heads.safetensors the pretraining heads and PretrainConfig (see load_pretrainer)
    train_log.jsonl            one line per log_every steps (model/train_log.py): the step, lr,
                               the mean of each of LOSSES and the gradient norm, throughput
    checkpoints/step-NNNNNNNN/ trainer.pt: weights, heads, optimizer, scheduler, step, sampler
                               position, configs (model/train_checkpoints.py); written to a
                               temporary directory and renamed, the newest two kept
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.beat import Beat
from model.model_dir import check_tensors
from model.pretraining import OBJECTIVES, BeatPretrainer, PretrainConfig
from model.vocab import Vocabulary

MODEL_DIR = "model"
HEADS_FILE = "pretrain_heads.safetensors"
LOG_FILE = "train_log.jsonl"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_FILE = "trainer.pt"
LOSSES = ("loss", *OBJECTIVES)  # the losses each log line holds: the total, then each objective


def heads_of(pretrainer: BeatPretrainer) -> dict[str, torch.Tensor]:
    """The pretraining heads' tensors: the pretrainer's state without its model's."""
    return {k: v for k, v in pretrainer.state_dict().items() if not k.startswith("model.")}


def save_heads(path: Path, pretrainer: BeatPretrainer) -> None:
    config = json.dumps(dataclasses.asdict(pretrainer.config))
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in heads_of(pretrainer).items()},
        str(path),
        metadata={"pretrain_config": config},
    )


def save_model(
    out_dir: Path, pretrainer: BeatPretrainer, actions: Vocabulary, properties: Vocabulary
) -> str:
    """out_dir/model (replaced whole) and the heads; returns the model version."""
    temporary, final = out_dir / f".tmp-{MODEL_DIR}", out_dir / MODEL_DIR
    shutil.rmtree(temporary, ignore_errors=True)
    version = pretrainer.model.save_pretrained(temporary, actions, properties)
    shutil.rmtree(final, ignore_errors=True)
    temporary.rename(final)
    save_heads(out_dir / HEADS_FILE, pretrainer)
    return version


def load_pretrainer(out_dir: str | Path) -> BeatPretrainer:
    """The trained model with its pretraining heads (eval mode, CPU), from a train() out_dir."""
    out_dir = Path(out_dir)
    model = Beat.from_pretrained(out_dir / MODEL_DIR)
    with safe_open(str(out_dir / HEADS_FILE), framework="pt") as file:
        config = PretrainConfig(**json.loads(file.metadata()["pretrain_config"]))
        heads = {name: file.get_tensor(name) for name in file.keys()}
    with torch.device("meta"):  # the heads' random init would be overwritten anyway
        pretrainer = BeatPretrainer(model, config)
    check_tensors(heads, heads_of(pretrainer), str(out_dir / HEADS_FILE))
    pretrainer.load_state_dict(heads, strict=False, assign=True)
    return pretrainer.eval()
