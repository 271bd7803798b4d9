"""The reference recommenders: what order-awareness changes, session kNN's neighbours, and a tuner
that never reads the test items."""
import numpy as np
import pytest

from fedrec.shared.data.preprocess import Split, UserSplit
from fedrec.shared.evaluation.baselines import EASE, ItemKNN, SessionKNN, history_matrix


def split_of(logs: list[list[int]], n_items: int) -> Split:
    """Each log: training items, then the validation item, then the test item."""
    return Split([UserSplit(f"u{i}", np.array(log[:-2]), log[-2], log[-1], np.arange(len(log) - 2.0))
                  for i, log in enumerate(logs)], n_items)


def test_history_weights_decay_with_age_newest_first():
    m = history_matrix([np.array([3, 1, 2])], 4, decay=0.5).toarray()[0]
    assert m == pytest.approx([0, 0.5, 1.0, 0.25])


def two_worlds() -> Split:
    # Items 1-2 go together, and 3-4 go together; nobody mixes them.
    return split_of([[1, 2, 1, 2]] * 5 + [[3, 4, 3, 4]] * 5 + [[1, 2, 3, 4, 3, 4]], 4)


@pytest.mark.parametrize("model", [ItemKNN(neighbours=3, shrink=0.0, decay=0.1), EASE(l2=1.0, decay=0.1)])
def test_with_decay_the_newest_item_decides(model):
    model.fit(two_worlds())
    scores = model([np.array([1, 3])])[0]    # 3 is the newest: its partner 4 beats 1's partner 2
    assert scores[4] > scores[2]
    model.decay = 1.0                         # unordered: the two partners weigh the same
    scores = model([np.array([1, 3])])[0]
    assert scores[4] == pytest.approx(scores[2], rel=0.35)


def test_session_knn_votes_with_the_most_similar_logs():
    model = SessionKNN(neighbours=5, recent=1, linear=False).fit(two_worlds())
    scores = model([np.array([1, 3])])[0]     # only the newest item (3) is the query
    assert scores[4] > scores[2] and scores[4] > 0


def test_tuning_never_reads_the_test_items(monkeypatch):
    from fedrec.simulation import baselines as tuning
    seen = []
    real = tuning.evaluate

    def watched(scorer, split, stage="test", **kw):
        seen.append(stage)
        return real(scorer, split, stage, **kw)

    monkeypatch.setattr(tuning, "evaluate", watched)
    settings, valid, tried = tuning.select("item-knn-recency", two_worlds())
    assert set(seen) == {"valid"} and tried == len(seen) == 90   # 5 x 3 x 6 settings
    assert set(settings) == {"neighbours", "shrink", "decay"}


def test_the_spd_inverse_matches_numpys_and_takes_the_general_inverse_when_not_positive_definite():
    from fedrec.shared.evaluation.baselines import spd_inverse
    rng = np.random.default_rng(0)
    X = rng.poisson(0.3, (400, 120)).astype(np.float64)
    gram = X.T @ X + 50 * np.eye(120)
    assert np.allclose(spd_inverse(gram), np.linalg.inv(gram), rtol=1e-4, atol=1e-9)
    crafted = np.array([[1.0, 3.0], [3.0, 1.0]])         # symmetric, invertible, not positive definite
    assert np.allclose(spd_inverse(crafted), np.linalg.inv(crafted))
    ill = X.T @ X + 1e-6 * np.eye(120)                  # positive definite, too ill-conditioned for float32
    ill[0, 0] += 1e7
    assert np.allclose(ill @ spd_inverse(ill), np.eye(120), atol=1e-6)
