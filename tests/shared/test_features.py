import numpy as np
import pandas as pd

from fedrec.shared.data import features
from fedrec.shared.data.features import MINILM, build_features, embed_texts, item_texts
from fedrec.shared.data.preprocess import encode, item_activity, leave_one_out
from fedrec.shared.data.schema import make_catalog, make_interactions


def small_world():
    catalog = make_catalog(pd.DataFrame({
        "item": ["a", "b", "c", "cold"],
        "title": ["Star Wars (1977)", "Star Trek (1979)", "Pride and Prejudice (1995)", "Emma (1996)"],
        "genres": [("Sci-Fi",), ("Sci-Fi",), ("Romance",), ("Romance",)],
        "year": [1977, 1979, 1995, None],
        "tags": [("space",), (), (), ()]}), "items.csv")
    events = make_interactions(pd.DataFrame({
        "user": ["u"] * 4 + ["v"] * 3, "item": ["a", "b", "c", "a", "b", "a", "c"],
        "timestamp": [1, 2, 3, 4, 86_400 * 10, 86_400 * 11, 86_400 * 12]}), "log.csv")
    split = leave_one_out(encode(events.__class__(events.frame.drop_duplicates(["user", "item"]), "log.csv"), catalog))
    return catalog, split


def test_texts_combine_title_genres_tags():
    catalog, _ = small_world()
    assert item_texts(catalog)[0] == "Star Wars (1977). Sci-Fi. space"


def test_minilm_embeds_offline_and_similar_titles_are_close(tmp_path):
    vectors = embed_texts(["Star Wars (1977). Sci-Fi", "Star Trek (1979). Sci-Fi",
                           "Pride and Prejudice (1995). Romance"], tmp_path)
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]


def test_cache_hit_does_not_load_the_model(tmp_path, monkeypatch):
    texts = ["one title", "another title"]
    first = embed_texts(texts, tmp_path)
    monkeypatch.setattr(features, "_load_minilm", lambda: (_ for _ in ()).throw(AssertionError("loaded")))
    assert np.array_equal(embed_texts(texts, tmp_path), first)
    assert len(list(tmp_path.glob("text-*.npy"))) == 1


def test_feature_matrix_layout(tmp_path):
    catalog, split = small_world()
    f = build_features(catalog, item_activity(split), text_encoder="none")
    assert f.matrix.shape == (5, 2 + 2 + 1 + 3)         # genres, year+flag, popularity, recency x3
    assert not f.matrix[0].any()                        # padding row
    assert f.genre_names == ["Romance", "Sci-Fi"]
    assert list(f.matrix[1:, :2].argmax(1)) == [1, 1, 0, 0]
    assert f.matrix[4, 3] == 1.0                        # cold item: year unknown flag
    assert f.matrix[4, -1] == 1.0                       # cold item: never seen in training
    full = build_features(catalog, item_activity(split), text_encoder=MINILM, cache_dir=tmp_path)
    assert full.matrix.shape == (5, 384 + 8) and full.text_encoder == MINILM
