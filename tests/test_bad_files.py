"""`beat produce --file`: compressed files are read, and a file that does not fit is said in
a line naming the column and the fix (no traceback)."""

from __future__ import annotations

import bz2
import gzip
from pathlib import Path

import pyarrow as pa
import pytest

from stream.cli import main
from stream.config import Settings
from stream.event_files import read_event_file

CSV = "user_id,event_time,action\nu1,2024-01-01,login\nu2,2024-01-02T10:00:00Z,buy\n"
JSONL = (
    '{"user_id": "u1", "event_time": "2024-01-01", "action": "login"}\n'
    '{"user_id": "u2", "event_time": "2024-01-02T10:00:00Z", "action": "buy"}\n'
)


@pytest.mark.parametrize(
    "suffix, compress",
    [
        (".csv.gz", gzip.compress),
        (".csv.bz2", bz2.compress),
        (".jsonl.gz", gzip.compress),
        (".txt.gz", gzip.compress),
    ],
)
def test_compressed_files_read_like_plain_ones(tmp_path: Path, suffix: str, compress) -> None:  # noqa: ANN001
    kind = suffix.rsplit(".", 1)[0]
    text = {".csv": CSV, ".jsonl": JSONL, ".txt": CSV.replace(",", " ")}[kind]
    plain, packed = tmp_path / f"events{kind}", tmp_path / f"events{suffix}"
    plain.write_text(text)
    packed.write_bytes(compress(text.encode()))
    read = pa.Table.from_batches(list(read_event_file(packed)))
    assert read.equals(pa.Table.from_batches(list(read_event_file(plain))))
    assert read["user_id"].to_pylist() == ["u1", "u2"]


def test_compressed_parquet_is_refused_with_the_formats(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="all but Parquet also compressed"):
        read_event_file(tmp_path / "events.parquet.gz")


@pytest.mark.parametrize(
    "rows, says",
    [
        (
            "u1,2024-01-01,login\nu2,not a date,login\n",
            "can't read event_time from column 'event_time': Failed to parse string: 'not a date'",
        ),
        (
            "u1,2024-01-01,login\n,2024-01-02,login\n",
            "1 rows without user_id (column 'user_id'): every event needs one",
        ),
    ],
)
def test_a_file_that_does_not_fit_is_said_in_a_line(
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    rows: str,
    says: str,
) -> None:
    path = tmp_path / "events.csv"
    path.write_text("user_id,event_time,action\n" + rows)
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)
    assert main(["produce", "--file", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err
