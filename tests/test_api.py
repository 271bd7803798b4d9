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
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_bad_row_in_a_dataframe_is_named(tmp_path):
    events = pd.DataFrame({"user": [1, 1, 1], "item": [1, 2, 3], "timestamp": ["1", "soon", "3"]})
    with pytest.raises(DataError, match=r"interactions\.parquet.*2.*timestamp"):
        fedrec.train(events, out=tmp_path / "run")
