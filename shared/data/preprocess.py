"""From raw events to what the model trains on.

  implicit()          events -> positive feedback (optionally ratings >= a threshold), one per
                      (user, item), the earliest kept
  newest()            each user's newest N events (a sparse log cut from a dense one)
  k_core()            drop users / items with too few events, repeated until stable
  encode()            catalog order -> item index 1..n (0 is padding); users -> time-ordered
                      sequences of item indices
  leave_one_out()     each user's last item is test, second-last validation, the rest train
  partition_by_user() one partition per user: what one federated client will hold

Every catalog item keeps an index even if no one touched it: those are the cold items the
content features must carry.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from fedrec.shared.data.schema import Catalog, DataError, Interactions

MIN_EVENTS_FOR_SPLIT = 3  # one train item at least, one validation, one test


def implicit(interactions: Interactions, min_rating: float | None = None) -> Interactions:
    frame = interactions.frame
    if min_rating is not None:
        frame = frame[frame["rating"] >= min_rating]
    frame = frame.drop_duplicates(["user", "item"], keep="first")  # sorted by time: earliest
    return Interactions(frame.reset_index(drop=True), interactions.source)


def newest(interactions: Interactions, n: int) -> Interactions:
    """Each user's newest `n` events (all when n is 0): a sparse log derived from a dense one, the
    same users and their most recent behaviour."""
    if not n:
        return interactions
    frame = interactions.frame
    keep = frame.groupby("user", sort=False).cumcount(ascending=False) < n   # sorted by time: newest last
    return Interactions(frame[keep].reset_index(drop=True), interactions.source)


def k_core(interactions: Interactions, user_core: int = 0, item_core: int = 0) -> Interactions:
    """Keep users with >= user_core events and items with >= item_core, until both hold."""
    frame = interactions.frame
    while True:
        users = frame["user"].map(frame["user"].value_counts()) >= user_core
        items = frame["item"].map(frame["item"].value_counts()) >= item_core
        keep = users & items
        if keep.all():
            break
        frame = frame[keep]
    if frame.empty:
        raise DataError(f"no interactions left after {user_core}-core users / {item_core}-core "
                        f"items filtering", file=interactions.source)
    return Interactions(frame.reset_index(drop=True), interactions.source)


@dataclass(frozen=True)
class Encoded:
    """Integer view of a dataset. Item index i (1..n_items) is catalog row i-1; 0 pads."""
    item_ids: np.ndarray          # (n_items,) original ids, catalog order
    user_ids: np.ndarray          # (n_users,) original ids
    sequences: list[np.ndarray]   # per user: item indices in time order
    timestamps: list[np.ndarray]  # per user: unix seconds, aligned with sequences
    first_lines: np.ndarray       # per user: source line of their first event (for errors)
    source: str

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)


def encode(interactions: Interactions, catalog: Catalog) -> Encoded:
    item_index = pd.Series(np.arange(1, len(catalog) + 1), index=catalog.frame["item"].to_numpy())
    frame = interactions.frame
    indices = item_index.reindex(frame["item"].to_numpy()).to_numpy()
    if np.isnan(indices.astype(float)).any():
        raise DataError("interactions name items outside the catalog; validate first",
                        file=interactions.source)
    frame = frame.assign(index=indices.astype(np.int64))
    groups = frame.groupby("user", sort=True)
    return Encoded(
        item_ids=catalog.frame["item"].to_numpy(),
        user_ids=np.array(list(groups.groups.keys())),
        sequences=[g["index"].to_numpy() for _, g in groups],
        timestamps=[g["timestamp"].to_numpy() for _, g in groups],
        first_lines=groups["line"].min().to_numpy(),
        source=interactions.source,
    )


@dataclass(frozen=True)
class UserSplit:
    """One user's private log, split in time. This is exactly what one client holds."""
    user_id: str
    train: np.ndarray        # item indices, time order
    valid: int               # second-last item
    test: int                # last item
    train_times: np.ndarray  # unix seconds of the training events

    @property
    def history_for_test(self) -> np.ndarray:
        return np.append(self.train, self.valid)


@dataclass(frozen=True)
class Split:
    users: list[UserSplit]
    n_items: int

    def __len__(self) -> int:
        return len(self.users)


def leave_one_out(encoded: Encoded) -> Split:
    """Temporal leave-one-out. A user with fewer than 3 events cannot be split: that is an
    error naming the user (drop such users first with `k_core(user_core=3)`)."""
    users = []
    for user_id, seq, times, line in zip(encoded.user_ids, encoded.sequences, encoded.timestamps,
                                         encoded.first_lines):
        if len(seq) < MIN_EVENTS_FOR_SPLIT:
            raise DataError(f"user {str(user_id)!r} has {len(seq)} interaction(s) left after "
                            f"filtering; leave-one-out needs {MIN_EVENTS_FOR_SPLIT} (raise "
                            f"--user-core to drop such users)", file=encoded.source,
                            line=int(line), field="user")
        users.append(UserSplit(str(user_id), seq[:-2], int(seq[-2]), int(seq[-1]), times[:-2]))
    return Split(users, encoded.n_items)


def with_validation_in_train(split: Split) -> Split:
    """The split as the test stage sees it: each user's validation item appended to training
    (its time approximated by the last training time). Test items stay held out."""
    users = [UserSplit(u.user_id, u.history_for_test, u.valid, u.test,
                       np.append(u.train_times, u.train_times[-1] if len(u.train_times) else 0))
             for u in split.users]
    return Split(users, split.n_items)


