"""The pretraining evaluation of the README: two data sets, the full BEAT and its ablations.

    OMP_NUM_THREADS=1 .venv/bin/python bench/pretrain.py [--preset small] [--steps 600]
        [--variants full no_future ...] [--datasets synthetic cdnow]

For each data set, on an embedded Tansu broker:
  1. load the events into beat.events with `beat produce` (synthetic: 20,000 users over 150
     days, --synthetic --history-days; CDNOW: --dataset cdnow, the purchase log inside the
     lifetimes package);
  2. `beat pretrain` the full model from the topic (the replay is timed);
  3. `beat export` the same history once, and `beat pretrain --sequences` the ablations from
     it (VARIANTS: each switches one objective or input off).
Every report carries its own floor (an untrained network's embeddings under the same probes)
and the hand-made baselines. Prints the churn, propensity and next-event tables and writes
bench/results/pretrain/pretrain.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from stream.broker import EmbeddedBroker, ensure_topics  # noqa: E402
from stream.config import load_settings  # noqa: E402

RESULTS = REPO / "bench" / "results" / "pretrain"
DATASETS = {
    # Synthetic users (--synthetic-users, default 20,000: about 29M events) over 150 days;
    # churners fade inside the history.
    "synthetic": {
        "produce": ["--synthetic", "--history-days", "150"],
        "pretrain": [],
    },
    # CDNOW: 23,570 customers, 1997-01 to 1998-06, 3 purchases each on average: cut after
    # 39 weeks (the usual calibration period) and let 2 + 2 purchases make a training pair.
    "cdnow": {
        "produce": ["--dataset", "cdnow"],
        "pretrain": ["--cutoff", "1997-10-01", "--min-view-events", "2"],
    },
}
VARIANTS = {
    "full": [],
    "no_future": ["--future-weight", "0"],
    "no_gap": ["--gap-weight", "0"],
    "no_contrastive": ["--no-contrastive"],
    "no_value": ["--no-use-value-encoding"],
    "no_statistics": ["--no-use-window-statistics"],
    "no_lifetime": ["--no-use-lifetime-statistics"],
    "no_temporal": ["--no-temporal"],
}


def beat(env: dict[str, str], *args: str) -> float:
    """Run a `beat` command; returns its wall time."""
    began = time.monotonic()
    subprocess.run([sys.executable, "-m", "stream.cli", *args], env=env, check=True, cwd=REPO)
    return time.monotonic() - began


def run_dataset(
    name: str,
    spec: dict,
    env: dict[str, str],
    train_args: list[str],
    variants: list[str],
    results: Path,
) -> dict:
    out = results / name
    produce_s = beat(env, "produce", *spec["produce"])
    sequences = out / "sequences.parquet"
    out.mkdir(parents=True, exist_ok=True)
    export_s = beat(env, "export", "--out", str(sequences))
    runs = {}
    for variant in variants:
        flags = VARIANTS[variant]
        source = [] if variant == "full" else ["--sequences", str(sequences)]
        wall = beat(
            env,
            "pretrain",
            "--out",
            str(out / variant),
            "--no-resume",
            *source,
            *spec["pretrain"],
            *flags,
            *train_args,
        )
        report = json.loads((out / variant / "report.json").read_text())
        runs[variant] = {"wall_seconds": round(wall, 1), "report": report}
    return {
        "produce_seconds": round(produce_s, 1),
        "export_seconds": round(export_s, 1),
        "runs": runs,
    }


def cell(metric: dict) -> str:
    return f"{metric['value']:.3f} [{metric['ci95'][0]:.3f}, {metric['ci95'][1]:.3f}]"


def task_table(name: str, result: dict, task: str) -> str:
    """AUC of each model on a yes/no task (churn, propensity), and the paired differences."""
    lines = [
        f"\n{name}: {task} AUC on the held-out half of the users (95 % bootstrap CI)\n",
        "| variant | BEAT | untrained | RFM logistic | RFM boosting | BEAT + RFM "
        "| BEAT - best hand-made | BEAT + RFM - best hand-made | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, run in result["runs"].items():
        scores = run["report"][task]
        if "auc" not in scores:
            lines.append(f"| {variant} | {scores.get('skipped', 'skipped')} |")
            continue
        auc = scores["auc"]
        columns = [
            auc[m]
            for m in (
                "beat_logistic",
                "untrained_logistic",
                "rfm_logistic",
                "rfm_boosting",
                "beat_rfm_logistic",
            )
        ]
        columns += [scores["beat_minus_best_handmade"], scores["beat_rfm_minus_best_handmade"]]
        seconds = run["report"]["training_run"]["wall_seconds"]
        lines.append(f"| {variant} | " + " | ".join(cell(c) for c in columns) + f" | {seconds} |")
    return "\n".join(lines)


def next_event_table(name: str, result: dict) -> str:
    """HitRate@1 of the first event after the cutoff: BEAT's next head, the baselines, and the
    linear probes of BEAT's and the untrained network's embeddings (on a sample of users)."""
    lines = [
        f"\n{name}: next event HitRate@1\n",
        "| variant | field | BEAT | Markov | most popular | probe of BEAT | probe of untrained |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant, run in result["runs"].items():
        for field, rates in run["report"]["next_event"].items():
            if field not in ("action", "property"):
                continue
            values = [rates.get(m, {}).get("hit@1") for m in ("beat", "markov", "popular")]
            values += [rates["probes"][m]["hit@1"] for m in ("beat", "untrained")]
            lines.append(
                f"| {variant} | {field} | "
                + " | ".join("–" if v is None else f"{v['value']:.3f}" for v in values)
                + " |"
            )
    return "\n".join(lines)


def tables(name: str, result: dict) -> str:
    return "\n".join(
        [
            task_table(name, result, "churn"),
            task_table(name, result, "propensity"),
            next_event_table(name, result),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--synthetic-users", type=int, default=20_000)
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["full"],
        choices=list(VARIANTS),
        help="full, and ablations each switching one objective or input off",
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help=f"results folder (default {RESULTS})"
    )
    args = parser.parse_args()
    train_args = [
        "--preset",
        args.preset,
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--warmup-steps",
        str(max(1, args.steps // 20)),
        "--checkpoint-every",
        str(max(1, args.steps // 4)),
    ]
    results = {
        "preset": args.preset,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "synthetic_users": args.synthetic_users,
        "datasets": {},
    }
    datasets = {**DATASETS}
    synthetic = datasets["synthetic"]
    datasets["synthetic"] = {
        **synthetic,
        "produce": [*synthetic["produce"], "--users", str(args.synthetic_users)],
    }
    for name in args.datasets:
        with EmbeddedBroker() as broker:
            settings = load_settings(
                bootstrap_servers=broker.bootstrap_servers,
                group_prefix=f"pretrain-{uuid.uuid4().hex[:6]}",
                data_dir=args.out / "data",
            )
            ensure_topics(settings)
            env = {**os.environ, **settings.to_env()}
            results["datasets"][name] = run_dataset(
                name, datasets[name], env, train_args, args.variants, args.out
            )
        (args.out / "pretrain.json").write_text(json.dumps(results, indent=1, default=str))
        print(tables(name, results["datasets"][name]))
    print(f"\nwrote {args.out / 'pretrain.json'}")


if __name__ == "__main__":
    main()
