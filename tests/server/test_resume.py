"""A run folder continued with other settings is a one-line usage error naming what changed."""
from dataclasses import replace

import numpy as np
import pytest

from fedrec.server.checkpoint import save_checkpoint
from fedrec.server.federation import FederationConfig, check_resumable
from fedrec.shared.errors import RunMismatch, UserFileError


def test_a_checkpoint_of_other_settings_names_them(tmp_path):
    cfg = FederationConfig()
    save_checkpoint(tmp_path / "checkpoint.pt", {"round": 3, "config": cfg.identity(), "history": []})
    assert check_resumable(tmp_path, cfg)["round"] == 3
    assert check_resumable(tmp_path, replace(cfg, min_nodes=7)) is not None   # waiting longer changes nothing
    other = replace(cfg, clients_per_round=cfg.clients_per_round + 1)
    with pytest.raises(RunMismatch, match=rf"clients_per_round: {cfg.clients_per_round} -> "
                                          rf"{cfg.clients_per_round + 1}.*use a new --out") as caught:
        check_resumable(tmp_path, other)
    assert isinstance(caught.value, UserFileError)   # the command line prints it as one line, exit 2
    assert check_resumable(tmp_path / "new", other) is None


def test_a_resume_on_other_data_is_refused_before_anything_in_the_folder_changes(tmp_path):
    import json

    from fedrec.server.app import federation_config
    from fedrec.shared.data.pipeline import DataConfig, prepare_data
    from fedrec.simulation.federated import FederatedJob, _check_resumable, _settings, store_stamp
    prepared = prepare_data(DataConfig(dataset="synthetic:30x20", text_encoder="none", activity_features=False))
    job = FederatedJob(data=DataConfig(dataset="synthetic:30x20", text_encoder="none", activity_features=False))
    settings = _settings(job, prepared, tmp_path)
    save_checkpoint(tmp_path / "checkpoint.pt", {"round": 2, "config": federation_config(settings).identity(),
                                                 "history": []})
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "manifest.json").write_text(json.dumps(store_stamp(prepared)))
    _check_resumable(prepared, settings, tmp_path)                      # same data: resumes
    (tmp_path / "store" / "manifest.json").write_text(json.dumps({**store_stamp(prepared), "events": 1}))
    with pytest.raises(RunMismatch, match="trained on other data"):
        _check_resumable(prepared, settings, tmp_path)
    moved = {**settings, "store": str(tmp_path / "elsewhere")}         # where, not what: still resumes
    (tmp_path / "store" / "manifest.json").write_text(json.dumps(store_stamp(prepared)))
    _check_resumable(prepared, moved, tmp_path)


def test_a_run_continues_with_more_rounds_from_before_its_refit_rounds(tmp_path):
    """Issue 19: a finished run can be given more rounds. Its refit rounds (trained on validation
    items too) must stay at the end, so it continues from the state before them, which selected.pt
    keeps; it is never cut short, and a run with DP never grows (its noise spent the budget over
    the rounds it was started with)."""
    from fedrec.server.federation import SELECTED, last_round_before_refit
    cfg = replace(FederationConfig(), rounds=10, refit_fraction=0.2)
    assert last_round_before_refit(cfg) == 8
    history = [{"round": r} for r in range(1, 11)]
    save_checkpoint(tmp_path / "checkpoint.pt", {"round": 10, "config": cfg.identity(), "optimizer": {}, "history": history})
    with pytest.raises(RunMismatch, match="not kept"):   # no state before the refit: refused, not guessed
        check_resumable(tmp_path, replace(cfg, rounds=20))
    save_checkpoint(tmp_path / SELECTED, {"round": 8, "weights": {}, "optimizer": {"step": 8}, "history": history[:8]})
    longer = check_resumable(tmp_path, replace(cfg, rounds=20))
    assert longer["round"] == 8 and longer["optimizer"] == {"step": 8} and len(longer["history"]) == 8
    assert check_resumable(tmp_path, cfg)["round"] == 10                # same length: the last checkpoint
    with pytest.raises(RunMismatch, match="not cut to 5"):
        check_resumable(tmp_path, replace(cfg, rounds=5))
    private = replace(cfg, privacy=replace(cfg.privacy, mode="record"))
    save_checkpoint(tmp_path / "checkpoint.pt", {"round": 10, "config": private.identity(), "history": history})
    with pytest.raises(RunMismatch, match="calibrated to spend --target-epsilon"):
        check_resumable(tmp_path, replace(private, rounds=20))
    # A run stopped before its refit rounds began simply goes on from its last checkpoint.
    save_checkpoint(tmp_path / "checkpoint.pt", {"round": 6, "config": cfg.identity(), "history": history[:6]})
    assert check_resumable(tmp_path, replace(cfg, rounds=20))["round"] == 6


