import pandas as pd
import pytest

from fedrec.shared.data.preprocess import (encode, implicit, item_popularity, k_core, leave_one_out, newest,
                                    partition_by_user, prepare)
from fedrec.shared.data.schema import DataError, make_catalog, make_interactions


def events(rows):
    frame = pd.DataFrame(rows, columns=["user", "item", "timestamp", "rating"])
    return make_interactions(frame, "log.csv")


def catalog(items):
    return make_catalog(pd.DataFrame({"item": items}), "items.csv")


def test_implicit_keeps_earliest_duplicate_and_applies_threshold():
    ev = events([("u", "a", 1, 5), ("u", "a", 2, 1), ("u", "b", 3, 2)])
    assert list(implicit(ev).frame["timestamp"]) == [1, 3]
    assert list(implicit(ev, min_rating=4).frame["item"]) == ["a"]


def test_newest_keeps_each_users_most_recent_events():
    ev = events([("u", "a", 1, 1), ("u", "b", 2, 1), ("u", "c", 3, 1), ("v", "a", 5, 1), ("v", "d", 9, 1)])
    out = newest(ev, 2).frame
    assert list(zip(out["user"], out["item"])) == [("u", "b"), ("u", "c"), ("v", "a"), ("v", "d")]
    assert newest(ev, 0) is ev
    _, split = prepare(ev, catalog(["a", "b", "c", "d"]), last_events=3, user_core=3)
    assert [len(u.train) + 2 for u in split.users] == [3]      # v has 2 events: dropped by the 3-core


def test_k_core_iterates_until_stable():
    # item c has 1 user; dropping it leaves user y with 1 event, which must go too.
    ev = events([("x", "a", 1, 1), ("x", "b", 2, 1), ("y", "a", 1, 1), ("y", "c", 2, 1),
                 ("z", "a", 1, 1), ("z", "b", 2, 1)])
    out = k_core(ev, user_core=2, item_core=2).frame
    assert sorted(out["user"].unique()) == ["x", "z"]
    assert sorted(out["item"].unique()) == ["a", "b"]


def test_k_core_that_empties_everything_is_an_error():
    with pytest.raises(DataError, match="log.csv: no interactions left after 5-core"):
        k_core(events([("x", "a", 1, 1)]), user_core=5)


def test_leave_one_out_is_temporal_and_keeps_cold_items_indexed():
    ev = events([("u", "c", 30, 1), ("u", "a", 10, 1), ("u", "b", 20, 1), ("u", "d", 40, 1)])
    enc = encode(ev, catalog(["a", "b", "c", "d", "cold"]))
    assert enc.n_items == 5                       # "cold" has an index though no one used it
    split = leave_one_out(enc)
    user = split.users[0]
    assert list(user.train) == [1, 2] and user.valid == 3 and user.test == 4
    assert list(user.history_for_test) == [1, 2, 3]
    assert list(item_popularity(split)) == [0, 1, 1, 0, 0, 0]   # training events only


def test_user_left_too_short_by_filtering_is_named():
    ev = events([("u", "a", 1, 5), ("u", "b", 2, 5), ("u", "c", 3, 5),
                 ("v", "a", 1, 5), ("v", "b", 2, 1), ("v", "c", 3, 1)])
    enc = encode(implicit(ev, min_rating=4), catalog(["a", "b", "c"]))
    with pytest.raises(DataError, match=r"log.csv:\d+: field 'user': user 'v' has 1 interaction\(s\) left after filtering"):
        leave_one_out(enc)


def test_prepare_drops_short_users_by_default_and_partitions_one_per_user():
    ev = events([("u", "a", 1, 5), ("u", "b", 2, 5), ("u", "c", 3, 5), ("v", "a", 1, 5)])
    _, split = prepare(ev, catalog(["a", "b", "c"]))
    parts = partition_by_user(split)
    assert [p.user_id for p in parts] == ["u"]


def test_ml100k_split_matches_recbole_protocol():
    from fedrec.shared.data.datasets import load_dataset
    ds = load_dataset("ml-100k", allow_download=False)   # the copy the project installs
    enc, split = prepare(ds.interactions, ds.catalog)
    assert len(split) == 943 and split.n_items == 1682
    assert sum(len(u.train) for u in split.users) == 100_000 - 2 * 943


