"""The event layout (stream.event_contract), the synthetic population's planted structure
(stream.synthetic) and file reading (stream.event_files)."""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from stream.event_contract import EVENT_SCHEMA
from stream.event_files import dataset_path, read_event_file
from stream.synthetic import ACTIONS, MONEY_ACTIONS, PROPERTIES, SyntheticEvents

ORIGIN = datetime(2024, 1, 1, tzinfo=UTC)
HORIZON = timedelta(days=28)


@pytest.fixture(scope="module")
def population() -> SyntheticEvents:
    return SyntheticEvents(n_users=1_000, seed=7, origin=ORIGIN, churn_horizon_days=HORIZON.days)


@pytest.fixture(scope="module")
def history(population: SyntheticEvents) -> pa.Table:
    return pa.Table.from_batches(population.history(ORIGIN, ORIGIN + HORIZON, batch_size=20_000))


@pytest.fixture(scope="module")
def frame(history: pa.Table, population: SyntheticEvents) -> pd.DataFrame:
    return history.to_pandas().merge(population.personas().to_pandas(), on="user_id")


def check_batch(batch: pa.RecordBatch) -> None:
    assert batch.schema.equals(EVENT_SCHEMA)
    for field in EVENT_SCHEMA:
        if not field.nullable:
            assert batch.column(field.name).null_count == 0, field.name
    money = pc.is_in(batch.column("action"), pa.array(MONEY_ACTIONS)).to_numpy(zero_copy_only=False)
    assert np.array_equal(batch.column("value").is_valid().to_numpy(zero_copy_only=False), money)
    assert set(batch.column("action").to_pylist()) <= set(ACTIONS)
    assert set(batch.column("property").drop_null().to_pylist()) <= set(PROPERTIES)
    assert pc.all(pc.match_substring_regex(batch.column("user_id"), r"^u\d{6}$")).as_py()


def test_history_conforms_to_the_schema(population: SyntheticEvents, history: pa.Table) -> None:
    batches = list(population.history(ORIGIN, ORIGIN + timedelta(days=3), batch_size=5_000))
    assert len(batches) > 3 and all(0 < b.num_rows <= 5_000 for b in batches)
    for batch in batches[:3]:
        check_batch(batch)
    times = history.column("event_time").cast(pa.int64()).to_numpy()
    assert np.all(np.diff(times) >= 0), "history is in event-time order"
    assert times[0] >= 1704067200000 and times[-1] < 1704067200000 + HORIZON // timedelta(
        milliseconds=1
    )
    assert pc.count_distinct(history.column("event_id")).as_py() == history.num_rows
    assert history.num_rows > 100_000
    assert len(set(history.column("property").drop_null().to_pylist())) > 200


def test_the_same_seed_gives_the_same_events() -> None:
    def sample(seed: int) -> tuple[pa.Table, pa.Table]:
        g = SyntheticEvents(n_users=300, seed=seed)
        live = itertools.islice(g.live(500, start=ORIGIN), 20)
        return pa.Table.from_batches(
            g.history(ORIGIN, ORIGIN + timedelta(days=2))
        ), pa.Table.from_batches(live)

    first, again, other = sample(1), sample(1), sample(2)
    assert first[0].equals(again[0]) and first[1].equals(again[1])
    assert not first[0].equals(other[0]) and not first[1].equals(other[1])


def test_personas_have_different_action_mixes(
    frame: pd.DataFrame, population: SyntheticEvents
) -> None:
    personas = population.personas()
    assert personas.num_rows == 1_000 and set(personas.column("persona").to_pylist()) == set(
        population.persona_names
    )
    mix = pd.crosstab(frame.persona, frame.action, normalize="index")
    for a, b in itertools.combinations(mix.index, 2):
        total_variation = 0.5 * np.abs(mix.loc[a] - mix.loc[b]).sum()
        assert total_variation > 0.3, (a, b, total_variation)
    top = (
        frame[frame.persona.isin(["gamer", "fraudster", "traveller"])]
        .groupby("persona")
        .action.agg(lambda a: a.value_counts().index[0])
    )
    assert top.to_dict() == {
        "gamer": "game_start",
        "fraudster": "card_payment",
        "traveller": "search",
    }


