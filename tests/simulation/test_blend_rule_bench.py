"""`fedrec bench blend-rule`: rules judged on held-out validation users, never on test."""
import json

import numpy as np
import pytest

from fedrec.shared.model.fusion import BLEND_RULES, ENCODER_ALONE, ITEM_ONLY, Blend
from fedrec.simulation.blend_rule_bench import rule_outcomes


def test_a_rule_is_scored_on_the_users_it_did_not_pick_from():
    """Candidate 1 is better for every user: every rule finds it, matches the best on the held-out
    users, and keeps the encoder."""
    candidates = [ENCODER_ALONE, Blend.of("ease", 1.0), Blend.of("ease", ITEM_ONLY)]
    rng = np.random.default_rng(0)
    per_user = np.c_[rng.random(300) * 0.1, 0.5 + rng.random(300) * 0.1, rng.random(300) * 0.1]
    out = rule_outcomes(candidates, per_user, picks=100, draws=20, seed=0)
    assert set(out["rules"]) == set(BLEND_RULES) and out["best_on_all_users"] == "encoder + 1 x ease"
    for rule in out["rules"].values():
        assert rule["x_oracle"] == 1.0 and rule["drops_encoder"] == 0.0
        assert 0.5 <= rule["held_out_ndcg@10"] <= 0.6


def test_the_pick_is_scored_on_the_other_users_not_on_the_ones_it_was_picked_from():
    """Candidate 1 is far ahead on the 10 users that choose and behind on the other 30: every rule
    picks it there, and the report must show it losing to the oracle (candidate 0) on the rest."""
    candidates = [ENCODER_ALONE, Blend.of("ease", 1.0), Blend.of("ease", ITEM_ONLY)]
    per_user = np.zeros((40, 3))
    per_user[:10, 1] = 1.0                   # the choosers: candidate 1 hits every target
    per_user[10:, 0] = 0.6                   # the rest: only candidate 0 hits
    per_user[10:, 1] = 0.1
    out = rule_outcomes(candidates, per_user, picks=10, draws=1, seed=0, orders=[np.arange(40)])
    for rule in out["rules"].values():
        assert rule["held_out_ndcg@10"] == pytest.approx(0.1) and rule["x_oracle"] == pytest.approx(0.1 / 0.6)
    assert out["oracle_ndcg@10"] == pytest.approx(0.6)


def test_the_bench_trains_each_encoder_and_writes_its_report(tmp_path):
    from fedrec.shared.data.pipeline import DataConfig
    from fedrec.shared.model.config import ModelHyper
    from fedrec.shared.model.training import TrainConfig
    from fedrec.simulation.blend_rule_bench import run_blend_rule_bench
    from fedrec.simulation.centralized import CentralizedJob
    job = CentralizedJob(data=DataConfig(dataset="synthetic:60x30", text_encoder="none"),
                         model=ModelHyper(dim=8, layers=1, heads=1, max_len=10), train=TrainConfig(eval_every=1))
    report = run_blend_rule_bench(job, tmp_path, epochs=(1, 2), picks=20, draws=5, progress=False)
    assert [e["epochs"] for e in report["encoders"]] == [1, 2]
    assert np.load(tmp_path / "valid-blend-ndcg-2-epochs.npy").shape == (report["encoders"][1]["users"], 38)
    assert json.loads((tmp_path / "blend-rule.json").read_text())["picks"] == 20
    assert "| 2 |" in (tmp_path / "blend-rule.md").read_text()
