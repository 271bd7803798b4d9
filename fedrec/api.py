"""fedrec from Python (docs/api.md): `train` on a DataFrame or a file, then `recommend`,
`similar_items`, `save` and `load`, like implicit's fit / recommend / similar_items.

A thin layer over what the command line runs: the same settings table (shared/settings.py),
the same jobs and the same run folder (summary.json, bundle/). A DataFrame is written into the
run folder first (OUT/input/), so a run from Python is reproducible and resumable like one
from a file, and a mistake in it is reported as a row of that file.
"""
from __future__ import annotations

import hashlib
import numbers
import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from fedrec.shared.data.schema import DataError
from fedrec.shared.errors import UserFileError
from fedrec.shared.settings import SETTINGS, SettingsError, check, column_problem

MODES = ("centralized", "federated")
_TRAIN_GROUPS = ("data", "model", "train")
_FROM_ARGUMENTS = ("dataset", "catalog", "columns")   # train's own arguments, not settings


def _settings(mode: str, given: dict) -> dict:
    """Every setting the mode uses, defaults overridden by `given` (Python names: clients_per_round),
    each given value of its setting's type (SettingsError naming the key if not)."""
    if mode not in MODES:
        raise SettingsError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    usable = {s.dest: s for s in SETTINGS if s.cli and s.key not in _FROM_ARGUMENTS
              and (mode == "federated" or s.group in _TRAIN_GROUPS)}
    unknown = sorted(set(given) - set(usable))
    if unknown:
        raise SettingsError(f"unknown setting(s) for mode={mode!r}: {unknown}; see `fedrec train --help` "
                            "(a flag --clients-per-round is clients_per_round here)")
    values = {s.key: _typed(s, given[dest]) if dest in given else s.default for dest, s in usable.items()}
    check(values)
    if mode == "federated" and values["privacy"] != "none" and values["private-model"] == "item-item":
        raise SettingsError("private_model='item-item' (the default with privacy) publishes no model bundle yet, "
                            "so there would be no Model to return: use private_model='encoder', or the command line")
    return values


def _typed(setting, value):
    """`value` as the setting's type; a string for a number or a flag is refused, not parsed
    ("false" would otherwise be true)."""
    kind = setting.type
    if value is None and setting.optional:
        return None
    fits = (isinstance(value, bool) if kind is bool else
            isinstance(value, numbers.Integral) and not isinstance(value, bool) if kind is int else
            isinstance(value, numbers.Real) and not isinstance(value, bool) if kind is float else
            isinstance(value, (str, os.PathLike)))
    if not fits:
        raise SettingsError(f"{setting.dest}: expected {kind.__name__}, not {value!r}")
    return os.fspath(value) if kind is str else kind(value)


def _write_inputs(interactions: pd.DataFrame, catalog, columns: dict, folder: Path) -> tuple[str, str | None]:
    """The DataFrames as files the readers check, named by their content (a run taken up again with
    other data never overwrites the input of the first; the store's stamp then refuses it). Only the
    columns a run reads are written (`interactions` holds only those). Parquet keeps the types; an
    error names its 1-based row."""
    events = _content_named(folder, "interactions", ".parquet",
                            lambda path: interactions.reset_index(drop=True).to_parquet(path, index=False))
    if catalog is None:
        return events, None
    if not isinstance(catalog, pd.DataFrame):
        return events, str(catalog)
    items = catalog.rename(columns={columns.get("item", "item"): "item"}).reset_index(drop=True)
    items = items[[c for c in ("item", "title", "genres") if c in items.columns]].copy()
    if "genres" in items.columns:   # a list per item, or a string already joined with "|"
        items["genres"] = ["" if _no_genre(g) else g if isinstance(g, str) else "|".join(map(str, g))
                           for g in items["genres"]]
    return events, _content_named(folder, "catalog", ".csv", lambda path: items.to_csv(path, index=False))


def _columns_read(interactions: pd.DataFrame, columns: dict) -> list[str]:
    """The columns a run reads (DataError naming those it lacks)."""
    wanted = [columns.get(k, k) for k in ("user", "item", "timestamp")]
    rating = columns.get("rating", "rating")
    wanted += [rating] if "rating" in columns or rating in interactions.columns else []
    missing = [c for c in wanted if c not in interactions.columns]
    if missing:
        raise DataError(f"lacks column(s) {missing}; it has {list(interactions.columns)}", file="the interactions DataFrame")
    return wanted


def _no_genre(g) -> bool:
    return g is None or (not isinstance(g, (list, tuple, set, str)) and bool(pd.isna(g)))


def _content_named(folder: Path, stem: str, suffix: str, write) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    scratch = folder / f".{stem}.writing{suffix}"
    write(scratch)
    digest = hashlib.sha256(scratch.read_bytes()).hexdigest()[:12]
    final = folder / f"{stem}-{digest}{suffix}"
    scratch.replace(final)
    return str(final)


