"""Differential privacy attacked as the aggregation server would (issue #14): the real ClientApp
and server code over an in-process transport (tests/server/test_secure_fuzz.LoopbackGrid).

At 4b8af3e each of these worked: DP replies carried the example count and the loss; the secure
sum carried a weight from the data and a loss coordinate; the client took its budget, delta and
record size from the server; a deleted ledger meant a fresh budget; a client revealed unmask
shares for a sum with fewer noise shares than accounted; the user-level epsilon "against the
server" counted amplification by a sample the server draws."""
import math

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from fedrec.client.app import make_client_app
from fedrec.server.aggregation import ServerOptimizer
from fedrec.server.app import federation_config, initial_weights
from fedrec.server.federation import FedRecStrategy, federated_evaluate, privacy_summary, secure_round, train_round
from fedrec.shared.data.pipeline import DataConfig, prepare_data
from fedrec.shared.privacy.accounting import clamp_probability, epsilon, user_epsilon
from fedrec.shared.protocol import refusal_of
from fedrec.shared.settings import run_config_defaults
from fedrec.simulation.federated import write_store
from tests.server.test_secure_fuzz import SETTINGS, LoopbackGrid

# The devices' own settings: record-level DP, records of 11 interactions (the tiny model's max).
DEVICE = {**SETTINGS, "privacy": "record", "target-epsilon": 8.0, "delta": 1e-5, "record-window": 11,
          "private-model": "encoder"}   # DP training rounds; the item-item release is attacked below


@pytest.fixture
def store(tmp_path):
    prepared = prepare_data(DataConfig(dataset="synthetic:12x25", text_encoder="none", activity_features=False))
    return write_store(prepared, tmp_path / "store"), len(prepared.split)


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity
    for name in ("run_id", "node_id", "task_id"):
        monkeypatch.setattr(TaskIdentity, f"_{name}", 1)


class Spy(LoopbackGrid):
    """The honest devices (ClientApp with `DEVICE` settings); keeps every reply the server got."""

    def __init__(self, store, users, device=DEVICE):
        super().__init__(store, users, None, None)
        self.app = make_client_app(device)
        self.replies = []

    def pull_messages(self, message_ids):
        replies = super().pull_messages(message_ids)
        self.replies.extend(replies)
        return replies


def _strategy(store, grid, **server):
    """The server's strategy, resolved against the grid; `server` overrides what it asks for."""
    cfg = federation_config({**run_config_defaults(), **DEVICE, "store": str(store), **server})
    strategy = FedRecStrategy(cfg, ServerOptimizer(initial_weights(store / "catalog.npz", cfg), cfg.server))
    strategy.resolve(grid)
    return strategy


def _unchanged(strategy, start) -> bool:
    return all(np.array_equal(start[k], v) for k, v in strategy.optimizer.weights().items())


def test_dp_replies_carry_no_count_loss_or_timing(store):
    store, users = store
    grid = Spy(store, users)
    record = train_round(grid, _strategy(store, grid, **{"secure-aggregation": False}), 1, secure=False)
    assert record.trained and record.accepted == 8
    for reply in grid.replies:
        metrics = dict(reply.content["metrics"])
        assert metrics["num-examples"] == 1.0, metrics        # a fixed weight, not the user's length
        assert "train-loss" not in metrics or math.isnan(metrics["train-loss"])
        assert "train-seconds" not in metrics or math.isnan(metrics["train-seconds"])


def test_a_dp_device_gives_no_validation_metric_whatever_the_server_asks(store):
    """Adversary: a server that does not follow the protocol declares a run without DP and asks every
    device for its validation metrics, as the stopping rule's panel is asked (each one's exact NDCG@10
    on a held-out interaction, nothing a DP guarantee covers). Devices whose own policy requires DP
    refuse, so nothing reaches the mean. Fails if a device answers on the server's word."""
    store, users = store
    grid = Spy(store, users)
    strategy = _strategy(store, grid, **{"privacy": "none", "federated-eval-every": 1, "eval-clients": users})
    assert federated_evaluate(grid, strategy, 1, "valid") is None
    assert len(grid.replies) == users and all(refusal_of(r.content) for r in grid.replies)
    assert not any("metrics" in r.content for r in grid.replies)


