"""Reading users' own event files (CSV, Parquet, JSON lines, whitespace-separated text) and
the public event logs that ship in installed packages (CDNOW), as Arrow batches in the
EVENT_SCHEMA layout (stream/event_contract.py), vectorized.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from stream.event_contract import (
    EVENT_SCHEMA,
    REQUIRED_FIELDS,
    U64,
    hash_strings,
    hex_ids,
    mix64,
    string_map,
)

_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "json",
            ".ndjson": "json", ".txt": "text"}  # fmt: skip
# Compressions both readers (Arrow's CSV and JSON, pandas' text) recognise by extension.
_COMPRESSIONS = (".gz", ".bz2", ".zst")

# Public event logs that ship in installed packages: name -> (package, file inside it).
DATASETS = {"cdnow": ("lifetimes", "datasets/CDNOW_master.txt")}
# CDNOW's purchase log (lifetimes): one row per customer and purchase day.
_CDNOW_COLUMNS = ["customer_id", "date", "number_of_cds", "dollar_value"]
_CD_BUCKETS = pa.array(["cds_1", "cds_2", "cds_3-4", "cds_5+"])
_CD_BUCKET_STARTS = np.array([2, 3, 5])  # number_of_cds where the next bucket starts


def dataset_path(name: str) -> Path:
    """Where an installed package keeps a dataset of DATASETS."""
    import importlib.resources

    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: known ones are {', '.join(DATASETS)}")
    package, file = DATASETS[name]
    try:
        return Path(str(importlib.resources.files(package) / file))
    except ModuleNotFoundError:
        raise ValueError(
            f"dataset {name!r} ships in the {package} package, part of the training extra: "
            "pip install 'beatstream[train]'"
        ) from None


def read_event_file(
    path: str | Path, columns: Mapping[str, str] | None = None, batch_size: int = 50_000
) -> Iterator[pa.RecordBatch]:
    """Batches in EVENT_SCHEMA layout from a CSV, Parquet, JSON-lines or whitespace-separated
    text file (``.txt``, a header line first) of events.

    ``columns`` maps our field names to the file's column names ({"user_id": "customer"});
    a field without an entry is looked up under its own name. event_time may be ISO strings
    (a zone offset is honoured, none means UTC), dates, timestamps, or epoch seconds or
    milliseconds (numbers above 1e11 are milliseconds), or in text files YYYYMMDD dates. A
    text file with CDNOW's columns (customer_id date number_of_cds dollar_value, as in
    ``dataset_path("cdnow")``) becomes purchases: value = dollar_value, property = a bucket
    of number_of_cds (cds_1, cds_2, cds_3-4, cds_5+). Without an event_id column each row
    gets a deterministic id from its content and row number, so reading the same file twice
    gives the same ids and the windows de-duplicate a re-sent file. Columns that feed no
    field become string attributes (nested ones are left out), merged with an
    ``attributes`` map or JSON object column if there is one.

    The file's columns are checked before this returns: a required field with no column
    raises ValueError saying how to map it.
    """
    path = Path(path)
    kind = _file_kind(path)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    names, batches = _open_events(path, kind, batch_size)
    source = _source_columns(path.name, names, columns or {})
    return _conform_all(batches, source, [n for n in names if n not in source.values()], batch_size)


def _file_kind(path: Path) -> str:
    """The format of a file from its name; CSV, JSON lines and text may be compressed."""
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    compressed = len(suffixes) == 2 and suffixes[1] in _COMPRESSIONS
    kind = _FORMATS.get(suffixes[0] if compressed else path.suffix.lower())
    if kind is None or (compressed and kind == "parquet"):
        raise ValueError(
            f"can't tell the format of {path.name}: use one of {', '.join(_FORMATS)} "
            f"(all but Parquet also compressed: {', '.join(_COMPRESSIONS)})"
        )
    return kind


def _open_events(
    path: Path, kind: str, batch_size: int
) -> tuple[list[str], Iterator[pa.RecordBatch]]:
    """The file's column names and a lazy iterator over its raw batches."""
    if kind == "parquet":
        file = pq.ParquetFile(path)
        return file.schema_arrow.names, file.iter_batches(batch_size=batch_size)
    if kind == "json":
        reader = pa_json.open_json(path)
        return reader.schema.names, iter(reader)
    if kind == "text":
        table = _read_whitespace_text(path)
        if table.column_names == _CDNOW_COLUMNS:
            table = _cdnow_purchases(table)
        return table.column_names, iter(table.to_batches(batch_size))
    # CSV: every column as text (nulls for empty cells), so no column's type is guessed
    # from its first block; conversion below parses what each field needs.
    names = pa_csv.open_csv(path).schema.names
    reader = pa_csv.open_csv(
        path,
        convert_options=pa_csv.ConvertOptions(
            column_types={name: pa.string() for name in names}, strings_can_be_null=True
        ),
    )
    return names, iter(reader)


