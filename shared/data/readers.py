"""Readers for the dataset formats we accept. Each returns `Interactions` and/or `Catalog`.

Formats:
  - MovieLens 100K: `u.data` (tab: user, item, rating, unix time), `u.item` (pipe, Latin-1)
  - MovieLens latest / 20M / 25M: `ratings.csv`, `movies.csv`, `tags.csv` (UTF-8, header)
  - MovieLens 1M: `ratings.dat`, `movies.dat` (`::`-separated, Latin-1)
  - RecBole atomic files: `.inter`, `.item` (tab, typed header `name:type`)
  - a generic CSV or Parquet with named columns

All parsing goes through `read_delimited`, which turns pandas' and the codec's errors into
`DataError`s naming the file, the line and the field.
"""
from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedrec.shared.data.schema import Catalog, DataError, Interactions, make_catalog, make_interactions

ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                 "Romance", "Sci-Fi", "Thriller", "War", "Western")


# --------------------------------------------------------------------------- low level

def _first_undecodable_line(path: Path, encoding: str) -> tuple[int, str]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                raw.decode(encoding)
            except UnicodeDecodeError as err:
                return number, f"byte 0x{raw[err.start]:02x} at column {err.start + 1}"
    return 0, "unknown position"


def _check_field_count(path: Path, encoding: str, sep: str, expected: int, lines: pd.Series) -> None:
    wanted = set(int(n) for n in lines)
    with open(path, encoding=encoding, newline="") as f:
        for number, text in enumerate(f, start=1):
            if number in wanted:
                found = text.rstrip("\r\n").count(sep) + 1
                if found < expected:
                    raise DataError(f"malformed line: expected {expected} fields, found {found}",
                                    file=path, line=number)
                if number >= max(wanted):
                    return