def test_personas_have_their_own_rhythm(frame: pd.DataFrame) -> None:
    night = frame.event_time.dt.hour.between(1, 5)
    share = night.groupby(frame.persona).mean()
    assert share["fraudster"] > 3 * share["shopper"]


def test_churners_fade_out(frame: pd.DataFrame) -> None:
    quarter = ((frame.event_time - pd.Timestamp(ORIGIN)) / (HORIZON / 4)).astype(int)
    churners = frame[frame.churner].groupby(quarter).size()
    others = frame[~frame.churner].groupby(quarter).size()
    assert churners.get(3, 0) < 0.1 * churners[0]
    assert others[3] > 0.7 * others[0]


def test_gaps_span_seconds_to_weeks(frame: pd.DataFrame) -> None:
    ordered = frame.sort_values(["user_id", "event_time"])
    gaps = ordered.groupby("user_id").event_time.diff().dropna().dt.total_seconds()
    assert gaps.quantile(0.1) < 10
    assert gaps.max() > 14 * 86_400
    per_user = frame.groupby("user_id").size()
    assert per_user.max() > 20 * per_user.median(), "Zipf activity: a few users do far more"


def test_live_batches_are_stamped_now() -> None:
    g = SyntheticEvents(n_users=2_000, seed=3)
    batches = list(itertools.islice(g.live(2_000, interval_ms=100), 50))
    now_ms = datetime.now(UTC).timestamp() * 1000
    first = batches[0].column("event_time").cast(pa.int64()).to_numpy()
    assert abs(first[0] - now_ms) < 1_000
    instants = [b.column("event_time").cast(pa.int64()).to_numpy() for b in batches]
    assert all(len(set(t)) == 1 for t in instants), "one instant per batch"
    assert np.all(np.diff([t[0] for t in instants]) == 100)
    rows = sum(b.num_rows for b in batches)
    assert 8_000 < rows < 12_000  # 2,000/s for 5 s of event time
    for batch in batches[:3]:
        check_batch(batch)
    ids = pa.concat_arrays([b.column("event_id") for b in batches])
    assert pc.count_distinct(ids).as_py() == rows


@pytest.fixture(scope="module")
def sample_batch(population: SyntheticEvents) -> pa.RecordBatch:
    return next(population.history(ORIGIN, ORIGIN + timedelta(days=1), batch_size=3_000))


def channel(batch: pa.RecordBatch) -> pa.Array:
    return pa.array([dict(a)["channel"] for a in batch.column("attributes").to_pylist()])


def test_reads_csv_with_a_mapping_and_epoch_seconds(
    sample_batch: pa.RecordBatch, tmp_path: Path
) -> None:
    seconds = pc.divide(
        sample_batch.column("event_time").cast(pa.int64()).cast(pa.float64()), 1000.0
    )
    theirs = pa.table(
        {
            "customer": sample_batch.column("user_id"),
            "ts": seconds,
            "what": sample_batch.column("action"),
            "property": sample_batch.column("property"),
            "amount": sample_batch.column("value"),
            "channel": channel(sample_batch),
        }
    )
    path = tmp_path / "events.csv"
    pa_csv.write_csv(theirs, path)
    mapping = {"user_id": "customer", "event_time": "ts", "action": "what", "value": "amount"}
    read = pa.Table.from_batches(read_event_file(path, mapping, batch_size=1_000))
    assert read.schema.equals(EVENT_SCHEMA) and read.num_rows == sample_batch.num_rows
    for name in ("user_id", "event_time", "action", "property", "value", "attributes"):
        assert read.column(name).combine_chunks().equals(sample_batch.column(name)), name
    assert pc.count_distinct(read.column("event_id")).as_py() == read.num_rows
    again = pa.Table.from_batches(read_event_file(path, mapping, batch_size=700))
    assert read.column("event_id").equals(again.column("event_id")), (
        "ids depend on content, not batching"
    )


