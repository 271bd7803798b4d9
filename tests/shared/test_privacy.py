"""Differential privacy: accounting against an independent implementation, records, and the
client's ledger across restarts."""
import math

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict

from fedrec.client.handlers import train_update
from fedrec.client.privacy import PrivacyLedger, record_chunks
from fedrec.client.store import UserLog, start_ledger
from fedrec.shared.model.config import ModelConfig, ModelHyper
from fedrec.shared.model.recommender import RecommenderModel, shared_weights
from fedrec.shared.protocol import LocalConfig, PrivacyRound, RoundConfig
from fedrec.shared.privacy.accounting import PrivacyConfig, epsilon, noise_for, resolve
from fedrec.shared.settings import default
from fedrec.server.schedule import plan

dp_accounting = pytest.importorskip("dp_accounting")

# What we ship: the ML-100K federation's defaults (--rounds, 25 of 943 users a round), at the
# epsilons of the privacy sweep, for both units.
ROUNDS = plan(943, default("rounds"), default("clients-per-round"), default("participations")).rounds   # 500
SHIPPED = [(mode, eps) for mode in ("record", "user") for eps in (1.0, 2.0, 4.0, 8.0)]


def shipped_event(mode: str, eps: float, accountant: str):
    cfg = resolve(PrivacyConfig(mode=mode, target_epsilon=eps, accountant=accountant),
                  rounds=ROUNDS, clients_per_round=25, clients=943, local_epochs=1)
    if mode == "record":
        return cfg.record_noise, 1.0, cfg.planned_participations
    return cfg.user_noise, cfg.user_sample_rate, ROUNDS


def independent(noise: float, rate: float, steps: int, delta: float, kind: str) -> float:
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
    from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant
    from opacus.accountants import RDPAccountant
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise)), steps)
    # The same RDP orders as Opacus's: the comparison is of the arithmetic, not of the grid.
    acc = (RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS) if kind == "rdp"
           else PLDAccountant(value_discretization_interval=1e-4))
    acc.compose(event)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("mode,eps", SHIPPED)
def test_rdp_accountant_agrees_with_dp_accounting_within_1_percent(mode, eps):
    noise, rate, steps = shipped_event(mode, eps, "rdp")
    ours = epsilon([(noise, rate, steps)], 1e-5, "rdp")
    assert ours <= eps * 1.001                       # the noise found meets the target
    assert ours == pytest.approx(independent(noise, rate, steps, 1e-5, "rdp"), rel=0.01)


@pytest.mark.parametrize("mode,eps", [("record", 1.0), ("user", 8.0)])
def test_prv_accountant_agrees_with_dp_accountings_pld_within_1_percent(mode, eps):
    noise, rate, steps = shipped_event(mode, eps, "prv")
    ours = epsilon([(noise, rate, steps)], 1e-5, "prv")
    assert ours == pytest.approx(independent(noise, rate, steps, 1e-5, "pld"), rel=0.01)


def test_noise_grows_as_epsilon_shrinks_and_infinite_epsilon_needs_none():
    noises = [noise_for(e, 1e-5, 0.03, 700) for e in (1, 2, 4, 8)]
    assert noises == sorted(noises, reverse=True) and noises[-1] > 0
    assert noise_for(math.inf, 1e-5, 0.03, 700) == 0.0


def test_records_are_disjoint_chunks_that_cover_the_log():
    log = np.arange(1, 124)
    chunks = record_chunks(log, 51)
    assert [len(c) for c in chunks] == [51, 51, 21]
    assert np.array_equal(np.concatenate(chunks), log)
    assert record_chunks(np.arange(1, 53), 51) == [pytest.approx(np.arange(1, 52))]  # a 1-item tail has no target


def tiny_client(tmp_path):
    torch.manual_seed(0)
    model = RecommenderModel(ModelConfig(n_items=30, content_dim=4, dim=8, layers=1, heads=2, max_len=10, dropout=0.0),
                        torch.randn(31, 4))
    (tmp_path / "users").mkdir()
    UserLog(np.arange(1, 25) % 30 + 1, 3, 4).save(tmp_path / "users" / "0.npz")
    start_ledger(tmp_path / "users" / "0.privacy.json")
    return model, shared_weights(model)


