"""The published bundle and the Recommender that reads it: the same scores as the run, a bundle that
cannot be trusted refused by name, explanations that are what they say, diversity that diversifies."""
import json

import numpy as np
import pytest

from fedrec.shared.bundle import BundleError, load_bundle, write_bundle
from fedrec.shared.data.pipeline import DataConfig, prepare_data
from fedrec.shared.evaluation.ranking import evaluate, histories_and_targets
from fedrec.shared.recommend import Recommender, UnknownItem, intra_list_diversity


@pytest.fixture(scope="module")
def prepared():
    return prepare_data(DataConfig(dataset="synthetic:300x200", text_encoder="none"))


@pytest.fixture(scope="module")
def rec(trained_run):
    return Recommender.load(trained_run / "bundle")


def test_the_bundle_scores_as_the_run_did(trained_run, rec, prepared):
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["bundle"]["version"] == rec.version
    assert rec.bundle.blend.label == summary["fusion"]["chosen"]
    again = evaluate(rec.scores, prepared.split, "test")
    # The bundle stores float32 (the run scored in float64): a few near-ties may fall the other way.
    assert again.metrics["ndcg@10"] == pytest.approx(summary["metrics"]["ndcg@10"], abs=2e-3)
    same = (again.ranks == np.load(trained_run / "test_ranks.npy")).all(axis=1).mean()
    assert same >= 0.95


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_a_torn_or_tampered_bundle_is_refused_naming_the_file(trained_run, tmp_path):
    folder = _copy(trained_run / "bundle", tmp_path / "b")
    weights = next(folder.glob("weights-*.npz"))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=weights.name):
        load_bundle(folder)
    weights.unlink()
    with pytest.raises(BundleError, match="missing"):
        load_bundle(folder)
    from fedrec.shared.bundle import model_hash
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["blend"]["encoder"] = not manifest["blend"]["encoder"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="content hash does not match"):
        load_bundle(folder)
    manifest["files"]["weights"]["name"] = "../../etc/passwd"
    manifest["content_hash"] = model_hash(manifest)          # consistent, as a hostile server would make it
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="names files a bundle does not have"):
        load_bundle(folder)
    with pytest.raises(BundleError, match="no bundle here"):
        load_bundle(tmp_path / "empty")


def test_publishing_again_replaces_the_bundle_and_its_files(trained_run, tmp_path):
    folder = _copy(trained_run / "bundle", tmp_path / "b")
    old = load_bundle(folder)
    weights = {k: v + 0.01 for k, v in old.weights.items()}
    manifest = write_bundle(folder, model_config=old.model_config, weights=weights, item_vectors=old.item_vectors,
                            catalog=old.catalog, blend=old.blend, item_models=old.item_models)
    new = load_bundle(folder)
    assert new.content_hash == manifest["content_hash"] != old.content_hash
    names = {p.name for p in folder.iterdir()}
    assert names == {"manifest.json", *(f["name"] for f in manifest["files"].values())}


def test_explanations_are_the_scores_own_leave_one_out(rec, prepared):
    """Each 'because' item is the one whose removal lowers that recommendation's score most: removing it
    lowers the score more than removing a random other history item (in >= 80% of cases; ties aside,
    always), and its contribution is the score's actual drop."""
    rng = np.random.default_rng(0)
    histories, _ = histories_and_targets(prepared.split, "test")
    wins = cases = 0
    for history in histories[:40]:
        ids = [str(rec.item_ids[i - 1]) for i in history]
        recs = rec.recommend(ids, 10, explain=True, because=1)
        full = rec.scores([history])[0]
        for r in recs:
            if not r.because:
                continue
            top = rec.indices([r.because[0].item_id])[0]
            target = rec.indices([r.item_id])[0]
            without_top = rec.scores([history[history != top]])[0][target]
            assert full[target] - without_top == pytest.approx(r.because[0].contribution, rel=1e-6, abs=1e-9)
            other = rng.choice([i for i in np.unique(history) if i != top])
            without_other = rec.scores([history[history != other]])[0][target]
            wins += (full[target] - without_top) > (full[target] - without_other)
            cases += 1
    assert cases >= 100 and wins / cases >= 0.8, (wins, cases)


