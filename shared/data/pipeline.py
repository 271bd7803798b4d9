"""One call from a dataset argument to what training needs: split + content features.

The dataset argument is one of
  - a registered name (`ml-100k`, `ml-latest-small`, `ml-1m`, `ml-20m`, `ml-25m`)
  - `synthetic:USERSxITEMS[:EVENTS]` (e.g. `synthetic:1000x2000`; `synthetic:1500x900:6` for a sparse
    log, EVENTS the median history length, default 20)
  - a folder in a known format (MovieLens 100K / 1M / CSV, RecBole atomic files)
  - a CSV or Parquet file of interactions (columns user, item, timestamp[, rating] unless
    mapped otherwise), with an optional catalog CSV
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pandas as pd

from fedrec.shared.data.datasets import REGISTRY, cache_dir, load_dataset
from fedrec.shared.data.features import ContentFeatures, build_features
from fedrec.shared.data.preprocess import Encoded, Split, item_activity, items_in_log, prepare
from fedrec.shared.data.readers import (ColumnMap, read_catalog_table, read_ml100k, read_ml1m,
                            read_movielens_csv, read_recbole, read_table)
from fedrec.shared.data.schema import DataError, Dataset, Interactions, check_items_known, make_catalog
from fedrec.shared.data.synthetic import generate
from fedrec.shared.settings import default


@dataclass
class DataConfig:
    dataset: str = default("dataset")
    data_dir: str | None = None
    catalog: str | None = None          # catalog CSV for a generic interactions file
    columns: str | None = None          # a generic file's column names: "user=uid,item=iid,timestamp=ts"
    drop_unknown_items: bool = False    # drop (count) events whose item the catalog lacks, instead of an error
    min_rating: float | None = None     # None: every interaction is a positive
    user_core: int = default("user-core")
    item_core: int = default("item-core")
    text_encoder: str = default("text-encoder")  # or "none"
    activity_features: bool = default("activity-features")  # popularity/recency from the training log
    rated_items_only: bool = default("rated-items-only")  # rank only items with an interaction in the log
    last_events: int = default("last-events")  # keep each user's newest this many events (0: all)
    allow_download: bool = default("download")
    seed: int = default("seed")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_settings(cls, v: dict, *, activity_features: bool | None = None) -> "DataConfig":
        """From setting keys (shared/settings.py); the federation has no central log, so no
        activity (popularity, recency) features there."""
        return cls(dataset=v["dataset"], data_dir=v["data-dir"], catalog=v["catalog"], min_rating=v["min-rating"],
                   user_core=v["user-core"], item_core=v["item-core"], text_encoder=v["text-encoder"],
                   activity_features=v["activity-features"] if activity_features is None else activity_features,
                   allow_download=v["download"], seed=v["seed"],
                   rated_items_only=v["rated-items-only"], last_events=v["last-events"],
                   columns=v.get("columns"), drop_unknown_items=v.get("drop-unknown-items", False))


@dataclass
class PreparedData:
    dataset: Dataset
    encoded: Encoded
    split: Split
    features: ContentFeatures
    report: dict = field(default_factory=dict)   # what was done to the data (preprocess.data_report)


_SYNTHETIC = re.compile(r"^synthetic:(\d+)x(\d+)(?::(\d+(?:\.\d+)?))?$")


def load_any(cfg: DataConfig) -> Dataset:
    name = cfg.dataset
    data_dir = Path(cfg.data_dir) if cfg.data_dir else None
    if (cfg.columns or cfg.drop_unknown_items) and not Path(name).is_file():
        raise DataError("--columns and --drop-unknown-items apply to a CSV or Parquet file of your own, "
                        "not to a registered, synthetic or folder dataset", file=name)
    if name in REGISTRY:
        return load_dataset(name, data_dir, allow_download=cfg.allow_download)
    if match := _SYNTHETIC.match(name):
        events = {"mean_events": float(match.group(3))} if match.group(3) else {}
        return generate(int(match.group(1)), int(match.group(2)), seed=cfg.seed, **events)
    path = Path(name)
    if path.is_dir():
        interactions, catalog = _read_folder(path)
    elif path.is_file():
        interactions = read_table(path, column_map(cfg.columns))
        if cfg.catalog:
            catalog = read_catalog_table(Path(cfg.catalog))
        else:
            catalog = _catalog_of_seen_items(interactions)
    else:
        raise DataError(f"not a known dataset ({', '.join(REGISTRY)}, synthetic:UxI) and no such "
                        f"file or folder", file=name)
    if cfg.drop_unknown_items:
        known = interactions.frame["item"].isin(catalog.frame.index)
        unknown_items_dropped = int((~known).sum())
        interactions = Interactions(interactions.frame[known].reset_index(drop=True), interactions.source)
        if interactions.frame.empty:
            raise DataError(f"every one of its {unknown_items_dropped} events names an item the catalog "
                            f"({cfg.catalog}) lacks", file=name)
    check_items_known(interactions, catalog)
    return Dataset(path.name, interactions, catalog, unknown_items_dropped if cfg.drop_unknown_items else 0)


def column_map(spec: str | None) -> ColumnMap:
    """--columns user=uid,item=iid,timestamp=ts[,rating=stars] (checked by the settings table)."""
    if not spec:
        return ColumnMap()
    pairs = dict(pair.split("=", 1) for pair in spec.split(","))
    return ColumnMap(**{k.strip(): v.strip() for k, v in pairs.items()})


def _catalog_of_seen_items(interactions):
    """No catalog given: the items seen are the catalog, with no content."""
    items = pd.DataFrame({"item": sorted(interactions.frame["item"].unique())})
    return make_catalog(items, interactions.source)


def _read_folder(folder: Path):
    if (folder / "u.data").is_file():
        return read_ml100k(folder)
    if (folder / "ratings.dat").is_file():
        return read_ml1m(folder)
    if (folder / "ratings.csv").is_file():
        return read_movielens_csv(folder)
    inter = sorted(folder.glob("*.inter"))
    if inter:
        item = inter[0].with_suffix(".item")
        interactions, catalog = read_recbole(inter[0], item if item.is_file() else None)
        return interactions, catalog if catalog is not None else _catalog_of_seen_items(interactions)
    raise DataError("folder has none of u.data, ratings.dat, ratings.csv or *.inter", file=folder)


def prepare_data(cfg: DataConfig, *, show_progress: bool = False) -> PreparedData:
    dataset = load_any(cfg)
    if cfg.rated_items_only:
        dataset = replace(dataset, catalog=items_in_log(dataset.catalog, dataset.interactions))
    report: dict = {}
    encoded, split = prepare(dataset.interactions, dataset.catalog, min_rating=cfg.min_rating,
                             user_core=cfg.user_core, item_core=cfg.item_core, last_events=cfg.last_events,
                             report=report)
    report["unknown_items_dropped"] = dataset.unknown_items_dropped
    activity = item_activity(split) if cfg.activity_features else None
    features = build_features(dataset.catalog, activity, text_encoder=cfg.text_encoder,
                              cache_dir=cache_dir() / "features", show_progress=show_progress)
    return PreparedData(dataset, encoded, split, features, report)
