"""The pretraining report: model.evaluation's results as report.json, PNGs and a console table.

out_dir/
    report.json     every metric with its 95 % interval, the data summary, the training
                    summary (from train_log.jsonl when the model came from model.train)
    segments.csv    user_id, x, y (PCA map), segment
    segments.png    the map coloured by segment, each segment's activity beside it
    loss.png        loss per objective per logged step (when there is a training log)

python -m model.report --model OUT_DIR --sequences FILE.parquet --cutoff 2024-04-01 --out DIR
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.csv as pa_csv  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from model.evaluation import EvalConfig, evaluate_model  # noqa: E402
from model.run_dir import LOSSES  # noqa: E402
from model.sequences import read_sequences  # noqa: E402


def read_train_log(path: str | Path) -> dict[str, np.ndarray]:
    """train_log.jsonl as columns: "step" and each objective of model.run_dir.LOSSES [lines]."""
    lines = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    names = ["step", *(name for name in LOSSES if lines and name in lines[0])]
    return {name: np.array([line[name] for line in lines], dtype=float) for name in names}


def training_summary(path: str | Path) -> dict[str, Any]:
    """Steps logged and, per objective, the first logged value and the mean of the last
    tenth of the log (one line is a mean over log_every steps already)."""
    log = read_train_log(path)
    tail = max(1, len(log["step"]) // 10)
    return {
        "log": str(path),
        "steps": int(log["step"][-1]) if len(log["step"]) else 0,
        "losses": {
            name: {"first": float(values[0]), "last": float(values[-tail:].mean())}
            for name, values in log.items()
            if name != "step" and len(values)
        },
    }


def plot_losses(log: dict[str, np.ndarray], path: Path) -> None:
    objectives = [name for name in log if name != "step"]
    fig, axes = plt.subplots(
        1, len(objectives), figsize=(3.6 * len(objectives), 3.2), squeeze=False
    )
    for ax, name in zip(axes[0], objectives):
        ax.plot(log["step"], log[name], lw=1.2)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("loss (mean per log line)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def segment_lines(segment: dict[str, Any]) -> str:
    """Two lines of text: who is in the segment and what they do."""
    actions = ", ".join(f"{a['action']} {a['share']:.0%}" for a in segment["top_actions"])
    return (
        f"S{segment['segment']}  {segment['users']} users ({segment['share']:.0%})\n"
        f"    {actions}\n"
        f"    {segment['events_per_user']:.0f} events/user, "
        f"{segment['events_per_active_day']:.1f} per active day"
    )


def plot_segments(segments: dict[str, Any], path: Path) -> None:
    """The PCA map coloured by segment, and a text panel describing each segment."""
    points = segments["map"]
    segment = np.array(points["segment"])
    colours = plt.get_cmap("tab10")
    fig, (ax, text) = plt.subplots(1, 2, figsize=(13, 6), gridspec_kw={"width_ratios": [1.2, 1]})
    for row in segments["segments"]:
        s = row["segment"]
        ax.scatter(
            np.array(points["x"])[segment == s],
            np.array(points["y"])[segment == s],
            s=6,
            alpha=0.6,
            color=colours(s % 10),
            label=f"S{s}",
        )
    ax.set_title(f"users' BEAT embeddings, PCA; k-means k={segments['k']}")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(markerscale=3, fontsize=8)
    text.axis("off")
    for i, row in enumerate(segments["segments"]):
        text.text(
            0.0,
            1 - i / len(segments["segments"]),
            segment_lines(row),
            va="top",
            family="monospace",
            fontsize=9,
            color=colours(row["segment"] % 10),
            transform=text.transAxes,
        )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out_dir: str | Path, results: dict[str, Any]) -> dict[str, Path]:
    """Write report.json, segments.csv and the PNGs; returns their paths by name."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    segments = results["segments"]
    document = {**results, "segments": {k: v for k, v in segments.items() if k != "map"}}
    if results.get("train_log"):
        document["training"] = training_summary(results["train_log"])
    paths = {name: out_dir / name for name in ("report.json", "segments.csv", "segments.png")}
    paths["report.json"].write_text(json.dumps(document, indent=2) + "\n")
    pa_csv.write_csv(pa.table(segments["map"]), paths["segments.csv"])
    plot_segments(segments, paths["segments.png"])
    if results.get("train_log"):
        paths["loss.png"] = out_dir / "loss.png"
        plot_losses(read_train_log(results["train_log"]), paths["loss.png"])
    return paths