def train(interactions, catalog=None, *, mode: str = "centralized", out=None, columns: dict | None = None,
          progress: bool = True, **settings) -> "Model":
    """Train and publish a model; returns it ready to recommend.

    interactions: a DataFrame with columns user, item, timestamp (and rating, optional), or a
        path or dataset name as `fedrec train --dataset` takes (ml-100k, synthetic:500x300, a CSV).
    catalog: a DataFrame with item, title (and genres: a list or "a|b"), or a CSV path.
    columns: other column names, e.g. {"user": "uid", "item": "iid", "timestamp": "ts"}.
    settings: any `fedrec train` flag in Python form (rounds=20, clients_per_round=10, epochs=5).
    out: the run folder (summary.json, bundle/); a new temporary folder if not given.
    """
    values = _settings(mode, settings)
    columns = dict(columns or {})
    spec = ",".join(f"{k}={v}" for k, v in columns.items()) or None
    problem = column_problem(spec)
    if problem:
        raise SettingsError(f"columns: {problem}")
    if not isinstance(interactions, (pd.DataFrame, str, os.PathLike)):
        raise TypeError(f"interactions: a pandas DataFrame, a path or a dataset name, not {type(interactions).__name__}")
    if isinstance(catalog, pd.DataFrame) and not isinstance(interactions, pd.DataFrame):
        raise SettingsError("a catalog DataFrame goes with an interactions DataFrame; give both as paths instead")
    wanted = _columns_read(interactions, columns) if isinstance(interactions, pd.DataFrame) else None  # before any write
    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="fedrec-run-"))
    if wanted is not None:
        interactions, catalog = _write_inputs(interactions[wanted], catalog, columns, out / "input")
    values.update({"dataset": str(interactions), "catalog": None if catalog is None else str(catalog), "columns": spec})
    check(values)
    run_job(mode, values, out, progress=progress)
    model = Model.load(out)
    model.histories = _histories(values, model.recommender.index)
    return model


def run_job(mode: str, values: dict, out: Path, *, progress: bool, verbose: bool = False) -> dict:
    """Train in `mode` from setting keys (checked); returns the summary written to OUT/summary.json.
    The one place both `fedrec train` and `fedrec.train` start a job."""
    if mode == "federated":
        from fedrec.shared.console import tame_library_output
        from fedrec.simulation.federated import FederatedJob, run_federated
        tame_library_output(verbose)
        return run_federated(FederatedJob.from_settings(values), out, progress=progress)
    from fedrec.simulation.centralized import CentralizedJob, run_centralized
    return run_centralized(CentralizedJob.from_settings(values), out, progress=progress)


def _histories(values: dict, known: dict) -> dict[str, list[str]]:
    """Each user's items, oldest first, as the run read them (ids stripped, events below
    --min-rating, repeats and items the model does not know left out): what `recommend(user=...)`
    starts from. Only for a file of events (a DataFrame is one); {} for a named dataset."""
    from fedrec.shared.data.pipeline import column_map
    from fedrec.shared.data.preprocess import implicit, newest
    from fedrec.shared.data.readers import read_table
    path = Path(values["dataset"])
    if not path.is_file():
        return {}
    read = read_table(path, column_map(values["columns"]))
    frame = newest(implicit(read, values["min-rating"]), values["last-events"]).frame
    frame = frame[frame["item"].isin(set(known))]
    return {str(u): list(g["item"].astype(str)) for u, g in frame.groupby("user", sort=False)}


class Model:
    """A trained model: the run's published bundle and its summary.

    A saved model is the bundle and summary.json only: it holds nobody's history, so after
    `load` pass the history to `recommend`. Users' histories are kept in memory by `train`
    (from the DataFrame it was given) so that `recommend(user=...)` works in that session.
    """

    def __init__(self, recommender, summary: dict, folder: Path):
        self.recommender = recommender
        self.summary = summary
        self.folder = folder
        self.histories: dict[str, list[str]] = {}

    @classmethod
    def load(cls, folder) -> "Model":
        """A run folder, or a folder written by `save` (the same layout: summary.json, bundle/)."""
        import json
        from fedrec.shared.recommend import Recommender
        folder = Path(folder)
        summary_file = folder / "summary.json"
        if not summary_file.is_file() or not (folder / "bundle").is_dir():
            raise UserFileError(f"{folder}: not a fedrec model (summary.json and bundle/ expected)")
        return cls(Recommender.load(folder / "bundle"), json.loads(summary_file.read_text()), folder)

    def save(self, folder) -> Path:
        """The bundle and summary.json into `folder` (created; an existing model there is replaced)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if (folder / "bundle").resolve() != (self.folder / "bundle").resolve():
            shutil.rmtree(folder / "bundle", ignore_errors=True)
            shutil.copytree(self.folder / "bundle", folder / "bundle")
            shutil.copy(self.folder / "summary.json", folder / "summary.json")
        return folder

    def recommend(self, user=None, n: int = 10, *, history=None, exclude=(), diversity: float = 0.0,
                  explain: bool = False) -> pd.DataFrame:
        """Top n for a user the model was trained with (by id) or for a history of item ids,
        oldest first. Items in the history are never recommended. Columns: item, title, score
        (and because: the history items that explain it, with explain=True)."""
        if (user is None) == (history is None):
            raise ValueError("give either a user id or a history of item ids (one of them)")
        if user is not None:
            if str(user) not in self.histories:
                raise KeyError(f"user {user!r} is not among the users this model was trained with in this "
                               "session; pass history=[item ids] instead")
            history = self.histories[str(user)]
        found = self.recommender.recommend([str(i) for i in history], n, exclude=[str(i) for i in exclude],
                                           diversity=diversity, explain=explain)
        rows = [{"item": r.item_id, "title": r.title, "score": r.score} |
                ({"because": [b.item_id for b in r.because]} if explain else {}) for r in found]
        return pd.DataFrame(rows, columns=["item", "title", "score"] + (["because"] if explain else []))

    def similar_items(self, item, n: int = 10) -> pd.DataFrame:
        """The n items whose item vectors are closest (cosine) to `item`'s."""
        rows = [{"item": r.item_id, "title": r.title, "score": r.score}
                for r in self.recommender.similar_items(str(item), n)]
        return pd.DataFrame(rows, columns=["item", "title", "score"])

    @property
    def metrics(self) -> dict:
        """The test metrics the run measured (NDCG@10, HR@10, ...), as in summary.json."""
        return self.summary.get("metrics", {})