def test_reads_parquet_with_epoch_ms(sample_batch: pa.RecordBatch, tmp_path: Path) -> None:
    theirs = pa.Table.from_batches([sample_batch]).set_column(
        2, "time_ms", sample_batch.column("event_time").cast(pa.int64())
    )
    path = tmp_path / "events.parquet"
    pq.write_table(theirs, path)
    read = pa.Table.from_batches(read_event_file(path, {"event_time": "time_ms"}))
    assert read.equals(pa.Table.from_batches([sample_batch]))


def test_reads_jsonl_with_iso_times(sample_batch: pa.RecordBatch, tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with path.open("w") as out:
        for row in sample_batch.to_pylist():
            row["event_time"] = (
                row["event_time"].isoformat(timespec="milliseconds").replace("+00:00", "Z")
            )
            row["attributes"] = dict(row["attributes"])
            out.write(json.dumps(row) + "\n")
    read = pa.Table.from_batches(read_event_file(path))
    assert read.equals(pa.Table.from_batches([sample_batch]))


def test_event_time_formats(tmp_path: Path) -> None:
    path = tmp_path / "times.csv"
    path.write_text(
        "user_id,event_time,action\n"
        "a,2024-01-01,login\n"
        "a,2024-01-01T10:00:00.5,login\n"
        "a,2024-01-01T12:00:00+02:00,login\n"
        "a,1704067200,login\n"
        "a,1704067200250,login\n"
    )
    (batch,) = read_event_file(path)
    assert batch.column("event_time").cast(pa.int64()).to_pylist() == [
        1704067200000, 1704103200500, 1704103200000, 1704067200000, 1704067200250,
    ]  # fmt: skip
    assert (
        batch.column("property").null_count == 5
        and batch.column("attributes").to_pylist() == [[]] * 5
    )


def test_missing_user_column_says_how_to_map_it(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(
        ValueError,
        match=r"no column for 'user_id' in data.csv \(columns: a, b, c\); "
        r"map it with --column user_id=YOUR_COLUMN",
    ):
        read_event_file(path, {"event_time": "b", "action": "c"})
    with pytest.raises(ValueError, match=r"no column 'nope' \(mapped to 'user_id'\)"):
        read_event_file(path, {"user_id": "nope"})


def test_reads_cdnow_text_as_purchases() -> None:
    events = pa.Table.from_batches(list(read_event_file(dataset_path("cdnow"))))
    assert events.num_rows == 69_659 and events.schema.equals(EVENT_SCHEMA)
    assert len(pc.unique(events["user_id"])) == 23_570
    # Identical rows (same customer, day, quantity and amount) stay distinct events.
    assert len(pc.unique(events["event_id"])) == events.num_rows
    first = events.slice(0, 1).to_pylist()[0]
    assert (first["user_id"], first["action"], first["property"], first["value"]) == (
        "00001",
        "purchase",
        "cds_1",
        11.77,
    )
    assert first["event_time"] == datetime(1997, 1, 1, tzinfo=UTC)
    assert set(pc.unique(events["property"]).to_pylist()) == {"cds_1", "cds_2", "cds_3-4", "cds_5+"}


def test_whitespace_text_with_yyyymmdd_dates(tmp_path: Path) -> None:
    path = tmp_path / "log.txt"
    path.write_text(" who  day   kind\r\n a1  20240229  login\r\n b2\t20231231 logout\r\n")
    events = pa.Table.from_batches(
        list(read_event_file(path, {"user_id": "who", "event_time": "day", "action": "kind"}))
    )
    assert events["event_time"].to_pylist() == [
        datetime(2024, 2, 29, tzinfo=UTC),
        datetime(2023, 12, 31, tzinfo=UTC),
    ]
    assert events["user_id"].to_pylist() == ["a1", "b2"]