def test_a_finished_run_taken_up_again_keeps_the_counts_and_blend_its_devices_gave_once(tmp_path):
    """Devices give their co-occurrence counts and validation statistics once, ever: a run that
    finished and is resumed (or given more rounds) keeps the sum and the blend of its first finish
    instead of asking again (every device would refuse, and the model lose its item model). A
    final.pt of another configuration is never taken."""
    import numpy as np
    import torch

    from fedrec.server.app import _released_before, fuse_item_model
    from fedrec.shared.model.fusion import Blend
    cfg = FederationConfig(rounds=500, clients_per_round=25)   # as run: the schedule resolved
    counts = np.arange(9, dtype=np.float32).reshape(3, 3)
    chosen = Blend.of("ease", 0.5)
    torch.save({"config": cfg.to_dict(), "item_counts": counts, "blend": chosen.to_dict()}, tmp_path / "final.pt")
    saved: dict = {}
    longer = replace(cfg, rounds=cfg.rounds * 2)
    report = fuse_item_model(None, longer, 2, tmp_path, saved, None, None, resumed=True)  # no grid: no round
    assert report["chosen"] == chosen.label and "once" in report["why"]
    assert Blend.from_dict(saved["blend"]) == chosen and np.array_equal(saved["item_counts"], counts)
    other = replace(cfg, clients_per_round=cfg.clients_per_round + 1)
    assert _released_before(tmp_path, other, {}, 2) is None
    assert _released_before(tmp_path, cfg, {}, 3) is None        # counts of another catalog
    with pytest.raises(AttributeError, match="get_node_ids"):   # a new run asks its devices: here, no grid
        fuse_item_model(None, longer, 2, tmp_path, {}, None, None, resumed=False)


def test_the_store_stamp_sees_a_changed_log_with_the_same_counts():
    """Same users, items and events, one timestamp moved: another log, so no resume on it."""
    from fedrec.shared.data.pipeline import DataConfig, prepare_data
    from fedrec.simulation.federated import store_stamp
    prepared = prepare_data(DataConfig(dataset="synthetic:30x20", text_encoder="none", activity_features=False))
    before = store_stamp(prepared)
    first = prepared.split.users[0]
    moved = first.train_times.copy()
    moved[0] += 1
    prepared.split.users[0] = replace(first, train_times=moved)
    after = store_stamp(prepared)
    assert {k: v for k, v in before.items() if k != "logs"} == {k: v for k, v in after.items() if k != "logs"}
    assert before["logs"] != after["logs"]


def test_the_time_budget_ends_the_rounds_before_the_refit_and_keeps_a_tenth_for_it():
    """--federated-time-budget: the rounds before the refit stop once their recorded seconds reach
    it; the refit rounds follow (--refit-fraction of the new total); rounds after the refit began
    never count; no budget: --rounds. Worked out from the history, so a resumed run agrees."""
    from fedrec.server.federation import last_round_before_refit, planned_rounds
    cfg = FederationConfig(rounds=500, refit_fraction=0.1)
    history = [{"round": r, "seconds": 2.0} for r in range(1, 501)]
    assert planned_rounds(cfg, history) == (500, "rounds: the 500 of --rounds")
    budget = replace(cfg, time_budget_s=700.0)
    end, why = planned_rounds(budget, history[:400])
    assert last_round_before_refit(replace(cfg, rounds=end)) == 350 and end == 389
    assert why.startswith("time budget") and "by round 350 (of 450 planned)" in why and "39 refit" in why
    assert planned_rounds(budget, history[:349]) == (500, "rounds: the 500 of --rounds")   # not spent yet
    assert planned_rounds(replace(cfg, time_budget_s=900.0), history)[0] == 500   # 450 rounds: 900 s, at the refit
    half = FederationConfig(rounds=6, refit_fraction=0.5, time_budget_s=1.0)   # rounding: 1, 2 and 3 all qualify
    assert planned_rounds(half, history[:1])[0] == 2


def test_validations_without_a_better_one_end_the_rounds_before_the_refit():
    """--federated-patience 3 with a validation every 10 rounds: the best is at round 100, rounds 110-130
    find nothing better, so the rounds before the refit end at 130 and a tenth follows; a better value
    in time (or patience 0, or no validations) changes nothing. Worked out from the history alone."""
    from fedrec.server.federation import VALIDATION_METRIC, last_round_before_refit, planned_rounds
    cfg = FederationConfig(rounds=500, refit_fraction=0.1, federated_eval_every=10, patience=3)
    scores = {r: min(r, 100) / 1000 - (r > 100) * 1e-4 for r in range(10, 501, 10)}   # rises to round 100
    history = [{"round": r, "seconds": 1.0, "metrics": {VALIDATION_METRIC: scores[r]} if r in scores else {}}
               for r in range(1, 501)]
    end, why = planned_rounds(cfg, history[:200])
    assert last_round_before_refit(replace(cfg, rounds=end)) == 130 and end == 144
    assert why.startswith("validation: 3 federated validation(s)") and "round 100's 0.1000 by round 130" in why
    assert "14 refit" in why
    assert planned_rounds(cfg, history[:129])[0] == 500                            # two so far: not yet
    assert planned_rounds(replace(cfg, patience=0), history)[0] == 500
    assert planned_rounds(replace(cfg, federated_eval_every=0), history)[0] == 500
    rising = [{**h, "metrics": {VALIDATION_METRIC: h["round"] / 1000}} for h in history]
    assert planned_rounds(cfg, rising) == (500, "rounds: the 500 of --rounds")
    nan = [{**h, "metrics": {VALIDATION_METRIC: float("nan")}} for h in history]   # no verdict from no value
    assert planned_rounds(cfg, nan)[0] == 500


