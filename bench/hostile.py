"""CPU cost of hostile events in the stream worker's decoder, with and without the limits.

    .venv/bin/python bench/hostile.py [--repeat 3]

Each case decodes one batch with the vectorized decoder (stream/event_columns.py) three
ways in the same run: "before", as reported in issue 12 (no limits, one numpy pass per map
entry of any record); "no limits" (the few widest maps of a batch finished by a scalar
walk); and "limits", the default limits (Settings: a value over max_event_bytes is not
read, a map stops being read past max_attributes entries). The
cases are the attacks of issue 12 (one message with a map of many empty entries, the same
map split into one-entry blocks, a map that declares 10**12 entries) and the worst events
the limits still accept, alone and among 10,000 ordinary events. Reports the best of
--repeat runs in CPU ms per batch. Writes bench/results/hostile.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from stream import event_columns, window  # noqa: E402
from stream.codec import AvroCodec  # noqa: E402
from stream.config import load_settings  # noqa: E402
from stream.event_columns import EventDecoder  # noqa: E402

RESULTS = REPO / "bench" / "results"
CODEC = AvroCodec("behavior_event", "beat.events")
NOW = datetime.now(UTC)


def event(n: int, attributes: dict[str, str] | None = None, action: str = "page_view") -> bytes:
    record = {"user_id": f"u{n % 1000}", "event_id": f"e{n}", "event_time": NOW, "action": action,
              "property": "home", "value": None, "attributes": attributes or {}}  # fmt: skip
    return CODEC.encode(record)


def empty_entries(n: int) -> bytes:
    """One block of n empty entries (key "", value ""): 2 bytes an entry."""
    return event(0, {})[:-1] + _varint(n) + b"\x00\x00" * n + b"\x00"


def one_entry_blocks(n: int) -> bytes:
    return event(0, {})[:-1] + b"\x02\x00\x00" * n + b"\x00"


def declared(count: int) -> bytes:
    return event(0, {})[:-1] + _varint(count)


def _varint(n: int) -> bytes:
    z, out = n << 1, bytearray()
    while z > 0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    return bytes(out + bytes([z]))


def cases(limits: object) -> dict[str, list[bytes]]:
    ordinary = [event(i, {"browser": "firefox", "country": "fr"}) for i in range(10_000)]
    widest = {f"k{i:02d}": "v" * (limits.max_attribute_bytes // limits.max_attributes - 3)
              for i in range(limits.max_attributes)}  # fmt: skip
    return {
        "1 message, 1,000 empty entries": [empty_entries(1_000)],
        "1 message, 10,000 empty entries": [empty_entries(10_000)],
        "1 message, 30,000 empty entries (60 KB)": [empty_entries(30_000)],
        "1 message, 450,000 empty entries (0.9 MB)": [empty_entries(450_000)],
        "1 message, 30,000 one-entry blocks": [one_entry_blocks(30_000)],
        "1 message declaring 10^12 entries": [declared(10**12)],
        "10,000 ordinary events": ordinary,
        "10,000 ordinary + 1 of 10,000 empty entries": [*ordinary, empty_entries(10_000)],
        "10,000 ordinary + 1 of 30,000 one-entry blocks": [*ordinary, one_entry_blocks(30_000)],
        "1 widest accepted event (64 attributes, 16 KB)": [event(0, widest)],
        "10,000 widest accepted events": [event(i, widest) for i in range(10_000)],
    }


def best_ms(decoder: EventDecoder, values: list[bytes], repeat: int) -> float:
    """Least CPU time of repeat decodes, in ms (CPU, not wall: the machine is shared)."""
    times = []
    for _ in range(repeat):
        start = time.process_time()
        decoder.decode(values)
        times.append(time.process_time() - start)
        if times[-1] > 1.0:  # slow enough to measure once
            break
    return min(times) * 1000


def symbol_growth(table: int = 200_000, windows: int = 1_000) -> dict[str, float]:
    """CPU ms of the encoder's window -> model input for a batch of windows that each
    bring a new (action, property) pair, with the table copied into arrays on every growth
    (before issue 12) and grown by doubling (Symbols._new_slot now)."""
    out = {}
    for label in ("before", "after"):
        symbols = window.SYMBOLS = window.Symbols()
        symbols.ids(["view"] * table, [f"known{i}" for i in range(table)])
        rows = np.zeros(4, window.ROW)
        start = time.process_time()
        for i in range(windows):
            new = window.Window.from_strings(f"u{i}", rows, ["view"], [f"new{i}"])
            if label == "before":  # the columns rebuilt from the whole table
                symbols.actions = np.array(symbols.actions.tolist(), object)
                symbols.properties = np.array(symbols.properties.tolist(), object)
            new.event_window()
        out[f"{label}_ms"] = (time.process_time() - start) * 1000
    window.SYMBOLS = window.Symbols()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--slow-baseline",
        action="store_true",
        help="also run 'before' on the 0.9 MB message (issue 12 measured 93 s)",
    )
    args = parser.parse_args()
    limits = load_settings().event_limits
    decoders = {
        "before": EventDecoder(CODEC),
        "no limits": EventDecoder(CODEC),
        "limits": EventDecoder(CODEC, limits),
    }
    scalar_rows = event_columns._SCALAR_ROWS
    rows = []
    header = ("case (CPU ms per batch)", "before", "no limits", "limits", "before/limits")
    print("{:50} {:>9} {:>10} {:>8} {:>14}".format(*header))
    for name, values in cases(limits).items():
        row = {"case": name, "messages": len(values), "bytes": sum(map(len, values))}
        for label, decoder in decoders.items():
            # before: the decoder of issue 12's report, one numpy pass per map entry of any record
            event_columns._SCALAR_ROWS = 0 if label == "before" else scalar_rows
            skip = label == "before" and "450,000" in name and not args.slow_baseline
            row[label] = None if skip else best_ms(decoder, values, args.repeat)
        ratio = f"{row['before'] / row['limits']:,.0f}x" if row["before"] else "-"
        before = f"{row['before']:,.1f}" if row["before"] is not None else "skipped"
        print(
            f"{name:50} {before:>9} {row['no limits']:>10,.1f} {row['limits']:>8,.2f} {ratio:>14}"
        )
        rows.append(row)
    growth = symbol_growth()
    print("encoder, a batch of 1,000 windows each with a property never seen, table of 200k "
          f"pairs: copy per growth (before) {growth['before_ms']:,.0f} ms, "
          f"doubling {growth['after_ms']:,.1f} ms")  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"limits": limits._asdict(), "cases": rows, "symbol_growth": growth}
    (RESULTS / "hostile.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS / 'hostile.json'}")


if __name__ == "__main__":
    main()
