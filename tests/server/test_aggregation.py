"""Server-side checks and aggregation, on plain arrays."""
import numpy as np
import pytest
import torch

from fedrec.server.aggregation import ServerConfig, ServerOptimizer, check_update, mean_delta

SHAPES = {"a": (2, 3), "b": (4,)}


def good():
    return {"a": np.ones((2, 3), np.float32), "b": np.zeros(4, np.float32)}


@pytest.mark.parametrize("mutate, n, reason", [
    (lambda d: d.pop("b"), 3, "missing arrays ['b']"),
    (lambda d: d.update(c=np.zeros(1, np.float32)), 3, "unexpected arrays ['c']"),
    (lambda d: d.update(a=np.ones((3, 2), np.float32)), 3, "a: shape (3, 2), expected (2, 3)"),
    (lambda d: d["a"].__setitem__((0, 0), np.nan), 3, "a: contains NaN or Inf"),
    (lambda d: d["b"].__setitem__(1, np.inf), 3, "b: contains NaN or Inf"),
    (lambda d: d.update(b=np.zeros(4, np.int64)), 3, "b: dtype int64, expected a float array"),
    (lambda d: None, 0, "nothing to train on"),
    (lambda d: None, -2, "num-examples -2 outside"),
    (lambda d: None, float("nan"), "num-examples nan outside"),
    (lambda d: None, 1e9, "num-examples 1000000000.0 outside"),
])
def test_bad_updates_are_refused_with_a_reason(mutate, n, reason):
    delta = good()
    mutate(delta)
    assert reason in check_update(delta, n, SHAPES, ServerConfig())


def test_a_good_update_passes():
    assert check_update(good(), 12, SHAPES, ServerConfig()) is None


def test_mean_delta_weights_by_examples_or_uniformly():
    d1 = {"a": np.full((2,), 1.0, np.float32)}
    d2 = {"a": np.full((2,), 4.0, np.float32)}
    assert mean_delta([d1, d2], [1, 2], "examples")["a"] == pytest.approx([3.0, 3.0])
    assert mean_delta([d1, d2], [1, 2], "uniform")["a"] == pytest.approx([2.5, 2.5])


def test_fedavg_with_lr_one_adds_the_mean_delta():
    opt = ServerOptimizer(good(), ServerConfig(optimizer="fedavg", lr=1.0))
    opt.step({"a": np.full((2, 3), 0.5, np.float32), "b": np.arange(4, dtype=np.float32)})
    w = opt.weights()
    assert w["a"] == pytest.approx(np.full((2, 3), 1.5)) and w["b"] == pytest.approx(np.arange(4))


def test_fedadam_state_survives_a_checkpoint(tmp_path):
    """Resuming from a saved state gives exactly the weights an uninterrupted run gets."""
    rng = np.random.default_rng(0)
    steps = [{k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()} for _ in range(6)]
    cfg = ServerConfig(optimizer="fedadam", lr=0.1)
    straight = ServerOptimizer(good(), cfg)
    for s in steps:
        straight.step(s)
    first = ServerOptimizer(good(), cfg)
    for s in steps[:3]:
        first.step(s)
    torch.save(first.state_dict(), tmp_path / "state.pt")
    resumed = ServerOptimizer(good(), cfg)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=False))
    for s in steps[3:]:
        resumed.step(s)
    for k in SHAPES:
        assert np.array_equal(resumed.weights()[k], straight.weights()[k])


def test_unknown_server_optimizer_is_named():
    with pytest.raises(ValueError, match="unknown server optimizer 'sgdx'"):
        ServerOptimizer(good(), ServerConfig(optimizer="sgdx"))
