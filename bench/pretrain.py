"""The pretraining evaluation of the README: two data sets, the full BEAT and two ablations.

    OMP_NUM_THREADS=1 .venv/bin/python bench/pretrain.py [--preset tiny] [--steps 1500]

For each data set, on an embedded Tansu broker:
  1. load the events into beat.events with `beat produce` (synthetic: --synthetic
     --history-days; CDNOW: --dataset cdnow, the purchase log inside the lifetimes package);
  2. `beat pretrain` the full model from the topic (the replay is timed);
  3. `beat export` the same history once, and `beat pretrain --sequences` the ablations from
     it: without the contrastive loss, and without the temporal signals.
Prints the churn, next-event and masked-event tables and writes bench/results/pretrain.json.
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
    # 1,000 synthetic users over 150 days; churners fade inside the history.
    "synthetic": {"produce": ["--synthetic", "--users", "1000", "--history-days", "150"], "pretrain": []},
    # CDNOW: 23,570 customers, 1997-01 to 1998-06, 3 purchases each on average: cut after
    # 39 weeks (the usual calibration period) and let 2 + 2 + 1 purchases make a training pair.
    "cdnow": {"produce": ["--dataset", "cdnow"],
              "pretrain": ["--cutoff", "1997-10-01", "--min-view-events", "2"]},
}
VARIANTS = {"full": [], "no_contrastive": ["--no-contrastive"], "no_temporal": ["--no-temporal"]}


def beat(env: dict[str, str], *args: str) -> float:
    """Run a `beat` command; returns its wall time."""
    began = time.monotonic()
    subprocess.run([sys.executable, "-m", "stream.cli", *args], env=env, check=True, cwd=REPO)
    return time.monotonic() - began


def run_dataset(name: str, spec: dict, env: dict[str, str], train_args: list[str], variants: list[str],
                results: Path) -> dict:
    out = results / name
    produce_s = beat(env, "produce", *spec["produce"])
    sequences = out / "sequences.parquet"
    out.mkdir(parents=True, exist_ok=True)
    export_s = beat(env, "export", "--out", str(sequences))
    runs = {}
    for variant in variants:
        flags = VARIANTS[variant]
        source = [] if variant == "full" else ["--sequences", str(sequences)]
        wall = beat(env, "pretrain", "--out", str(out / variant), "--no-resume", *source, *spec["pretrain"],
                    *flags, *train_args)
        report = json.loads((out / variant / "report.json").read_text())
        runs[variant] = {"wall_seconds": round(wall, 1), "report": report}
    return {"produce_seconds": round(produce_s, 1), "export_seconds": round(export_s, 1), "runs": runs}


def churn_table(name: str, result: dict) -> str:
    lines = [f"\n{name}: churn AUC on the held-out half of the users (95 % bootstrap CI)\n",
             "| variant | BEAT + logistic | RFM + logistic | RFM + boosting | BEAT + RFM | BEAT - best hand-made |",
             "|---|---|---|---|---|---|"]
    for variant, run in result["runs"].items():
        auc = run["report"]["churn"]["auc"]
        diff = run["report"]["churn"]["beat_minus_best_handmade"]

        def cell(m: dict) -> str:
            return f"{m['value']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]"

        lines.append(f"| {variant} | {cell(auc['beat_logistic'])} | {cell(auc['rfm_logistic'])} | "
                     f"{cell(auc['rfm_boosting'])} | {cell(auc['beat_rfm_logistic'])} | {cell(diff)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results folder (default {RESULTS})")
    args = parser.parse_args()
    train_args = ["--preset", args.preset, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                  "--warmup-steps", str(max(1, args.steps // 20)), "--checkpoint-every", str(max(1, args.steps // 4))]
    results = {"preset": args.preset, "steps": args.steps, "batch_size": args.batch_size, "datasets": {}}
    for name in args.datasets:
        with EmbeddedBroker() as broker:
            settings = load_settings(bootstrap_servers=broker.bootstrap_servers,
                                     group_prefix=f"pretrain-{uuid.uuid4().hex[:6]}", data_dir=args.out / "data")
            ensure_topics(settings)
            env = {**os.environ, **settings.to_env()}
            results["datasets"][name] = run_dataset(name, DATASETS[name], env, train_args, args.variants, args.out)
        (args.out / "pretrain.json").write_text(json.dumps(results, indent=1, default=str))
        print(churn_table(name, results["datasets"][name]))
    print(f"\nwrote {args.out / 'pretrain.json'}")


if __name__ == "__main__":
    main()
