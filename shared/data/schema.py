"""The two tables every dataset becomes, and the error a user sees when input is bad.

Interactions: one row per (user, item, timestamp[, rating]) event.
Catalog:      one row per item: id, title, genres, year, free text, tags.

Both keep the file and line each row came from, so that a problem found later
(an unknown item, a duplicate id) can still be reported as `file:line: field: what`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

INTERACTION_COLUMNS = ("user", "item", "timestamp", "rating")
CATALOG_COLUMNS = ("item", "title", "genres", "year", "text", "tags")


class DataError(ValueError):
    """A problem with the user's input, reported as `file:line: field 'x': message`."""

    def __init__(self, message: str, *, file: str | Path | None = None,
                 line: int | None = None, field: str | None = None):
        self.file, self.line, self.field, self.reason = file, line, field, message
        where = ""
        if file is not None:
            where = f"{file}:{line}: " if line is not None else f"{file}: "
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}{what}{message}")


@dataclass(frozen=True)
class Interactions:
    """Events sorted by (user, timestamp); `line` is the source line of each row (0 if made up).

    Columns: user (str), item (str), timestamp (int64 unix seconds), rating (float64, NaN if
    the source has none), line (int64).
    """
    frame: pd.DataFrame
    source: str

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def n_users(self) -> int:
        return self.frame["user"].nunique()


@dataclass(frozen=True)
class Catalog:
    """Items indexed by their string id. genres and tags are tuples of strings; year is
    Int64 (nullable); text is free text (may be empty)."""
    frame: pd.DataFrame
    source: str

    def __len__(self) -> int:
        return len(self.frame)


@dataclass(frozen=True)
class Dataset:
    name: str
    interactions: Interactions
    catalog: Catalog
    unknown_items_dropped: int = 0   # events dropped because the catalog lacks their item (--drop-unknown-items)


def make_interactions(frame: pd.DataFrame, source: str) -> Interactions:
    """Normalise dtypes, sort by (user, timestamp) keeping file order for ties, validate."""
    frame = frame.copy()
    if "rating" not in frame:
        frame["rating"] = np.nan
    if "line" not in frame:
        frame["line"] = np.arange(len(frame), dtype=np.int64) + 1
    frame["user"] = frame["user"].astype(str)
    frame["item"] = frame["item"].astype(str)
    frame["timestamp"] = frame["timestamp"].astype(np.int64)
    frame["rating"] = frame["rating"].astype(np.float64)
    frame["line"] = frame["line"].astype(np.int64)
    # A stable sort keeps the file's order among events with the same timestamp
    # (ML-100K has many): the split depends on it, so it must be deterministic.
    frame = frame.sort_values(["user", "timestamp"], kind="stable").reset_index(drop=True)
    frame = frame[list(INTERACTION_COLUMNS) + ["line"]]
    if frame.empty:
        raise DataError("no interactions", file=source)
    return Interactions(frame, source)


def make_catalog(frame: pd.DataFrame, source: str) -> Catalog:
    """Fill optional columns, check ids are unique (naming both lines of a duplicate)."""
    frame = frame.copy()
    n = len(frame)
    frame["item"] = frame["item"].astype(str)
    defaults = {"title": "", "text": "", "genres": None, "tags": None, "year": pd.NA}
    for column, default in defaults.items():
        if column not in frame:
            frame[column] = [default] * n if default is None else default
    frame["genres"] = [tuple(g) if g is not None else () for g in frame["genres"]]
    frame["tags"] = [tuple(t) if t is not None else () for t in frame["tags"]]
    frame["title"] = frame["title"].fillna("").astype(str)
    frame["text"] = frame["text"].fillna("").astype(str)
    frame["year"] = pd.array(frame["year"], dtype="Int64")
    if "line" not in frame:
        frame["line"] = np.arange(n, dtype=np.int64) + 1
    duplicated = frame["item"].duplicated(keep="first")
    if duplicated.any():
        row = frame[duplicated].iloc[0]
        first = frame[frame["item"] == row["item"]].iloc[0]
        raise DataError(f"duplicate item id {row['item']!r} (first defined on line {first['line']})",
                        file=source, line=int(row["line"]), field="item")
    return Catalog(frame[list(CATALOG_COLUMNS) + ["line"]].set_index("item", drop=False), source)


def check_items_known(interactions: Interactions, catalog: Catalog) -> None:
    """Every interaction must name an item the catalog defines."""
    known = interactions.frame["item"].isin(catalog.frame.index)
    if not known.all():
        row = interactions.frame[~known].sort_values("line").iloc[0]
        missing = (~known).sum()
        raise DataError(f"unknown item {row['item']!r}: not in the item catalog {catalog.source}"
                        f" ({missing} interaction(s) name unknown items)",
                        file=interactions.source, line=int(row["line"]), field="item")
