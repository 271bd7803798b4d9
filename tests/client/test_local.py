"""The client's plain functions: what it trains on, what it answers, and nothing more."""
import numpy as np
import pytest
import torch

from fedrec.client.local import local_metrics, local_update, user_windows
from fedrec.client.store import UserLog
from fedrec.shared.data.preprocess import Split, UserSplit
from fedrec.shared.evaluation.ranking import evaluate
from fedrec.shared.model.config import ModelConfig
from fedrec.shared.model.recommender import RecommenderModel, shared_weights
from fedrec.shared.protocol import LocalConfig


def tiny_model(n_items=40, content_dim=6, seed=0):
    torch.manual_seed(seed)
    content = torch.randn(n_items + 1, content_dim)
    content[0] = 0
    return RecommenderModel(ModelConfig(n_items=n_items, content_dim=content_dim, dim=16, layers=1,
                                   heads=2, max_len=8, dropout=0.0), content)


@pytest.mark.parametrize("length", [2, 3, 8, 9, 10, 17, 30])
def test_windows_make_every_event_a_target_exactly_once(length):
    history = np.arange(1, length + 1)
    windows = user_windows(history, max_len=8)
    targets = np.concatenate([w[1:] for w in windows])
    assert sorted(targets.tolist()) == history[1:].tolist()
    assert all(2 <= len(w) <= 9 for w in windows)


def test_local_update_answers_a_delta_of_the_shared_weights_only():
    model = tiny_model()
    log = UserLog(np.array([3, 5, 7, 9, 11, 13]), valid=15, test=17)
    global_weights = shared_weights(model)
    delta, metrics = local_update(model, global_weights, log, LocalConfig(local_epochs=2, lr=1e-2, optimizer="adam", clip=0.0),
                                  np.random.default_rng(0))
    assert set(delta) == set(global_weights)
    assert all(delta[k].shape == global_weights[k].shape and np.isfinite(delta[k]).all() for k in delta)
    assert any(np.abs(d).max() > 0 for d in delta.values())
    assert metrics.num_examples == 5 and np.isfinite(metrics.train_loss) and metrics.record_epsilon is None


def test_held_out_items_do_not_change_what_a_client_sends():
    """Training uses the training items only: the validation and test items cannot be read
    back from the delta, because the delta does not depend on them at all."""
    train = np.array([3, 5, 7, 9, 11, 13])
    answers = []
    for valid, test in [(15, 17), (21, 2), (30, 31)]:
        model = tiny_model()
        torch.manual_seed(1)
        delta, _ = local_update(model, shared_weights(tiny_model()), UserLog(train, valid, test),
                                LocalConfig(local_epochs=2, lr=1e-2, optimizer="adam", clip=0.0), np.random.default_rng(0))
        answers.append(delta)
    for other in answers[1:]:
        assert all(np.array_equal(answers[0][k], other[k]) for k in answers[0])


def test_local_metrics_match_the_central_evaluator():
    model = tiny_model()
    users = [UserSplit(str(i), np.array([1 + i, 4 + i, 9 + i]), 20 + i, 30 + i, np.zeros(3)) for i in range(5)]
    split = Split(users, 40)
    from fedrec.shared.model.training import model_scorer
    central = evaluate(model_scorer(model), split, "test")
    per_user = [local_metrics(model, UserLog(u.train, u.valid, u.test), "test") for u in users]
    for key in ("hr@10", "ndcg@10", "mrr@10"):
        assert np.mean([m[key] for m in per_user]) == pytest.approx(central.metrics[key])
    assert set(per_user[0]) == {"hr@10", "ndcg@10", "mrr@10"}


def test_user_log_round_trips(tmp_path):
    log = UserLog(np.array([4, 2, 9]), valid=7, test=1)
    log.save(tmp_path / "u.npz")
    back = UserLog.load(tmp_path / "u.npz")
    assert back.train.tolist() == [4, 2, 9] and (back.valid, back.test) == (7, 1)
