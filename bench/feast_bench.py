"""What the Feast benches (feast_write.py, feast_read.py, feast_history.py) share: rows like
the encoder's, settings for a Feast project of the bench's own, and how results are saved."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from stream.config import Settings, load_settings
from stream.feast_sink import EmbeddingRows, FeatureSink


def batches(total: int, size: int, seed: int) -> list[EmbeddingRows]:
    """total users u00000000... in micro-batches of size, random 768-float embeddings."""
    rng = np.random.default_rng(seed)
    now_ms = int(time.time() * 1000)
    out = []
    for start in range(0, total, size):
        n = min(size, total - start)
        out.append(EmbeddingRows(
            user_id=[f"u{i:08d}" for i in range(start, start + n)],
            embedding=rng.standard_normal((n, 768)).astype(np.float32),
            model_version="bench",
            event_count=rng.integers(1, 257, n),
            last_event_time_ms=now_ms - rng.integers(0, 86_400_000, n),
            as_of_ms=np.full(n, now_ms + seed),
        ))
    return out


def bench_settings(store: str, name: str, **overrides: object) -> Settings:
    """A Feast project and data folder of this run's own (in /tmp), on the given store;
    overrides: other settings (the offline store...)."""
    run = uuid.uuid4().hex[:8]
    return load_settings(
        feast_project=f"bench_{name}_{run}", feast_data_dir=Path("/tmp") / f"beat_bench_{run}",
        online_store=store, **overrides,
    )


def drop_redis_rows(sink: FeatureSink) -> None:
    """Delete the Redis keys of the sink's Feast project (every user's hash)."""
    project = sink.store.config.project.encode()
    keys = list(sink.writer.client.scan_iter(match=b"*" + project))
    if keys:
        sink.writer.client.delete(*keys)


def drop_postgres_schema(settings: Settings, url: str | None = None) -> None:
    """Drop the PostgreSQL schema of the run's Feast project (its history or online rows);
    url: the server, else BEAT_POSTGRES_URL."""
    import psycopg

    url = url or settings.postgres_url.get_secret_value()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{settings.feast_project}" CASCADE')


def run_per_store(
    stores: list[str],
    run_store: Callable[[str], dict],
    print_table: Callable[[dict, list[str]], None],
    path: Path,
    **about: object,
) -> None:
    """Run the bench on each store, with the load average before and after, then print its
    table and write the results (with about: the run's arguments...)."""
    results: dict = {"load_average_before": os.getloadavg(), **about}
    for store in stores:
        results[store] = run_store(store)
    results["load_average_after"] = os.getloadavg()
    print_table(results, stores)
    save_results(results, path)


def save_results(results: dict, path: Path) -> None:
    """Print the load average the run saw (results' load_average_before/after) and write the
    results as JSON: on a shared machine the load says how far absolute rates can be trusted."""
    print(f"load average before / after: {results['load_average_before'][0]:.1f} / "
          f"{results['load_average_after'][0]:.1f} ({os.cpu_count()} cores)")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    print(f"wrote {path}")
