"""Differential privacy in the real simulation, and the pieces of the privacy audit."""
import json
import math

import numpy as np
import pytest
import torch

from fedrec.cli import main
from fedrec.server.aggregation import dp_mean
from fedrec.shared.model.config import ModelConfig
from fedrec.shared.model.recommender import RecommenderModel
from fedrec.shared.data.preprocess import Split, UserSplit
from fedrec.shared.privacy.accounting import epsilon
from fedrec.shared.model.training import left_pad, per_example_loss
from fedrec.simulation.audit import attack_auc, auc_bound, canary_losses, insert_canaries, make_canaries

TINY = ["--dataset", "synthetic:40x30", "--text-encoder", "none", "--dim", "16", "--layers", "1",
        "--max-len", "10", "--record-window", "11", "--clients-per-round", "6", "--eval-rounds", "3",
        "--rounds", "3", "--quiet"]


def test_record_level_run_reports_its_privacy_and_every_client_stays_in_budget(tmp_path):
    out = tmp_path / "record"
    assert main(["train", "--mode", "federated", "--privacy", "record", "--target-epsilon", "2",
                 "--private-model", "encoder", "--no-secure-aggregation", "--out", str(out), *TINY]) == 0
    p = json.loads((out / "summary.json").read_text())["privacy"]
    assert p["mode"] == "record" and p["delta"] == 1e-5 and p["accountant"] == "rdp"
    assert p["epsilon"] == 2.0 and p["noise_multiplier"] > 1 and p["clip"] == 1.0
    histories = [json.loads(f.read_text())["history"] for f in (out / "store" / "users").glob("*.privacy.json")]
    assert len(histories) == len(list((out / "store" / "users").glob("*.npz"))), "every device has a ledger"
    spent = [epsilon(h, 1e-5) for h in histories if h]
    assert spent, "clients that trained wrote what they spent"
    for history in filter(None, histories):
        assert history[0][0] == pytest.approx(p["noise_multiplier"]) and history[0][1] == 1.0
    # What the server was told is what the devices' own ledgers hold, and within the budget.
    assert p["record"]["epsilon_max_reported"] == pytest.approx(max(spent)) and max(spent) <= 2.0
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert all(r["metrics"]["privacy"]["refused"] == 0 for r in rounds)


def test_both_levels_under_secure_aggregation_spend_the_planned_epsilons(tmp_path):
    out = tmp_path / "both"
    assert main(["train", "--mode", "federated", "--privacy", "both", "--target-epsilon", "4",
                 "--private-model", "encoder", "--out", str(out), *TINY]) == 0
    s = json.loads((out / "summary.json").read_text())
    p = s["privacy"]
    assert s["secure_aggregation"]["enabled"] and s["secure_aggregation"]["aborted_rounds"] == 0
    assert p["mode"] == "both" and set(p["epsilon"]) == {"record", "user"}
    # User level with the server adding the noise: nothing holds against the server itself; the
    # planned epsilon holds for those who see only the released models.
    assert p["user"]["epsilon"] is None and p["user"]["epsilon_released_model"] == pytest.approx(4.0, abs=0.05)
    assert p["user"]["noise_multiplier"] > 0.5
    assert p["user"]["rounds"] == 3 and 0 < p["user"]["sample_rate"] < 1
    # Record level under masking: the server sees no client's epsilon; each client's ledger has it.
    assert p["record"]["epsilon_max_reported"] is None
    histories = [json.loads(f.read_text())["history"] for f in (out / "store" / "users").glob("*.privacy.json")]
    assert any(histories) and all(epsilon(h, 1e-5) <= 4.0 for h in histories)


def test_distributed_record_noise_runs_under_secure_aggregation_and_clients_account_the_full_noise(tmp_path):
    out = tmp_path / "distributed"
    assert main(["train", "--mode", "federated", "--privacy", "record", "--distributed-noise",
                 "--private-model", "encoder", "--target-epsilon", "4", "--out", str(out), *TINY]) == 0
    s = json.loads((out / "summary.json").read_text())
    p, secure = s["privacy"], s["secure_aggregation"]
    assert secure["enabled"] and secure["aborted_rounds"] == 0
    assert p["noise"] == "distributed" and p["noise_shares"] == 5      # 90% of 6 clients a round
    # The fixed-point bound leaves room for 10 noise-share deviations beyond the update clip.
    share = p["noise_multiplier"] * 1.0 * 1.0 / math.sqrt(5)          # lr x record clip, over sqrt(m)
    assert secure["params_last_round"]["clip"] == pytest.approx(5.0 + 10 * share)
    histories = [json.loads(f.read_text())["history"] for f in (out / "store" / "users").glob("*.privacy.json")]
    assert any(histories)
    for history in filter(None, histories):    # the ledger counts the whole noise (the sum's), not a share
        assert history[0][0] == pytest.approx(p["noise_multiplier"]) and epsilon(history, 1e-5) <= 4.0