def test_one_item_and_repeated_item_histories_are_explained(rec):
    one = rec.recommend([str(rec.item_ids[0])], 5, explain=True)
    assert all(r.because and r.because[0].item_id == str(rec.item_ids[0]) for r in one)
    repeated = [str(rec.item_ids[0]), str(rec.item_ids[4]), str(rec.item_ids[0])]
    for r in rec.recommend(repeated, 5, explain=True, because=3):
        assert len({b.item_id for b in r.because}) == len(r.because)


def test_ties_go_to_the_lower_index(rec):
    scores = np.zeros(rec.n_items + 1)
    scores[[3, 7, 9]] = 2.0
    assert rec.top(scores, 6).tolist() == [3, 7, 9, 1, 2, 4]


def test_diversity_trades_relevance_for_variety(rec, prepared):
    histories, _ = histories_and_targets(prepared.split, "test")
    plain, diverse = [], []
    for history in histories[:30]:
        ids = [str(rec.item_ids[i - 1]) for i in history]
        top = rec.recommend(ids, 10)
        same = rec.top(rec.scores([history])[0], 10, exclude=history)
        assert [r.item_id for r in top] == [str(rec.item_ids[i - 1]) for i in same]
        mixed = rec.recommend(ids, 10, diversity=0.7)
        assert len({r.item_id for r in mixed}) == 10 and not {r.item_id for r in mixed} & set(ids)
        plain.append(rec.indices([r.item_id for r in top]))
        diverse.append(rec.indices([r.item_id for r in mixed]))
    assert intra_list_diversity(np.array(diverse), rec.content_space) > intra_list_diversity(np.array(plain),
                                                                                             rec.content_space)


def test_intra_list_diversity_is_mean_pairwise_one_minus_cosine():
    space = np.array([[0, 0], [1, 0], [0, 1], [1, 0]], dtype=np.float32)
    assert intra_list_diversity(np.array([[1, 2]]), space) == pytest.approx(1.0)
    assert intra_list_diversity(np.array([[1, 3]]), space) == pytest.approx(0.0)
    assert intra_list_diversity(np.array([[1, 2, 3]]), space) == pytest.approx(2 / 3)


def test_a_new_event_changes_the_next_recommendations_at_once(rec, prepared):
    histories, _ = histories_and_targets(prepared.split, "test")
    changed = 0
    for history in histories[:20]:
        ids = [str(rec.item_ids[i - 1]) for i in history]
        before = [r.item_id for r in rec.recommend(ids, 10)]
        after = [r.item_id for r in rec.recommend(ids + [before[0]], 10)]
        assert before[0] not in after        # what was just touched is not offered again
        changed += before[1:] != after[:9]
    assert changed >= 10


def test_unknown_items_and_bad_diversity_are_clear_errors(rec):
    with pytest.raises(UnknownItem, match="'no-such-item'"):
        rec.recommend(["no-such-item"], 5)
    with pytest.raises(ValueError, match="diversity"):
        rec.recommend([str(rec.item_ids[0])], 5, diversity=1.5)


def test_the_ann_index_meets_its_recall_against_an_exact_scan():
    from fedrec.shared.recommend import TARGET_RECALL, VectorIndex
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(50, 16))
    items = np.vstack([np.zeros((1, 16)), centres[rng.integers(0, 50, 5000)] + 0.5 * rng.normal(size=(5000, 16))])
    queries = centres[rng.integers(0, 50, 100)] + 0.3 * rng.normal(size=(100, 16))
    exact, ivf = VectorIndex(items), VectorIndex(items, queries, ann=True)
    assert exact.info["kind"] == "exact" and ivf.info["kind"] == "ivf"
    assert ivf.info["calibrated_recall@100"] >= TARGET_RECALL
    _, truth = exact.search(queries, 100)
    _, found = ivf.search(queries, 100)
    recall = np.mean([len(set(a) & set(b)) / 100 for a, b in zip(found, truth)])
    assert recall >= TARGET_RECALL - 0.02 and found.min() >= 1 and found.max() <= 5000


def test_a_device_with_no_history_is_offered_the_most_popular(rec):
    popularity = rec.bundle.popularity
    assert popularity is not None
    expected = rec.top(popularity.astype(np.float64), 5)
    assert [r.item_id for r in rec.recommend([], 5)] == [str(rec.item_ids[i - 1]) for i in expected]


def test_the_on_device_path_opens_no_connection(rec, monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("the on-device path tried to open a connection")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert len(rec.recommend(list(rec.item_ids[:5]), 10, explain=True, diversity=0.3)) == 10
