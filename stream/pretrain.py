"""`beat pretrain`: from topic history to a trained BEAT model and the report that judges it.

sequences   replay beat.events (stream/replay.py), or read a `beat export` Parquet file
split       at a cutoff in event time: training sees only the events before it
train       model/train.py on the past (checkpointed; rerunning the command resumes)
evaluate    model/evaluation.py on each user's future; model/report.py writes
            report.json and the plots into the output directory
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from model.config import BeatConfig
from model.evaluation import EvalConfig, evaluate_model
from model.pretraining import OBJECTIVES, PretrainConfig
from model.report import print_summary, write_report
from model.sequences import read_sequences, split_at
from model.train import TrainConfig, train
from stream.config import Settings
from stream.replay import ReplayConfig, replay

MS_PER_DAY = 86_400_000


@dataclass
class PretrainJob:
    out_dir: Path
    beat: BeatConfig
    pretrain: PretrainConfig
    train: TrainConfig
    evaluation: EvalConfig
    sequences_file: Path | None = None  # None: replay beat.events
    start_ms: int | None = None  # replay range, log time
    end_ms: int | None = None
    cutoff_ms: int | None = None  # None: the newest event minus the churn window
    resume: bool = True


def load_sequences(settings: Settings, job: PretrainJob) -> tuple[pa.Table, dict[str, Any]]:
    began = time.monotonic()
    if job.sequences_file:
        table = read_sequences(job.sequences_file)
        source: dict[str, Any] = {"source": str(job.sequences_file)}
    else:
        table, summary = replay(settings, ReplayConfig(start_ms=job.start_ms, end_ms=job.end_ms))
        source = {"source": f"topic {settings.events_topic}", **dataclasses.asdict(summary)}
    return table, {
        **source,
        "users": table.num_rows,
        "load_seconds": round(time.monotonic() - began, 2),
    }


def default_cutoff(sequences: pa.Table, churn_days: float) -> int:
    """The newest event time minus the churn window: the latest cutoff whose churn labels
    are fully observed."""
    newest = pc.max(pc.list_flatten(sequences["event_time"])).as_py()
    if newest is None:
        raise ValueError("no events to pretrain on: the topic (or file) is empty in this range")
    return int(newest - churn_days * MS_PER_DAY)


def run_pretrain(settings: Settings, job: PretrainJob) -> dict[str, Any]:
    """Load, split, train, evaluate, report; returns the report's results."""
    sequences, loaded = load_sequences(settings, job)
    cutoff = (
        job.cutoff_ms
        if job.cutoff_ms is not None
        else default_cutoff(sequences, job.evaluation.churn_days)
    )
    past, _ = split_at(sequences, cutoff)
    result = train(past, job.out_dir, job.beat, job.pretrain, job.train, resume=job.resume)
    results = evaluate_model(job.out_dir, sequences, cutoff, job.evaluation)
    results["load"] = loaded
    results["training_run"] = {
        "preset": job.beat.name,
        "steps": result.steps,
        "wall_seconds": round(result.wall_seconds, 1),
        "events_per_s": round(result.events_per_s),
        "tokens_per_s": round(result.tokens_per_s),
        "model_version": result.model_version,
        "objective_weights": {name: getattr(job.pretrain, f"{name}_weight") for name in OBJECTIVES},
        "temporal_signals": job.beat.use_age_encoding
        or job.beat.use_gap_encoding
        or job.beat.use_periodic_encoding,
        "value_encoding": job.beat.use_value_encoding,
        "window_statistics": job.beat.use_window_statistics,
        "lifetime_statistics": job.beat.use_window_statistics and job.beat.use_lifetime_statistics,
    }
    write_report(job.out_dir, results)
    print_summary(results)
    return results