def test_a_new_validation_panel_starts_the_count_again():
    """After a restart (simulated nodes get new ids) or nodes gone, other devices are asked: their
    values are not compared with the old panel's best."""
    from fedrec.server.federation import PANEL, VALIDATION_METRIC, planned_rounds
    cfg = FederationConfig(rounds=500, refit_fraction=0.1, federated_eval_every=10, patience=2)
    history = [{"round": r, "seconds": 1.0, "metrics": {}} for r in range(1, 101)]
    for r, score, panel in [(10, 0.10, "a"), (20, 0.09, "a"), (30, 0.05, "b"), (40, 0.06, "b"), (50, 0.07, "b")]:
        history[r - 1]["metrics"] = {VALIDATION_METRIC: score, PANEL: panel}
    assert planned_rounds(cfg, history)[0] == 500            # panel b is still rising
    history[29]["metrics"][PANEL] = "a"                     # had round 30 asked panel a: two without a better
    end, why = planned_rounds(cfg, history)
    assert "round 10's 0.1000 by round 30" in why


def test_a_resumed_run_keeps_the_schedule_it_planned(tmp_path):
    """The plan is saved with each checkpoint; a restart with another number of nodes connected
    continues that plan, not a new one."""
    from fedrec.server.aggregation import ServerOptimizer
    from fedrec.server.federation import _resume, schedule_problem
    from fedrec.server.schedule import plan
    cfg = FederationConfig(rounds=0, clients_per_round=0, min_nodes=943)
    planned = plan(943, 0, 0, cfg.participations)
    optimizer = ServerOptimizer({"w": np.zeros(2, np.float32)}, cfg.server)
    save_checkpoint(tmp_path / "checkpoint.pt", {"round": 400, "config": cfg.identity(), "schedule": planned.to_dict(),
                                                 "optimizer": optimizer.state_dict(), "history": []})
    assert _resume(tmp_path, cfg, optimizer)[1:] == (401, planned)
    # Lengthened (make run killed at round 30 of 60, rerun with --rounds 100): the new length, the same cohort.
    short = FederationConfig(rounds=60, clients_per_round=0, min_nodes=943)
    save_checkpoint(tmp_path / "checkpoint.pt", {"round": 30, "config": short.identity(),
                                                 "schedule": plan(943, 60, 0, cfg.participations).to_dict(),
                                                 "optimizer": optimizer.state_dict(), "history": []})
    longer = _resume(tmp_path, replace(short, rounds=100), optimizer)[2]
    assert (longer.rounds, longer.clients_per_round) == (100, 25) and "lengthened" in longer.why
    # Derived from whoever connects first, the schedule needs to know how many to wait for.
    assert "min-nodes" in schedule_problem(FederationConfig(rounds=0, clients_per_round=25))
    assert schedule_problem(FederationConfig(rounds=500, clients_per_round=25)) is None
    assert schedule_problem(cfg) is None


def test_a_run_with_a_time_budget_is_resumed_but_never_lengthened(tmp_path):
    cfg = FederationConfig(rounds=20, time_budget_s=5.0)
    save_checkpoint(tmp_path / "checkpoint.pt", {"round": 3, "config": cfg.identity(), "history": []})
    assert check_resumable(tmp_path, cfg)["round"] == 3
    with pytest.raises(RunMismatch, match="federated-time-budget"):
        check_resumable(tmp_path, replace(cfg, rounds=40))


def test_a_checkpoint_written_before_a_setting_existed_resumes_as_if_it_had_its_default(tmp_path):
    cfg = FederationConfig()
    before = {k: v for k, v in cfg.identity().items() if k != "time_budget_s"}
    save_checkpoint(tmp_path / "checkpoint.pt", {"round": 3, "config": before, "history": []})
    assert check_resumable(tmp_path, cfg)["round"] == 3
    with pytest.raises(RunMismatch, match="time_budget_s: 0.0 -> 5.0"):
        check_resumable(tmp_path, replace(cfg, time_budget_s=5.0))