def test_validation_joins_training_for_the_test_stage_but_test_never_does():
    from fedrec.shared.data.preprocess import with_validation_in_train
    ev = events([("u", "a", 1, 1), ("u", "b", 2, 1), ("u", "c", 3, 1), ("u", "d", 4, 1)])
    split = leave_one_out(encode(ev, catalog(["a", "b", "c", "d"])))
    test_stage = with_validation_in_train(split)
    user = test_stage.users[0]
    assert list(user.train) == [1, 2, 3] and user.test == 4
    assert len(user.train_times) == len(user.train)
    assert list(split.users[0].train) == [1, 2]          # the original split is untouched


def test_rated_items_only_drops_catalog_items_nobody_touched(tmp_path):
    from fedrec.shared.data.pipeline import DataConfig, prepare_data
    (tmp_path / "log.csv").write_text("user,item,timestamp\n" + "".join(
        f"u{u},{item},{t}\n" for u in range(4) for t, item in enumerate(["a", "b", "c"])))
    (tmp_path / "items.csv").write_text("item,title\na,A\nb,B\nunrated,U\nc,C\n")
    every = prepare_data(DataConfig(dataset=str(tmp_path / "log.csv"), catalog=str(tmp_path / "items.csv"),
                                    text_encoder="none"))
    rated = prepare_data(DataConfig(dataset=str(tmp_path / "log.csv"), catalog=str(tmp_path / "items.csv"),
                                    text_encoder="none", rated_items_only=True))
    assert every.split.n_items == 4 and rated.split.n_items == 3
    assert list(rated.encoded.item_ids) == ["a", "b", "c"]
    assert rated.features.matrix.shape[0] == every.features.matrix.shape[0] - 1   # one content row per item


def test_the_data_report_says_what_each_step_did():
    """Issue 19: 514 events became 388 and nothing said so. The report counts every step."""
    from fedrec.shared.data.preprocess import describe_report
    ev = events([("u", "a", 1, 5), ("u", "a", 2, 5), ("u", "b", 3, 1), ("u", "c", 4, 5), ("u", "d", 5, 5),
                 ("v", "a", 6, 5), ("w", "a", 1, 5), ("w", "c", 2, 5), ("w", "d", 3, 5)])
    report = {}
    prepare(ev, catalog(["a", "b", "c", "d", "e"]), min_rating=2, user_core=3, report=report)
    assert report["below_min_rating"] == 1 and report["repeats_collapsed"] == 1
    assert report["core_dropped"] == {"events": 1, "users": 1, "items": 0}      # v: one event
    assert report["steps"]["core"] == {"events": 6, "users": 2, "items": 3}
    assert report["catalog_items_without_events"] == 2                           # b (rated 1) and e
    line = describe_report(report)
    assert "9 events read" in line and "1 below --min-rating 2" in line and "1 users and 0 items (1 events)" in line


def test_own_column_names_and_dropping_unknown_items_counted(tmp_path):
    """Issue 19: column names are a flag, and an item missing from the catalog can be dropped
    (counted) instead of stopping the run."""
    from fedrec.shared.data.pipeline import DataConfig, prepare_data
    from fedrec.shared.data.preprocess import describe_report
    from fedrec.shared.settings import check
    rows = [(u, i, t) for u in ("u1", "u2") for t, i in enumerate(("a", "b", "c", "d"))] + [("u1", "zz", 9)]
    pd.DataFrame(rows, columns=["user_id", "item_id", "ts"]).to_csv(tmp_path / "log.csv", index=False)
    pd.DataFrame({"item": list("abcd"), "title": list("ABCD")}).to_csv(tmp_path / "items.csv", index=False)
    cfg = DataConfig(dataset=str(tmp_path / "log.csv"), catalog=str(tmp_path / "items.csv"), text_encoder="none",
                     columns="user=user_id,item=item_id,timestamp=ts")
    with pytest.raises(DataError, match="unknown item 'zz'"):
        prepare_data(cfg)
    prepared = prepare_data(DataConfig(**{**cfg.to_dict(), "drop_unknown_items": True}))
    assert prepared.report["unknown_items_dropped"] == 1 and len(prepared.split) == 2
    assert "1 dropped: their item is not in the catalog" in describe_report(prepared.report)
    with pytest.raises(Exception, match="use FIELD=COLUMN"):
        check({"columns": "user=uid,who=x"})