def partition_by_user(split: Split) -> list[UserSplit]:
    """One partition per user, in user-id order: partition i is client i's whole private log."""
    return list(split.users)


def item_popularity(split: Split) -> np.ndarray:
    """Training-interaction count per item index (0..n_items; index 0 is padding, count 0).
    Only training events count: the held-out items must not leak into features."""
    counts = np.zeros(split.n_items + 1, dtype=np.int64)
    for user in split.users:
        np.add.at(counts, user.train, 1)
    return counts


@dataclass(frozen=True)
class ItemActivity:
    """What the training events say about each item (index 0..n_items; 0 pads)."""
    count: np.ndarray        # training interactions
    last_seen: np.ndarray    # unix seconds of the newest one (NaN: never)
    mean_time: np.ndarray    # mean unix seconds (NaN: never)
    end_time: float          # newest training event overall


def item_activity(split: Split) -> ItemActivity:
    items = np.concatenate([u.train for u in split.users])
    times = np.concatenate([u.train_times for u in split.users]).astype(np.float64)
    n = split.n_items + 1
    count = item_popularity(split)
    last = np.full(n, -np.inf)
    np.maximum.at(last, items, times)
    total = np.bincount(items, weights=times, minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    last = np.where(np.isfinite(last), last, np.nan)
    return ItemActivity(count, last, mean, float(times.max()) if len(times) else 0.0)


def items_in_log(catalog: Catalog, interactions: Interactions) -> Catalog:
    """The catalog cut to the items the log has an event for (in file order): what RecBole ranks.
    ML-1M's movies.dat, for one, lists movies nobody rated; ranking them too makes figures
    incomparable with papers that do not."""
    seen = catalog.frame["item"].isin(set(interactions.frame["item"]))
    return Catalog(catalog.frame[seen].reset_index(drop=True), catalog.source)


def prepare(interactions: Interactions, catalog: Catalog, *, min_rating: float | None = None,
            user_core: int = MIN_EVENTS_FOR_SPLIT, item_core: int = 0,
            last_events: int = 0, report: dict | None = None) -> tuple[Encoded, Split]:
    """The standard pipeline: implicit -> (each user's newest events) -> k-core -> encode -> leave-one-out.
    `report`, when given, is filled with what each step did to the data (data_report)."""
    rated = interactions
    if min_rating is not None:
        rated = Interactions(interactions.frame[interactions.frame["rating"] >= min_rating], interactions.source)
    events = implicit(rated)
    if events.frame.empty:
        raise DataError(f"no interactions with rating >= {min_rating}", file=interactions.source)
    trimmed = newest(events, last_events)
    cored = k_core(trimmed, user_core, item_core)
    encoded = encode(cored, catalog)
    if report is not None:
        report.update(data_report(interactions, rated, events, trimmed, cored, catalog, min_rating=min_rating,
                                  user_core=user_core, item_core=item_core, last_events=last_events))
    return encoded, leave_one_out(encoded)


def data_report(read: Interactions, rated: Interactions, events: Interactions, trimmed: Interactions,
                cored: Interactions, catalog: Catalog, **settings) -> dict:
    """What was done to the data, step by step, in counts a person can check against their file."""
    def shape(x: Interactions) -> dict:
        f = x.frame
        return {"events": int(len(f)), "users": int(f["user"].nunique()), "items": int(f["item"].nunique())}
    steps = {"read": shape(read), "rated": shape(rated), "implicit": shape(events), "newest": shape(trimmed),
             "core": shape(cored)}
    return {
        "settings": settings, "steps": steps,
        "below_min_rating": steps["read"]["events"] - steps["rated"]["events"],
        "repeats_collapsed": steps["rated"]["events"] - steps["implicit"]["events"],
        "older_than_last_events": steps["implicit"]["events"] - steps["newest"]["events"],
        "core_dropped": {k: steps["newest"][k] - steps["core"][k] for k in ("events", "users", "items")},
        "catalog_items": int(len(catalog.frame)),
        "catalog_items_without_events": int(len(catalog.frame)) - steps["core"]["items"],
    }


def describe_report(r: dict) -> str:
    """One line for a person: what came in, what went, what is left."""
    s, cut = r["steps"], r["core_dropped"]
    unknown = r.get("unknown_items_dropped", 0)
    parts = [f"{s['read']['events'] + unknown:,} events read"]
    if unknown:
        parts.append(f"{unknown:,} dropped: their item is not in the catalog")
    parts[0] += f" ({s['read']['users']:,} users, {s['read']['items']:,} items)"
    if r["below_min_rating"]:
        lost = s["read"]["users"] - s["rated"]["users"]
        parts.append(f"{r['below_min_rating']:,} below --min-rating {r['settings']['min_rating']}"
                     + (f" ({lost:,} users with none left)" if lost else ""))
    parts.append(f"{r['repeats_collapsed']:,} repeated user-item events collapsed to the earliest")
    if r["older_than_last_events"]:
        parts.append(f"{r['older_than_last_events']:,} older than each user's newest {r['settings']['last_events']}")
    parts.append(f"{cut['users']:,} users and {cut['items']:,} items ({cut['events']:,} events) dropped by "
                 f"--user-core {r['settings']['user_core']} / --item-core {r['settings']['item_core']}")
    core = s["core"]
    return "data: " + "; ".join(parts) + f"; kept {core['events']:,} events of {core['users']:,} users on " \
        f"{core['items']:,} items (catalog {r['catalog_items']:,})"