def _estimate(metric: dict[str, Any]) -> tuple[str, str]:
    low, high = metric["ci95"]
    return f"{metric['value']:.3f}", f"[{low:.3f}, {high:.3f}]"


def summary_table(results: dict[str, Any]) -> Table:
    """Every metric with its interval, one row each."""
    data = results["data"]
    table = Table(
        title=f"{results['model_version']}: cutoff {data['cutoff']}, {data['users']:,} users, "
        f"{data['events']:,} events, churn rate {data['churn_rate']:.1%}"
    )
    for column in ("task", "metric", "method", "value", "95 % CI"):
        table.add_column(column, justify="right" if column in ("value", "95 % CI") else "left")
    masked = results["masked"]
    if "skipped" in masked:
        table.add_row("masked", "accuracy", "beat", "-", masked["skipped"])
    for field in ("action", "property"):
        for method, metric in masked.get(field, {}).items():
            table.add_row("masked", f"{field} accuracy", method, *_estimate(metric))
    for field in ("action", "property"):
        methods = dict(results["next_event"][field])
        probes = methods.pop("probes")
        methods |= {f"probe of {name}": probes[name] for name in ("beat", "untrained")}
        for method, rates in methods.items():
            for name, metric in rates.items():
                table.add_row("next event", f"{field} {name}", method, *_estimate(metric))
    churn, propensity = results["churn"], results["propensity"]
    tasks = [(f"churn {churn['churn_days']:g} d", churn)]
    if "auc" in propensity:
        tasks.append((f"{propensity['action']} in {propensity['days']:g} d", propensity))
    else:
        table.add_row("propensity", "AUC", "-", "-", propensity["skipped"])
    for task, scores in tasks:
        for method, metric in scores["auc"].items():
            table.add_row(task, "AUC", method, *_estimate(metric))
        for key, label in (
            ("beat_minus_best_handmade", "beat"),
            ("beat_rfm_minus_best_handmade", "beat + rfm"),
            ("beat_minus_untrained", "beat"),
        ):
            difference = scores[key]
            table.add_row(
                task, "AUC difference", f"{label} - {difference['versus']}", *_estimate(difference)
            )
    return table


def print_summary(results: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    console.print(summary_table(results))
    for row in results["segments"]["segments"]:
        console.print(segment_lines(row))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m model.report",
        description="Evaluate a BEAT model on the future after a cutoff and write the report.",
    )
    parser.add_argument(
        "--model",
        type=Path,
        required=True,
        help="a model.train output directory (or a plain model directory: no heads)",
    )
    parser.add_argument("--sequences", type=Path, required=True, help="Parquet from beat export")
    parser.add_argument("--cutoff", required=True, help="ISO date or time (UTC when no zone)")
    parser.add_argument("--out", type=Path, required=True, help="report directory")
    parser.add_argument("--segments", type=int, default=EvalConfig.segments)
    parser.add_argument("--churn-days", type=float, default=EvalConfig.churn_days)
    parser.add_argument("--seed", type=int, default=EvalConfig.seed)
    args = parser.parse_args(argv)
    cutoff = datetime.fromisoformat(args.cutoff)
    cutoff = cutoff if cutoff.tzinfo else cutoff.replace(tzinfo=UTC)
    config = EvalConfig(segments=args.segments, churn_days=args.churn_days, seed=args.seed)
    try:
        results = evaluate_model(
            args.model, read_sequences(args.sequences), int(cutoff.timestamp() * 1000), config
        )
    except ValueError as error:
        parser.error(str(error))
    paths = write_report(args.out, results)
    print_summary(results)
    print("wrote " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