def test_the_secure_sum_carries_fixed_weights_and_no_loss_under_dp(store, monkeypatch):
    """What each client feeds into the masked sum: weight 1 and loss 0 under DP, whatever its data
    (the server decodes only sums, but a sum of data-dependent weights is itself unnoised)."""
    from fedrec.client import secure as client_secure
    store, users = store
    fed = []
    honest = client_secure.encode_contribution
    monkeypatch.setattr(client_secure, "encode_contribution",
                        lambda flat, weight, loss: fed.append((weight, loss)) or honest(flat, weight, loss))
    grid = Spy(store, users)
    record = train_round(grid, _strategy(store, grid), 1, secure=True)
    assert record.trained and len(fed) == 8
    assert all(w == 1.0 and (math.isnan(loss) or loss == 0) for w, loss in fed), fed
    assert math.isnan(record.train_loss)


def test_a_log_without_a_record_still_sends_a_noised_update(tmp_path):
    """A user with a single interaction has no record: its update must still be the noise (a zero
    update would tell the server so), with the same weight as everyone's."""
    import torch

    from fedrec.client.handlers import train_update
    from fedrec.client.store import UserLog
    from tests.shared.test_privacy import round_config, tiny_client
    model, weights = tiny_client(tmp_path)
    UserLog(np.array([5]), 3, 4).save(tmp_path / "users" / "0.npz")
    node = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "privacy-record-window": 11},
                   state=RecordDict(), run_config={"store": str(tmp_path)})
    torch.manual_seed(0)
    delta, metrics = train_update(model, weights, UserLog.load(tmp_path / "users" / "0.npz"), round_config(100.0),
                                  node, {}, np.random.default_rng(0))
    assert metrics.num_examples == 1.0 and not metrics.privacy_refused and metrics.record_epsilon > 0
    assert sum(float(np.abs(d).sum()) for d in delta.values()) > 0      # the noise, on its own


@pytest.mark.parametrize("server,why", [
    ({"delta": 0.5}, "outside (0, 1e-05]"),
    ({"record-window": 2}, "smaller than this device's unit of 11"),
    ({"privacy": "none"}, "requires record-level DP"),
])
def test_a_server_cannot_loosen_the_devices_privacy(store, server, why):
    store, users = store
    grid = Spy(store, users)
    strategy = _strategy(store, grid, **{"secure-aggregation": False, **server})
    start = strategy.optimizer.weights()
    record = train_round(grid, strategy, 1, secure=False)
    assert not record.trained and _unchanged(strategy, start)
    refusals = [refusal_of(r.content) for r in grid.replies]
    assert len(refusals) == 8 and all(why in (r or "") for r in refusals), refusals


def test_a_huge_delta_or_an_infinite_budget_without_noise_buys_nothing(store):
    """delta = 1e300 made the accountant's epsilon negative, so it passed any budget; an infinite
    budget with no noise was trained on. Now the first is refused and the second spends the
    device's own finite budget at once (epsilon inf): nobody trains, no ledger changes."""
    store, users = store
    grid = Spy(store, users)
    strategy = _strategy(store, grid, **{"secure-aggregation": False})
    strategy.privacy.delta = 1e300
    train_round(grid, strategy, 1, secure=False)
    assert all("outside (0, 1e-05]" in (refusal_of(r.content) or "") for r in grid.replies)
    grid.replies.clear()
    strategy.privacy.delta, strategy.privacy.target_epsilon, strategy.privacy.record_noise = 1e-5, math.inf, 0.0
    start = strategy.optimizer.weights()
    record = train_round(grid, strategy, 2, secure=False)
    assert not record.trained and _unchanged(strategy, start)
    assert all(r.content["metrics"]["privacy-refused"] == 1.0 for r in grid.replies)
    assert all(f.read_text().count("[]") for f in (store / "users").glob("*.privacy.json"))


def test_a_deleted_ledger_is_refused_not_a_fresh_budget(store):
    store, users = store
    grid = Spy(store, users)
    for ledger in (store / "users").glob("*.privacy.json"):
        ledger.unlink()
    record = train_round(grid, _strategy(store, grid, **{"secure-aggregation": False}), 1, secure=False)
    assert not record.trained
    assert all("privacy ledger is missing" in (refusal_of(r.content) or "") for r in grid.replies)
    assert not list((store / "users").glob("*.privacy.json"))          # and none was started