def _read_whitespace_text(path: Path) -> pa.Table:
    """Columns separated by runs of spaces or tabs, all as text; the first line names them."""
    import pandas as pd

    frame = pd.read_csv(path, sep=r"\s+", dtype=str, keep_default_na=False, na_values=[""])
    return pa.Table.from_pandas(frame, preserve_index=False)


def _cdnow_purchases(table: pa.Table) -> pa.Table:
    """CDNOW rows as events: every row is a purchase of number_of_cds CDs for dollar_value."""
    cds = table["number_of_cds"].cast(pa.int64()).to_numpy()
    return pa.table({
        "user_id": table["customer_id"],
        "event_time": table["date"],
        "action": pa.array(np.full(len(table), "purchase")),
        "property": _CD_BUCKETS.take(np.searchsorted(_CD_BUCKET_STARTS, cds, side="right")),
        "value": table["dollar_value"],
        "number_of_cds": table["number_of_cds"],  # kept as an attribute
    })  # fmt: skip


def _source_columns(file_name: str, names: list[str], columns: Mapping[str, str]) -> dict[str, str]:
    """Our field -> the file's column, for every field the file can fill."""
    unknown = set(columns) - set(EVENT_SCHEMA.names)
    if unknown:
        raise ValueError(
            f"unknown event field(s) {', '.join(sorted(unknown))}: "
            f"the fields are {', '.join(EVENT_SCHEMA.names)}"
        )
    listing = ", ".join(names)
    for field, column in columns.items():
        if column not in names:
            raise ValueError(
                f"no column {column!r} (mapped to {field!r}) in {file_name} (columns: {listing})"
            )
    source = {f: columns.get(f, f) for f in EVENT_SCHEMA.names if columns.get(f, f) in names}
    for field in REQUIRED_FIELDS:
        if field not in source:
            raise ValueError(
                f"no column for {field!r} in {file_name} (columns: {listing}); "
                f"map it with --column {field}=YOUR_COLUMN"
            )
    return source


def _conform_all(
    batches: Iterator[pa.RecordBatch], source: dict[str, str], extras: list[str], batch_size: int
) -> Iterator[pa.RecordBatch]:
    first_row = 0
    for raw in batches:
        for offset in range(0, raw.num_rows, batch_size):
            piece = raw.slice(offset, batch_size)
            yield _conform(piece, source, extras, first_row)
            first_row += piece.num_rows


def _conform(
    raw: pa.RecordBatch, source: dict[str, str], extras: list[str], first_row: int
) -> pa.RecordBatch:
    """One raw batch in EVENT_SCHEMA layout."""
    n = raw.num_rows
    column = {field: raw.column(name) for field, name in source.items()}
    out = {
        "user_id": column["user_id"].cast(pa.string()),
        "event_time": _parsed(source, "event_time", _to_timestamp_ms, column["event_time"]),
        "action": column["action"].cast(pa.string()),
        "property": column["property"].cast(pa.string())
        if "property" in column
        else pa.nulls(n, pa.string()),
        "value": _parsed(source, "value", lambda a: a.cast(pa.float64()), column["value"])
        if "value" in column
        else pa.nulls(n, pa.float64()),
    }
    for field in REQUIRED_FIELDS:
        _check_present(out[field], field, source)
    out["event_id"] = (
        column["event_id"].cast(pa.string())
        if "event_id" in column
        else _content_ids(out, first_row)
    )
    _check_present(out["event_id"], "event_id", source)
    out["attributes"] = _attributes(
        column.get("attributes"), {name: raw.column(name) for name in extras}, n
    )
    return pa.RecordBatch.from_arrays([out[f] for f in EVENT_SCHEMA.names], schema=EVENT_SCHEMA)


def _check_present(array: pa.Array, field: str, source: dict[str, str]) -> None:
    if array.null_count:
        raise ValueError(f"{array.null_count} rows without {field} (column {source[field]!r}): "
                         "every event needs one; fill those cells or drop those rows")  # fmt: skip


_EXPECTED = {
    "event_time": "ISO times (2026-01-31T12:00:00Z; no zone: UTC), YYYYMMDD dates, "
    "or epoch seconds or milliseconds",
    "value": "numbers (or empty cells)",
}


def _parsed(source: dict[str, str], field: str, parse: Callable, array: pa.Array) -> pa.Array:
    """parse(array), with a value it can't read said plainly: the column and what it takes."""
    try:
        return parse(array)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise ValueError(
            f"can't read {field} from column {source[field]!r}: {err}; use {_EXPECTED[field]}"
        ) from None


