"""Same events, same embedding: BeatEncoder orders events of one millisecond by the
stream's event-id hash, whatever order the caller gives them in."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from model import BeatEncoder, EventWindow, init_model_dir
from stream.window import Window, event_id_hashes, pack_rows

ACTIONS = ["login", "page_view", "purchase", "search"]
T0 = 1_780_000_000_000


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> BeatEncoder:
    directory = tmp_path_factory.mktemp("model")
    init_model_dir(directory, "tiny", ACTIONS, ["web", "app"], seed=4)
    return BeatEncoder.from_pretrained(directory, device="cpu")


def events() -> dict[str, np.ndarray]:
    """Twelve events, three bursts of four in one millisecond each."""
    ids = np.array([f"evt-{i:02d}" for i in range(12)], object)
    return {
        "time": T0 + 60_000 * (np.arange(12) // 4),
        "action": np.array([ACTIONS[i % 4] for i in range(12)], object),
        "property": np.array([("web", "app", None)[i % 3] for i in range(12)], object),
        "id": ids,
        "hash": event_id_hashes(pa.array(ids.tolist())),
    }


def window(e: dict[str, np.ndarray], order: np.ndarray, with_hash: bool = True) -> EventWindow:
    return EventWindow(e["time"][order], e["action"][order], e["property"][order],
                       event_id_hash=e["hash"][order] if with_hash else None)


def test_any_order_of_ties_gives_the_streams_embedding(encoder: BeatEncoder) -> None:
    e = events()
    by_event_id = np.lexsort((e["id"], e["time"]))  # a notebook's sort
    by_hash = np.lexsort((e["hash"], e["time"]))  # the stream's order
    shuffled = np.random.default_rng(0).permutation(12)
    as_of = T0 + 86_400_000
    stream_window = Window.from_strings("u", pack_rows(
        e["time"][by_hash], np.arange(12), e["hash"][by_hash], np.full(12, np.nan)
    ), e["action"][by_hash].tolist(), e["property"][by_hash].tolist())

    online = encoder.encode([stream_window.event_window()], as_of_ms=as_of)[0]
    for order in (by_event_id, by_hash, shuffled):
        offline = encoder.encode([window(e, order)], as_of_ms=as_of)[0]
        assert offline.tobytes() == online.tobytes()
    # Without the hash, the caller's order of ties is what the model sees.
    assert not np.array_equal(encoder.encode([window(e, by_event_id, False)], as_of_ms=as_of)[0],
                              online)