def test_the_dp_item_item_model_is_one_secure_release_accounted_once_per_device(tmp_path):
    """The default DP model: one secure sum with distributed noise over every device. Each device's
    ledger holds exactly one Gaussian step at the reported noise, and the reported epsilon is what
    that step costs."""
    out = tmp_path / "item-item"
    assert main(["train", "--mode", "federated", "--privacy", "record", "--target-epsilon", "4",
                 "--out", str(out), *TINY]) == 0
    s = json.loads((out / "summary.json").read_text())
    p = s["privacy"]
    assert p["model"] == "item-item" and p["noise"] == "distributed" and s["rounds_trained"] == 1
    assert p["epsilon"] == pytest.approx(epsilon([(p["noise_multiplier"], 1.0, 1)], 1e-5, "prv"), rel=1e-3)
    assert 3.9 < p["epsilon"] <= 4.0
    from fedrec.shared.privacy.cooccurrence import record_sensitivity
    assert p["sensitivity"] == pytest.approx(record_sensitivity(11))     # the record unit, not the user bound
    histories = [json.loads(f.read_text())["history"] for f in (out / "store" / "users").glob("*.privacy.json")]
    assert histories and all(h == [[p["noise_multiplier"], 1.0, 1]] for h in histories)
    assert p["contributions"] == len(histories) and p["refused"] == 0
    assert s["metrics"]["ndcg@10"] > 0


def test_noise_shares_of_m_clients_sum_to_the_full_noise():
    from fedrec.client.secure import add_noise_share
    from fedrec.shared.privacy.accounting import noise_share_std, noise_shares
    assert noise_shares(25, 943, poisson=False, dropout=0.1) == 22
    assert noise_shares(25, 943, poisson=True, dropout=0.1) < noise_shares(25, 943, poisson=False, dropout=0.1)
    std = noise_share_std(record_noise=3.0, record_sensitivity=0.5, user_noise=0.0, user_clip=5.0, shares=16)
    assert std == pytest.approx(3.0 * 0.5 / 4)
    # "both": the larger of the two units' noise, so each unit gets at least its own.
    assert noise_share_std(record_noise=3.0, record_sensitivity=0.5, user_noise=1.0, user_clip=5.0,
                           shares=16) == pytest.approx(5.0 / 4)
    total = sum(add_noise_share(np.zeros(50_000), std) for _ in range(16))
    assert total.std() == pytest.approx(3.0 * 0.5, rel=0.02)
    assert not np.array_equal(add_noise_share(np.zeros(8), std), add_noise_share(np.zeros(8), std))


def test_dp_mean_divides_by_the_expected_count_and_adds_noise_of_the_stated_std():
    rng = np.random.default_rng(0)
    total = np.zeros(200_000)
    out = dp_mean(total, expected_count=25.0, noise_multiplier=0.8, clip=5.0, rng=rng)
    assert out.std() == pytest.approx(0.8 * 5.0 / 25.0, rel=0.01)
    assert np.array_equal(dp_mean(np.full(4, 50.0), 25.0, 0.0, 5.0, rng), np.full(4, 2.0, dtype=np.float32))


def test_auc_and_its_bound():
    member = np.array([True, True, False, False])
    assert attack_auc(np.array([0.1, 0.2, 0.3, 0.4]), member) == 1.0
    assert attack_auc(np.array([0.3, 0.4, 0.1, 0.2]), member) == 0.0
    assert attack_auc(np.array([0.1, 0.3, 0.2, 0.3]), member) == pytest.approx(0.625)
    assert auc_bound(0.0, 0.0) == pytest.approx(0.5, abs=1e-6)
    assert auc_bound(1.0, 1e-5) == pytest.approx(0.731, abs=1e-3)       # e/(1+e) for small delta
    assert auc_bound(math.inf, 1e-5) == 1.0
    assert auc_bound(1.0, 1e-5) < auc_bound(2.0, 1e-5) < auc_bound(8.0, 1e-5) < 1.0


