"""The Python API (docs/api.md, fedrec/api.py): the documented example runs as written."""
import re
from pathlib import Path

import pandas as pd
import pytest

import fedrec
from fedrec.shared.data.schema import DataError
from fedrec.shared.settings import SettingsError

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_the_documented_example_runs(tmp_path, monkeypatch, capsys):
    example = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(example, str(DOC), "exec"), scope)
    model, again = scope["model"], scope["again"]
    assert 0 < model.metrics["ndcg@10"] <= 1
    assert model.summary == again.summary and (tmp_path / "runs/api-model/bundle/manifest.json").is_file()
    # The user's history is never recommended back, with or without reasons.
    seven = scope["events"].query("user == 7")["item"].astype(str)
    top = model.recommend(user=7, n=5)
    assert list(top.columns) == ["item", "title", "score"] and len(top) == 5 and not set(top["item"]) & set(seven)
    explained = model.recommend(history=[10, 12, 15], n=5, explain=True)
    assert not {"10", "12", "15"} & set(explained["item"])
    assert all(set(b) <= {"10", "12", "15"} for b in explained["because"])
    # A saved model recommends exactly what the one in memory does, and holds nobody's history.
    pd.testing.assert_frame_equal(again.recommend(history=[10, 12, 15], n=5),
                                  model.recommend(history=[10, 12, 15], n=5))
    assert again.histories == {}
    with pytest.raises(KeyError, match="not among the users"):
        again.recommend(user=7)
    assert list(model.similar_items(12, n=5).columns) == ["item", "title", "score"]


def test_a_wrong_setting_is_named_before_anything_runs(tmp_path):
    events = pd.DataFrame({"user": [1, 1, 1], "item": [1, 2, 3], "timestamp": [1, 2, 3]})
    with pytest.raises(SettingsError, match="unknown setting.*'rounds'"):
        fedrec.train(events, rounds=3, out=tmp_path / "a")     # rounds is a federated setting
    with pytest.raises(SettingsError, match="--epochs"):
        fedrec.train(events, epochs=0, out=tmp_path / "b")
    with pytest.raises(SettingsError, match="content: expected bool, not 'false'"):   # never a truthy string
        fedrec.train(events, content="false", out=tmp_path / "c")
    with pytest.raises(SettingsError, match="epochs: expected int, not '3'"):
        fedrec.train(events, epochs="3", out=tmp_path / "d")
    with pytest.raises(SettingsError, match="private_model='item-item'"):
        fedrec.train(events, mode="federated", privacy="record", out=tmp_path / "e")
    with pytest.raises(SettingsError, match="columns"):
        fedrec.train(events, columns={"who": "user"}, out=tmp_path / "f")
    assert not any((tmp_path / x).exists() for x in "abcdef")


def test_a_bad_row_in_a_dataframe_is_named(tmp_path):
    missing = pd.DataFrame({"user": [1, None, 1], "item": [1, 2, 3], "timestamp": [1, 2, 3]})
    with pytest.raises(DataError, match=r"interactions-\w+\.parquet:2: field 'user': is empty"):   # not the id "nan"
        fedrec.train(missing, out=tmp_path / "nan")
    events = pd.DataFrame({"user": [1, 1, 1], "item": [1, 2, 3], "timestamp": ["1", "soon", "3"]})
    with pytest.raises(DataError, match=r"interactions-\w+\.parquet:2: field 'timestamp'"):
        fedrec.train(events, out=tmp_path / "run")


def test_histories_are_the_log_as_the_run_read_it(tmp_path):
    """recommend(user=...) starts from what the run read: other column names, ids stripped, repeats
    and items the catalog lacks (dropped on request) left out, oldest first."""
    events = pd.DataFrame({"uid": ["a", "a", "a", " a", "a", "b", "b", "b"], "iid": [3, 2, 2, 1, 9, 1, 2, 3],
                           "ts": [4, 2, 3, 1, 5, 1, 2, 3], "notes": ["private"] * 8})
    items = pd.DataFrame({"iid": [1, 2, 3, 4, 5], "title": list("ABCDE"),
                          "genres": pd.array(["x", None, "x|y", "", "y"], dtype="string")})
    model = fedrec.train(events, catalog=items, columns={"user": "uid", "item": "iid", "timestamp": "ts"},
                         drop_unknown_items=True, epochs=1, text_encoder="none", progress=False,
                         out=tmp_path / "run")
    assert model.histories == {"a": ["1", "2", "3"], "b": ["1", "2", "3"]}
    written = pd.read_parquet(next((tmp_path / "run" / "input").glob("interactions-*.parquet")))
    assert list(written.columns) == ["uid", "iid", "ts"]     # only what a run reads reaches the disk
    assert set(model.recommend(user="a", n=2)["item"]) == {"4", "5"}