def round_config(budget: float) -> RoundConfig:
    return RoundConfig(1, 0, LocalConfig(local_epochs=1, lr=0.1, optimizer="sgd", train_on="valid", clip=5.0),
                       ModelHyper(dim=8, layers=1, heads=2, max_len=10, dropout=0.0),
                       PrivacyRound(mode="record", budget=budget, delta=1e-5, accountant="rdp", record_noise=2.0,
                                    record_clip=1.0, record_window=11))


def test_a_client_that_spent_its_budget_refuses_also_after_a_restart(tmp_path):
    model, weights = tiny_client(tmp_path)
    user = UserLog.load(tmp_path / "users" / "0.npz")
    per_round = epsilon([(2.0, 1.0, 1)], 1e-5)
    budget = epsilon([(2.0, 1.0, 3)], 1e-5) + 1e-9      # room for exactly three rounds
    config = round_config(budget)

    def node():  # a fresh Context: what a restarted SuperNode process starts with
        return Context(run_id=1, node_id=7, node_config={"partition-id": 0, "privacy-record-window": 11},
                       state=RecordDict(), run_config={"store": str(tmp_path)})

    rng = np.random.default_rng(0)
    spent = []
    for _ in range(3):
        delta, metrics = train_update(model, weights, user, config, node(), {}, rng)
        assert not metrics.privacy_refused and metrics.num_examples > 0
        assert any(np.abs(d).sum() > 0 for d in delta.values())
        spent.append(metrics.record_epsilon)
    assert spent[0] == pytest.approx(per_round) and spent == sorted(spent) and spent[-1] <= budget
    ledger_file = tmp_path / "users" / "0.privacy.json"
    assert ledger_file.exists()

    for attempt in range(2):                              # the fourth round, twice, each after a "restart"
        delta, metrics = train_update(model, weights, user, config, node(), {}, rng)
        assert metrics.privacy_refused and metrics.num_examples == 0
        assert all(not np.any(d) for d in delta.values())
        assert metrics.record_epsilon == pytest.approx(spent[-1])
    assert PrivacyLedger(ledger_file).spent(1e-5) == pytest.approx(spent[-1])
    # A device may set a smaller budget of its own, whatever the server says.
    fresh = tmp_path / "other.json"
    start_ledger(fresh)
    own = Context(run_id=1, node_id=8, node_config={"partition-id": 0, "privacy-ledger": str(fresh),
                                                    "privacy-budget": per_round / 2, "privacy-record-window": 11},
                  state=RecordDict(), run_config={"store": str(tmp_path)})
    _, metrics = train_update(model, weights, user, config, own, {}, rng)
    assert metrics.privacy_refused and PrivacyLedger(fresh).history == []


def test_a_damaged_ledger_is_an_error_not_a_fresh_budget(tmp_path):
    path = tmp_path / "ledger.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable privacy ledger"):
        PrivacyLedger(path)


def test_a_client_refuses_distributed_noise_over_more_than_one_sgd_step(tmp_path):
    """Distributed record-level noise is calibrated to one plain SGD step; a server that asks for
    two local epochs (or Adam) would get updates with less noise than the ledger accounts. The
    client checks the round it is sent itself, whatever the server validated."""
    from fedrec.client.privacy import DPStep, RecordPrivacy
    privacy = RecordPrivacy(2.0, 1.0, 11, budget=8.0, delta=1e-5, noise_shares=9)
    start_ledger(tmp_path / "ledger.json")
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    for epochs, optimizer in [(2, "sgd"), (1, "adam")]:
        with pytest.raises(ValueError, match="one plain SGD step"):
            DPStep(privacy, ledger, epochs, optimizer)
    DPStep(privacy, ledger, 1, "sgd")
    assert PrivacyLedger(tmp_path / "ledger.json").history == []    # nothing spent by a refusal


def test_noise_is_never_resolved_for_a_schedule_not_yet_planned():
    """--rounds 0 means "from the population": noise calibrated over 0 rounds would be no calibration
    (and Opacus's search over it never ends), so it is refused until the schedule is planned."""
    with pytest.raises(ValueError, match="rounds and cohort"):
        resolve(PrivacyConfig(mode="user", target_epsilon=8.0), rounds=0, clients_per_round=25, clients=943,
                local_epochs=1)