def read_delimited(path: Path, *, sep: str, names: list[str] | None = None,
                   header: bool = False, encoding: str = "utf-8",
                   required: list[str] | None = None) -> pd.DataFrame:
    """Read a delimited text file as strings, with a `line` column (1-based file line).

    `names` gives the columns of a header-less file; with `header=True` the file's first line
    names them and `required` lists those that must be present. A line with too few or too
    many fields is a `DataError`, as is a byte sequence the encoding cannot decode.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", file=path)
    source: str | io.BytesIO = str(path)
    original_sep = sep
    if len(sep) > 1:  # pandas' C parser takes one-character separators only
        source = io.BytesIO(path.read_bytes().replace(sep.encode(), b"\x1f"))
        sep = "\x1f"
    try:
        frame = pd.read_csv(source, sep=sep, header=0 if header else None, names=names,
                            dtype=str, keep_default_na=False, na_values=[],
                            skip_blank_lines=False, encoding=encoding, quoting=3 if sep != "," else 0,
                            engine="c")
    except UnicodeDecodeError:
        line, where = _first_undecodable_line(path, encoding)
        raise DataError(f"not valid {encoding} ({where}); is the file in another encoding?",
                        file=path, line=line) from None
    except pd.errors.ParserError as err:
        match = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(err))
        if match:
            want, line, saw = match.groups()
            raise DataError(f"malformed line: expected {want} fields, found {saw}",
                            file=path, line=int(line)) from None
        raise DataError(f"cannot parse: {err}", file=path) from None
    except pd.errors.EmptyDataError:
        raise DataError("file is empty", file=path) from None
    frame["line"] = np.arange(len(frame), dtype=np.int64) + (2 if header else 1)
    if required:
        missing = [c for c in required if c not in frame.columns]
        if missing:
            raise DataError(f"header lacks column(s) {missing}; it has {list(frame.columns[:-1])}",
                            file=path, line=1)
    columns = names if names else [c for c in frame.columns if c != "line"]
    cells = frame[columns]
    frame = frame[~(cells == "").all(axis=1)]  # blank lines are allowed anywhere
    suspicious = (frame[columns] == "").any(axis=1)
    if suspicious.any():  # an empty cell may be a line with too few fields: count them
        _check_field_count(path, encoding, original_sep, len(columns), frame.loc[suspicious, "line"])
    return frame.reset_index(drop=True)


def _first_bad(frame: pd.DataFrame, bad: pd.Series, path: Path, field: str, what: str):
    row = frame[bad].iloc[0]
    value = row[field]
    raise DataError(f"{what}: {value!r}", file=path, line=int(row["line"]), field=field)


def parse_ids(frame: pd.DataFrame, column: str, path: Path) -> pd.Series:
    values = frame[column].str.strip()
    bad = values == ""
    if bad.any():
        _first_bad(frame, bad, path, column, "empty id")
    return values


def parse_float(frame: pd.DataFrame, column: str, path: Path) -> pd.Series:
    values = pd.to_numeric(frame[column].str.strip(), errors="coerce")
    bad = values.isna() | ~np.isfinite(values.to_numpy(dtype=float, na_value=np.nan))
    if bad.any():
        _first_bad(frame, bad, path, column, "not a number")
    return values.astype(np.float64)


MAX_UNIX_SECONDS = 1e11  # about the year 5100; far past any real log, far inside int64


def parse_timestamp(frame: pd.DataFrame, column: str, path: Path) -> pd.Series:
    """Unix seconds (integer or float), or an ISO-8601 date/time string."""
    raw = frame[column].str.strip()
    numeric = pd.to_numeric(raw, errors="coerce")
    # inf or 1e30 parse as numbers but are no time: int64 seconds would overflow or wrap.
    out_of_range = numeric.notna() & ~(numeric.abs() <= MAX_UNIX_SECONDS)
    if out_of_range.any():
        _first_bad(frame, out_of_range, path, column,
                   f"timestamp out of range (unix seconds within +-{MAX_UNIX_SECONDS:.0e} expected)")
    if numeric.notna().all():
        return np.floor(numeric).astype(np.int64)
    parsed = pd.to_datetime(raw.where(numeric.isna()), errors="coerce", utc=True, format="ISO8601")
    bad = numeric.isna() & parsed.isna()
    if bad.any():
        _first_bad(frame, bad, path, column,
                   "unparseable timestamp (expected unix seconds or an ISO-8601 date)")
    seconds = parsed.astype("datetime64[s, UTC]").astype(np.int64)
    return pd.Series(np.where(numeric.notna(), np.floor(numeric.fillna(0)), seconds), dtype=np.int64)


_YEAR_IN_TITLE = re.compile(r"\((\d{4})\)\s*$")


def year_from_title(title: str) -> int | None:
    match = _YEAR_IN_TITLE.search(title.strip())
    return int(match.group(1)) if match else None


def _interactions(frame: pd.DataFrame, path: Path, user: str, item: str, time: str,
                  rating: str | None) -> Interactions:
    table = pd.DataFrame({
        "user": parse_ids(frame, user, path),
        "item": parse_ids(frame, item, path),
        "timestamp": parse_timestamp(frame, time, path),
        "rating": parse_float(frame, rating, path) if rating else np.nan,
        "line": frame["line"],
    })
    return make_interactions(table, str(path))


# --------------------------------------------------------------------------- MovieLens

def read_ml100k(directory: Path) -> tuple[Interactions, Catalog]:
    directory = Path(directory)
    data_path, item_path = directory / "u.data", directory / "u.item"
    data = read_delimited(data_path, sep="\t", names=["user", "item", "rating", "timestamp"])
    interactions = _interactions(data, data_path, "user", "item", "timestamp", "rating")
    genre_names = list(ML100K_GENRES)
    names = ["item", "title", "release", "video_release", "url"] + genre_names
    items = read_delimited(item_path, sep="|", names=names, encoding="latin-1")
    flags = items[genre_names]
    bad = ~flags.isin(["0", "1"]).all(axis=1)
    if bad.any():
        row = items[bad].iloc[0]
        field = next(g for g in genre_names if row[g] not in ("0", "1"))
        raise DataError(f"genre flag must be 0 or 1, found {row[field]!r}",
                        file=item_path, line=int(row["line"]), field=field)
    flag_matrix = flags.to_numpy() == "1"
    genres = [tuple(g for g, on in zip(genre_names, row) if on) for row in flag_matrix]
    release = pd.to_datetime(items["release"], format="%d-%b-%Y", errors="coerce")
    catalog = pd.DataFrame({
        "item": parse_ids(items, "item", item_path),
        "title": items["title"].str.strip(),
        "genres": genres,
        "year": release.dt.year.astype("Int64"),
        "line": items["line"],
    })
    return interactions, make_catalog(catalog, str(item_path))


def read_movielens_csv(directory: Path) -> tuple[Interactions, Catalog]:
    """MovieLens latest, latest-small, 20M, 25M, 32M: ratings.csv + movies.csv (+ tags.csv)."""
    directory = Path(directory)
    ratings_path, movies_path = directory / "ratings.csv", directory / "movies.csv"
    cols = ["userId", "movieId", "rating", "timestamp"]
    ratings = read_delimited(ratings_path, sep=",", header=True, required=cols)
    interactions = _interactions(ratings, ratings_path, "userId", "movieId", "timestamp", "rating")
    movies = read_delimited(movies_path, sep=",", header=True,
                            required=["movieId", "title", "genres"])
    tags_by_item: dict[str, tuple[str, ...]] = {}
    tags_path = directory / "tags.csv"
    if tags_path.is_file():
        tags = read_delimited(tags_path, sep=",", header=True,
                              required=["userId", "movieId", "tag", "timestamp"])
        tags["tag"] = tags["tag"].str.strip().str.lower()
        tags = tags[tags["tag"] != ""]
        # Most frequent tags first; ten are enough to describe an item.
        counts = tags.groupby(["movieId", "tag"]).size().reset_index(name="n")
        counts = counts.sort_values(["movieId", "n", "tag"], ascending=[True, False, True])
        tags_by_item = {k: tuple(g["tag"].head(10)) for k, g in counts.groupby("movieId")}
    titles = movies["title"].str.strip()
    catalog = pd.DataFrame({
        "item": parse_ids(movies, "movieId", movies_path),
        "title": titles,
        "genres": [tuple(g for g in s.split("|") if g and g != "(no genres listed)")
                   for s in movies["genres"]],
        "year": pd.array([year_from_title(t) for t in titles], dtype="Int64"),
        "line": movies["line"],
    })
    catalog["tags"] = [tags_by_item.get(i, ()) for i in catalog["item"]]
    return interactions, make_catalog(catalog, str(movies_path))


def read_ml1m(directory: Path) -> tuple[Interactions, Catalog]:
    directory = Path(directory)
    ratings_path, movies_path = directory / "ratings.dat", directory / "movies.dat"
    ratings = read_delimited(ratings_path, sep="::", names=["user", "item", "rating", "timestamp"],
                             encoding="latin-1")
    interactions = _interactions(ratings, ratings_path, "user", "item", "timestamp", "rating")
    movies = read_delimited(movies_path, sep="::", names=["item", "title", "genres"],
                            encoding="latin-1")
    titles = movies["title"].str.strip()
    catalog = pd.DataFrame({
        "item": parse_ids(movies, "item", movies_path),
        "title": titles,
        "genres": [tuple(g for g in s.split("|") if g) for s in movies["genres"]],
        "year": pd.array([year_from_title(t) for t in titles], dtype="Int64"),
        "line": movies["line"],
    })
    return interactions, make_catalog(catalog, str(movies_path))


# --------------------------------------------------------------------------- RecBole atomic

def _atomic(path: Path) -> pd.DataFrame:
    """RecBole atomic file: tab-separated, header fields `name:type`; strip the types."""
    frame = read_delimited(path, sep="\t", header=True)
    frame.columns = [c.split(":")[0] if c != "line" else c for c in frame.columns]
    return frame


def read_recbole(inter_path: Path, item_path: Path | None = None) -> tuple[Interactions, Catalog | None]:
    inter_path = Path(inter_path)
    inter = _atomic(inter_path)
    for needed in ("user_id", "item_id", "timestamp"):
        if needed not in inter.columns:
            raise DataError(f"atomic header lacks '{needed}:...'", file=inter_path, line=1)
    interactions = _interactions(inter, inter_path, "user_id", "item_id", "timestamp",
                                 "rating" if "rating" in inter.columns else None)
    if item_path is None:
        return interactions, None
    item_path = Path(item_path)
    items = _atomic(item_path)
    title_col = next((c for c in items.columns if "title" in c), None)
    genre_col = next((c for c in items.columns if c in ("class", "genre", "genres")), None)
    year_col = next((c for c in items.columns if c in ("release_year", "year")), None)
    year = pd.to_numeric(items[year_col], errors="coerce") if year_col else pd.NA
    catalog = pd.DataFrame({
        "item": parse_ids(items, "item_id", item_path),
        "title": items[title_col].str.strip() if title_col else "",
        "genres": [tuple(s.split()) for s in items[genre_col]] if genre_col else None,
        "year": pd.array(year, dtype="Int64") if year_col else pd.NA,
        "line": items["line"],
    })
    return interactions, make_catalog(catalog, str(item_path))


# --------------------------------------------------------------------------- generic table

@dataclass(frozen=True)
class ColumnMap:
    """Which columns of a user's own table hold what."""
    user: str = "user"
    item: str = "item"
    timestamp: str = "timestamp"
    rating: str | None = None