def _to_timestamp_ms(array: pa.Array) -> pa.Array:
    """timestamp[ms, UTC] from timestamps, dates, epoch numbers or text (see read_event_file)."""
    target = pa.timestamp("ms", tz="UTC")
    kind = array.type
    if pa.types.is_timestamp(kind):
        return array.cast(pa.timestamp("ms", tz=kind.tz), safe=False).cast(target)
    if pa.types.is_date(kind):
        return array.cast(pa.timestamp("ms")).cast(target)
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind):
        return _epoch_number_to_ms(array.cast(pa.float64()))
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return _text_to_ms(array.cast(pa.string()))
    raise ValueError(
        f"can't read event_time of type {kind}: use ISO text, a timestamp, a date or epoch numbers"
    )


def _epoch_number_to_ms(seconds_or_ms: pa.Array) -> pa.Array:
    values = seconds_or_ms.to_numpy(zero_copy_only=False)
    ms = np.round(np.where(np.abs(values) > 1e11, values, values * 1000))
    nulls = np.isnan(ms)
    return pa.array(
        np.where(nulls, 0, ms).astype(np.int64), pa.timestamp("ms", tz="UTC"), mask=nulls
    )


def _text_to_ms(text: pa.Array) -> pa.Array:
    """Each string parsed as a YYYYMMDD date, an epoch number, an ISO time with a zone, or
    one without (UTC)."""
    dated = pc.match_substring_regex(text, r"^\d{8}$")  # YYYYMMDD
    numeric = pc.and_not(pc.match_substring_regex(text, r"^-?\d+(\.\d*)?([eE][+-]?\d+)?$"), dated)
    zoned = pc.and_not(pc.match_substring_regex(text, r"(Z|[+-]\d\d:?\d\d)$"), numeric)
    naive = pc.and_not(pc.is_valid(text), pc.or_(pc.or_(dated, numeric), zoned))
    as_ms = pa.timestamp("ms", tz="UTC")
    # Parse at ns so fractional seconds of any precision are accepted, then truncate to ms.
    parsed = [
        pc.strptime(pc.if_else(dated, text, None), format="%Y%m%d", unit="ms").cast(as_ms),
        _epoch_number_to_ms(pc.if_else(numeric, text, None).cast(pa.float64())),
        pc.if_else(zoned, text, None).cast(pa.timestamp("ns", tz="UTC")).cast(as_ms, safe=False),
        pc.if_else(naive, text, None)
        .cast(pa.timestamp("ns"))
        .cast(pa.timestamp("ms"), safe=False)
        .cast(as_ms),
    ]
    return pc.coalesce(*parsed)


def _content_ids(out: dict[str, pa.Array], first_row: int) -> pa.StringArray:
    """Deterministic ids: a hash of the row's fields and its row number in the file."""
    n = len(out["user_id"])
    h = mix64(np.arange(first_row, first_row + n, dtype=U64))
    for field in ("user_id", "action", "property"):
        h = mix64(h ^ hash_strings(out[field]))
    h = mix64(h ^ out["event_time"].cast(pa.int64()).to_numpy().astype(U64))
    value = out["value"].to_numpy(zero_copy_only=False)
    return hex_ids(mix64(h ^ np.nan_to_num(value, nan=np.inf).view(U64)))


def _attributes(attributes: pa.Array | None, extras: dict[str, pa.Array], n: int) -> pa.MapArray:
    """The attributes map: entries of a map or struct column plus the extra columns as text."""
    rows, keys, values = [], [], []

    def add(key_array: pa.Array, value_array: pa.Array, row: np.ndarray) -> None:
        present = np.asarray(value_array.is_valid())
        rows.append(row[present])
        keys.append(key_array.filter(present).cast(pa.string()))
        values.append(value_array.filter(present).cast(pa.string()))

    if attributes is not None and pa.types.is_map(attributes.type):
        offsets = attributes.offsets.to_numpy()  # the slice's own, unlike .keys / .items
        first, count = int(offsets[0]), int(offsets[-1] - offsets[0])
        row = np.repeat(np.arange(n), np.diff(offsets))
        in_map = np.asarray(attributes.is_valid())[row]
        map_keys, map_items = (
            attributes.keys.slice(first, count),
            attributes.items.slice(first, count),
        )
        add(map_keys.filter(in_map), map_items.filter(in_map), row[in_map])
    elif attributes is not None and pa.types.is_struct(attributes.type):
        extras = {
            **{f.name: child for f, child in zip(attributes.type, attributes.flatten())},
            **extras,
        }
    elif attributes is not None:
        extras = {"attributes": attributes, **extras}
    for name, array in extras.items():
        if not pa.types.is_nested(array.type):
            add(pa.array(np.full(n, name)), array, np.arange(n))
    if not rows:
        return string_map(
            np.empty(0, np.int64), pa.array([], pa.string()), pa.array([], pa.string()), n
        )
    return string_map(np.concatenate(rows), pa.concat_arrays(keys), pa.concat_arrays(values), n)
