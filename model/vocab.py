"""String → id vocabularies for event actions and properties."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

PAD_ID = 0  # padding; never produced by lookup
OOV_ID = 1  # a value the vocabulary has never seen
NONE_ID = 2  # a missing value (None), e.g. an event without a property
SPECIAL_TOKENS = ("<pad>", "<oov>", "<none>")
FORMAT_VERSION = 1


class Vocabulary:
    """Maps strings to ids; ids below len(SPECIAL_TOKENS) are reserved.

    The special tokens are never looked up by name, so an event whose action happens to be the
    string "<pad>" is an ordinary value, not padding.
    """

    def __init__(self, tokens: Iterable[str]) -> None:
        self.tokens: list[str] = list(tokens)  # id - len(SPECIAL_TOKENS) → string
        self._ids = {token: i for i, token in enumerate(self.tokens, start=len(SPECIAL_TOKENS))}
        if len(self._ids) != len(self.tokens):
            raise ValueError("vocabulary tokens must be unique")

    @classmethod
    def build(cls, values: Iterable[str | None], max_size: int) -> Vocabulary:
        """The vocabulary of from_counts over values; None is not a value."""
        return cls.from_counts(Counter(value for value in values if value is not None), max_size)

    @classmethod
    def from_counts(cls, counts: Mapping[str, int], max_size: int) -> Vocabulary:
        """The most frequent values first (ties by value, so the result is deterministic).

        max_size counts the reserved ids too, so it is the size of the embedding table.
        """
        if max_size < len(SPECIAL_TOKENS):
            raise ValueError(f"max_size must be at least {len(SPECIAL_TOKENS)}, got {max_size}")
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        return cls(token for token, _ in ranked[: max_size - len(SPECIAL_TOKENS)])

    @classmethod
    def from_column(cls, column: pa.ChunkedArray, max_size: int) -> Vocabulary:
        """The vocabulary of a list<string> column's events (model/sequences.py), counted by
        Arrow; nulls are not values."""
        counted = pc.value_counts(pc.drop_null(pc.list_flatten(column)))
        counts = dict(zip(counted.field("values").to_pylist(), counted.field("counts").to_pylist()))
        return cls.from_counts(counts, max_size)

    def __len__(self) -> int:
        return len(SPECIAL_TOKENS) + len(self.tokens)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.tokens == other.tokens

    def lookup(self, values: np.ndarray) -> np.ndarray:
        """Ids (int64, same shape as values); None → NONE_ID, anything unknown → OOV_ID."""
        values = np.asarray(values, dtype=object)
        get = self._ids.get
        ids = np.fromiter(
            (NONE_ID if value is None else get(value, OOV_ID) for value in values.ravel()),
            dtype=np.int64,
            count=values.size,
        )
        return ids.reshape(values.shape)

    def lookup_column(self, column: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """lookup of a string column: ids int64 [len(column)], null → NONE_ID. Each distinct
        value is looked up once (a column holds millions of events but few distinct values)."""
        encoded = pc.dictionary_encode(column, null_encoding="encode")  # null: a dictionary entry
        if isinstance(encoded, pa.ChunkedArray):
            encoded = encoded.combine_chunks()  # one dictionary for all chunks
        ids = self.lookup(encoded.dictionary.to_numpy(zero_copy_only=False))  # [distinct]
        return ids[encoded.indices.to_numpy()]

    def save(self, path: str | Path) -> None:
        document = {"format_version": FORMAT_VERSION, "tokens": [*SPECIAL_TOKENS, *self.tokens]}
        Path(path).write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
        tokens = document.get("tokens")
        if document.get("format_version") != FORMAT_VERSION or not isinstance(tokens, list):
            raise ValueError(f"{path}: not a BEAT vocabulary (format_version {FORMAT_VERSION})")
        if tuple(tokens[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"{path}: the first tokens must be {list(SPECIAL_TOKENS)}")
        return cls(tokens[len(SPECIAL_TOKENS) :])