def test_clients_refuse_to_unmask_a_sum_with_fewer_noise_shares_than_accounted(store, monkeypatch):
    """Distributed noise, m = 8 shares counted on, one of 8 clients drops after masking. A server
    that skips its own check (below) asks for the unmask shares anyway: the clients refuse, and
    the round ends with nothing decoded."""
    from fedrec.server import secure as server_secure
    store, users = store
    grid = Spy(store, users, {**DEVICE, "distributed-noise": True})
    strategy = _strategy(store, grid, **{"distributed-noise": True})
    strategy.privacy.noise_shares = 8
    grid.bad_step, grid.kind = "masked", "missing"     # one masked input lost
    original = server_secure.SecureTask

    def no_server_check(*args, **kwargs):              # the malicious server's version of the task
        task = original(*args, **kwargs)
        task.min_contributions = 0
        return task

    monkeypatch.setattr("fedrec.server.federation.SecureTask", no_server_check)
    start = strategy.optimizer.weights()
    outcome = secure_round(grid, strategy, 1)
    assert outcome.update is None and _unchanged(strategy, start)
    assert "train.secagg_unmask" in grid.sent
    refused = [refusal_of(r.content) for r in grid.replies if r.metadata.message_type == "train.secagg_unmask"]
    assert refused and all("this client's input must be summed with" in (r or "") for r in refused), refused


def test_user_level_epsilon_against_the_server_counts_participations_without_amplification(store):
    store, users = store
    grid = Spy(store, users, {**DEVICE, "privacy": "user", "distributed-noise": True})
    strategy = _strategy(store, grid, **{"privacy": "user", "distributed-noise": True, "rounds": 50,
                                         "clients-per-round": 3})
    p = strategy.privacy
    history = [{"metrics": {"privacy": {"sampled_nodes": [100, 101]}}},
               {"metrics": {"privacy": {"sampled_nodes": [100]}}}]
    summary = privacy_summary(strategy, history)["user"]
    assert summary["max_participations"] == 2
    assert summary["epsilon"] == pytest.approx(epsilon([(p.user_noise, 1.0, 2)], p.delta))
    assert summary["epsilon_released_model"] == pytest.approx(user_epsilon(p, 2))
    assert summary["epsilon_released_model"] < summary["epsilon"]
    # Calibrated against the server: the planned participations spend at most the target.
    assert epsilon([(p.user_noise, 1.0, p.planned_participations)], p.delta) <= p.target_epsilon * 1.01
    # ... and the server samples nobody past them.
    strategy.participations.update({n: p.planned_participations for n in grid.get_node_ids()})
    assert strategy.sample(grid, 3, 3, 0) == []
    # Central noise: the server sees the sum before it adds noise: no epsilon holds against it.
    central = _strategy(store, grid, **{"privacy": "user"})
    assert privacy_summary(central, history)["user"]["epsilon"] is None


def test_distributed_noise_delta_includes_the_clamp(store):
    store, users = store
    grid = Spy(store, users)
    strategy = _strategy(store, grid, **{"distributed-noise": True})
    summary = privacy_summary(strategy, [])
    coordinates = sum(int(np.prod(s)) for s in strategy.expected.values())
    clamp = clamp_probability(coordinates, strategy.privacy.planned_participations)
    assert 0 < clamp < 1e-12 and summary["delta"] == pytest.approx(1e-5 + clamp)


def test_the_record_unit_holds_for_changing_an_interaction_and_not_for_deleting_one():
    """What docs/privacy.md states: records are aligned chunks, so changing one interaction
    changes one record, while deleting one shifts every later chunk."""
    from fedrec.client.privacy import record_chunks
    log = np.arange(1, 40)
    changed = log.copy()
    changed[15] = 99
    before, after = record_chunks(log, 11), record_chunks(changed, 11)
    assert sum(not np.array_equal(a, b) for a, b in zip(before, after)) == 1
    deleted = record_chunks(np.delete(log, 5), 11)
    assert sum(not np.array_equal(a, b) for a, b in zip(before, deleted)) == len(before)