def test_canaries_are_one_record_at_the_start_of_member_logs_and_a_trained_one_is_found():
    users = [UserSplit(str(i), np.arange(1, 15) + i, 20, 21, np.arange(14)) for i in range(6)]
    marks = make_canaries(n_items=30, n_users=6, count=3, window=11)
    assert marks.member.sum() == 3 and len(set(marks.users[marks.member])) == 3
    assert all(len(set(s)) == 2 and s[0] != s[1] for s in marks.sequences)
    split = insert_canaries(Split(users, 30), marks)
    for seq, u in zip(marks.sequences[marks.member], marks.users[marks.member]):
        assert np.array_equal(split.users[u].train[:11], seq) and len(split.users[u].train) == 25
    # A model trained on the member canaries gives them a lower loss than the others.
    torch.manual_seed(0)
    model = RecommenderModel(ModelConfig(n_items=30, content_dim=0, dim=16, layers=1, heads=2, max_len=10, dropout=0.0))
    members = marks.sequences[marks.member]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        optimizer.zero_grad()
        per_example_loss(model, left_pad([s[:-1] for s in members], 10), left_pad([s[1:] for s in members], 10)).mean().backward()
        optimizer.step()
    assert attack_auc(canary_losses(model, marks), marks.member) == 1.0


@pytest.mark.parametrize("flags,message", [
    (["--privacy", "record", "--record-window", "80"], "--record-window 80 must be between 2 and --max-len + 1 = 11"),
    (["--privacy", "user", "--update-clip", "0"], "needs --update-clip > 0"),
    (["--privacy", "both", "--delta", "2"], "--delta 2.0: must be in (0, 1)"),
    (["--privacy", "record", "--target-epsilon", "0"], "--target-epsilon 0.0: must be > 0"),
    (["--privacy", "record", "--distributed-noise", "--no-secure-aggregation"], "needs secure aggregation"),
    (["--privacy", "record", "--distributed-noise", "--local-epochs", "2"], "needs --local-epochs 1"),
    (["--distributed-noise"], "--distributed-noise needs --privacy"),
])
def test_bad_privacy_flags_are_a_usage_error_before_anything_runs(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as stop:
        main(["train", "--mode", "federated", "--out", str(tmp_path / "x"), *TINY, *flags])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_one_run_audit_catches_a_mechanism_that_adds_too_little_noise():
    """The one-run lower bound (Steinke, Nasr & Jagielski 2023) on 1,000 canaries, each in with
    probability 1/2, scored by a Gaussian mechanism. Calibrated for epsilon 1, the bound stays
    under 1; with a tenth of the noise (the kind of bug an audit is for) it exceeds the claim.
    Random scores reject nothing."""
    from fedrec.simulation.audit import epsilon_lower_bound
    rng = np.random.default_rng(0)
    member = rng.random(1000) < 0.5
    # Gaussian mechanism, sensitivity 1: sigma for (1, 1e-5)-DP by the classic bound.
    sigma = math.sqrt(2 * math.log(1.25 / 1e-5)) / 1.0
    honest = epsilon_lower_bound(-(member + rng.normal(0, sigma, 1000)), member, 1e-5)
    buggy = epsilon_lower_bound(-(member + rng.normal(0, sigma / 10, 1000)), member, 1e-5)
    assert honest["epsilon_lower_bound"] <= 1.0 < buggy["epsilon_lower_bound"]
    assert buggy["correct"] > 0.9 * buggy["guesses"]
    # Random scores reject nothing; perfect ones are capped by the number of canaries.
    assert epsilon_lower_bound(rng.random(1000), member, 1e-5)["epsilon_lower_bound"] == 0.0


def test_independent_canaries_are_members_with_probability_one_half():
    marks = make_canaries(n_items=500, n_users=943, count=500, window=11, seed=1, independent=True)
    assert len(marks.member) == 1000 and 430 < marks.member.sum() < 570
    held = marks.users[marks.member]
    assert len(set(held)) == len(held) and (marks.users[~marks.member] == -1).all()