def read_table(path: Path, columns: ColumnMap = ColumnMap()) -> Interactions:
    """A CSV (header line) or Parquet file of interactions with named columns."""
    path = Path(path)
    needed = [columns.user, columns.item, columns.timestamp] + ([columns.rating] if columns.rating else [])
    if path.suffix.lower() in (".parquet", ".pq"):
        if not path.is_file():
            raise DataError("file not found", file=path)
        try:
            frame = pd.read_parquet(path)
        except Exception as err:  # pyarrow raises several types for a corrupt file
            raise DataError(f"not a readable Parquet file: {err}", file=path) from None
        missing = [c for c in needed if c not in frame.columns]
        if missing:
            raise DataError(f"lacks column(s) {missing}; it has {list(frame.columns)}", file=path)
        rating = columns.rating or ("rating" if "rating" in frame.columns else None)
        frame = frame[needed + ([rating] if rating and rating not in needed else [])]
        empty = frame.isna()   # astype(str) would turn a missing id into the id "nan" or "None"
        if empty.to_numpy().any():
            row, column = np.argwhere(empty.to_numpy())[0]
            raise DataError("is empty", file=path, line=int(row) + 1, field=str(frame.columns[column]))
        frame = frame.astype(str)
        # Parquet has no lines: report the 1-based row number instead.
        frame["line"] = np.arange(len(frame), dtype=np.int64) + 1
    else:
        frame = read_delimited(path, sep=",", header=True, required=needed)
    # A column named "rating" is read when there is one (the documented user,item,timestamp[,rating]).
    rating = columns.rating or ("rating" if "rating" in frame.columns else None)
    return _interactions(frame, path, columns.user, columns.item, columns.timestamp, rating)


def read_catalog_table(path: Path, item: str = "item", title: str = "title",
                       genres: str | None = "genres", genre_sep: str = "|") -> Catalog:
    """A CSV item catalog with a header; genres are `genre_sep`-separated."""
    path = Path(path)
    frame = read_delimited(path, sep=",", header=True, required=[item, title])
    titles = frame[title].str.strip()
    catalog = pd.DataFrame({
        "item": parse_ids(frame, item, path),
        "title": titles,
        "genres": ([tuple(g for g in s.split(genre_sep) if g) for s in frame[genres]]
                   if genres and genres in frame.columns else None),
        "year": pd.array([year_from_title(t) for t in titles], dtype="Int64"),
        "line": frame["line"],
    })
    return make_catalog(catalog, str(path))