def _release_round(store, grid, **privacy):
    """The item-item release's secure round, with what a malicious server puts in its request."""
    from flwr.app import ArrayRecord

    from fedrec.server.secure import SecureRound, SecureTask
    from fedrec.shared.privacy.cooccurrence import STAGE, pair_count
    from fedrec.shared.protocol import PrivacyRound, RoundConfig, pack_round_config
    strategy = _strategy(store, grid)
    n_items = 25
    request = PrivacyRound(**{"mode": "user", "budget": 8.0, "delta": 1e-5, "user_noise": 0.64,
                              "record_window": 11, "noise_shares": 7, **privacy})
    config = pack_round_config(RoundConfig(1, 0, strategy.cfg.local, strategy.cfg.model, request, stage=STAGE))
    task = SecureTask(ArrayRecord(), config, "uniform", 1.0, clip=1.0, size=pair_count(n_items))
    return SecureRound(strategy.cfg.secure, 60.0, False).run(grid, 1, sorted(grid.get_node_ids())[:8], task)


@pytest.mark.parametrize("privacy,why", [
    ({"noise_shares": 0}, "noise shares >= 1"),                          # nobody would add noise
    ({"mode": "none"}, "requires user-level DP"),
    ({"mode": "bogus"}, "is not none, record, user or both"),
    ({"user_noise": -1.0}, "finite and >= 0"),
    ({"user_noise": float("inf")}, "finite and >= 0"),
])
def test_an_item_item_release_without_noise_is_refused(store, privacy, why):
    """Found by the session-8 review: a release request with no noise shares passed the policy and
    booked a step in the ledger while adding no noise; a negative multiplier booked a fake spend."""
    store, users = store
    grid = Spy(store, users, {**DEVICE, "privacy": "user"})
    outcome = _release_round(store, grid, **privacy)
    assert outcome.result is None
    refused = [refusal_of(r.content) for r in grid.replies if r.metadata.message_type == "train.secagg_masked"]
    assert refused and all(why in (r or "") for r in refused), refused
    assert all(f.read_text().count("[]") for f in (store / "users").glob("*.privacy.json"))   # nothing booked


def test_two_processes_cannot_both_spend_the_last_of_a_budget(tmp_path):
    from fedrec.client.privacy import PrivacyBudgetExceeded, PrivacyLedger
    from fedrec.client.store import start_ledger
    start_ledger(tmp_path / "ledger.json")
    first, second = PrivacyLedger(tmp_path / "ledger.json"), PrivacyLedger(tmp_path / "ledger.json")
    one = epsilon([(1.0, 1.0, 1)], 1e-5)
    first.spend((1.0, 1.0, 1), one * 1.01, 1e-5)
    with pytest.raises(PrivacyBudgetExceeded):       # the second reads what the first spent
        second.spend((1.0, 1.0, 1), one * 1.01, 1e-5)
    assert PrivacyLedger(tmp_path / "ledger.json").history == [(1.0, 1.0, 1)]


@pytest.mark.parametrize("window", [11, 51])
def test_one_record_moves_a_contribution_by_at_most_the_record_sensitivity(window):
    """Removing a record renormalises what is left, so it can move a user's contribution by more
    than the user bound 1/sqrt(2); the noise for the record unit is calibrated to the maximum."""
    from fedrec.shared.privacy.cooccurrence import SENSITIVITY, record_sensitivity, user_contribution
    rng = np.random.default_rng(window)
    worst = 0.0
    for _ in range(300):
        log = rng.choice(np.arange(1, 201), size=rng.integers(window + 1, 150), replace=False)
        start = window * rng.integers(0, len(log) // window)
        kept = np.delete(log, np.arange(start, min(start + window, len(log))))
        worst = max(worst, np.linalg.norm(user_contribution(log, 200) - user_contribution(kept, 200)))
    assert SENSITIVITY < worst <= record_sensitivity(window)


def test_a_device_policy_without_a_budget_limit_is_its_own_choice():
    """A simulation's reference run without DP (target epsilon inf) must still train: an unlimited
    budget is the device's own setting (the session-8 sweep aborted every round on it); a delta
    above 1e-3 stays refused."""
    from fedrec.client.privacy import DevicePolicy
    assert DevicePolicy.of({}, {"privacy": "none", "target-epsilon": math.inf}).budget == math.inf
    with pytest.raises(ValueError, match="privacy delta"):
        DevicePolicy.of({"privacy-delta": 0.01}, {})
