"""The centralized job end to end through the CLI, on data the test makes."""
import json

import numpy as np
import pytest

from fedrec.cli import main

FAST = ["--text-encoder", "none", "--dim", "16", "--max-len", "20", "--eval-every", "2",
        "--batch-size", "64", "--quiet"]


def test_train_writes_summary_plot_and_model(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--mode", "centralized", "--dataset", "synthetic:300x200", "--epochs", "6",
                 "--out", str(out), *FAST])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == "synthetic-300x200" and summary["mode"] == "centralized"
    for key in ("hr@10", "ndcg@10", "mrr@10", "coverage@10"):
        assert 0.0 <= summary["metrics"][key] <= 1.0
    assert summary["wall_seconds"] > 0 and summary["config"]["train"]["epochs"] == 6
    assert "sampled100_ndcg@10" in summary["sampled_metrics"]
    assert (out / "validation_curve.png").stat().st_size > 1000
    assert (out / "model.pt").is_file()
    import numpy as np
    from fedrec.shared.evaluation.metrics import ndcg
    ranks = np.load(out / "test_ranks.npy")  # a rank span per user; their NDCG@10 is the reported one
    assert ranks.shape == (summary["data"]["users"], 2) and abs(float(ndcg(ranks, 10).mean()) - summary["metrics"]["ndcg@10"]) < 1e-9
    assert "NDCG@10" in capsys.readouterr().out


def test_model_learns_more_than_popularity_on_synthetic_data(tmp_path):
    from fedrec.shared.evaluation.baselines import MostPopular
    from fedrec.shared.evaluation.ranking import evaluate
    from fedrec.shared.data.pipeline import DataConfig, prepare_data
    from fedrec.shared.model.training import TrainConfig, model_scorer
    from fedrec.simulation.centralized import CentralizedJob, ModelHyper, train_centralized
    prepared = prepare_data(DataConfig(dataset="synthetic:600x300", text_encoder="none", activity_features=True))
    job = CentralizedJob(model=ModelHyper(dim=32, max_len=30),
                         train=TrainConfig(epochs=25, batch_size=64, lr=3e-3, eval_every=5, patience=3))
    model, _ = train_centralized(prepared, job, progress=False)
    ours = evaluate(model_scorer(model), prepared.split, "test").metrics["ndcg@10"]
    popular = evaluate(MostPopular().fit(prepared.split), prepared.split, "test").metrics["ndcg@10"]
    assert ours > 1.5 * popular, (ours, popular)


def test_bad_input_is_a_message_not_a_traceback(tmp_path, capsys):
    log = tmp_path / "log.csv"
    log.write_text("user,item,timestamp\na,x,2024-01-01\na,y,soon\n")
    code = main(["train", "--dataset", str(log), "--out", str(tmp_path / "o"), *FAST])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("fedrec: error: ") and "log.csv:3: field 'timestamp'" in err
    assert "Traceback" not in err


def test_bench_quality_table_and_json(tmp_path, capsys):
    code = main(["bench", "quality", "--dataset", "synthetic:200x150", "--epochs", "2",
                 "--out", str(tmp_path), *FAST])
    assert code == 0
    report = json.loads((tmp_path / "quality.json").read_text())
    assert [r["method"] for r in report["results"]] == [
        "most-popular", "item-knn", "item-knn-recency", "ease", "ease-recency", "session-knn",
        "ease-recency + session-knn", "encoder-id-only + item model", "encoder-id-only", "fedrec-centralized",
        "fedrec-centralized, encoder alone"]
    rows = {r["method"]: r for r in report["results"]}
    assert rows["ease-recency"]["settings"]["decay"] in rows["ease-recency"]["search_space"]["decay"]
    assert set(rows["fedrec-centralized"]["settings"]) == {"content", "best_epoch", "blend", "item_model"}
    summary = json.loads((tmp_path / "fedrec-centralized" / "summary.json").read_text())
    # The safeguard (issue 21): the blend chosen on validation is at least every simple model alone there.
    valid = summary["fusion"]["valid_ndcg@10"]
    assert {"encoder alone", "ease alone", "item-knn alone", "popular alone"} <= set(valid)
    assert valid[summary["fusion"]["chosen"]] == max(valid.values())
    assert rows["fedrec-centralized"]["settings"]["blend"] == summary["fusion"]["chosen"]
    for row in report["results"]:     # every method's ranks, for `fedrec compare`
        assert (tmp_path / row["folder"] / "test_ranks.npy").is_file(), row["method"]
    assert rows["ease-recency"]["fedrec_ratio"]["ci95"][0] <= rows["ease-recency"]["fedrec_ratio"]["ratio"]
    assert "| ease-recency |" in capsys.readouterr().out


@pytest.mark.slow
def test_ml100k_reaches_the_target(datasets_dir, tmp_path):
    """The acceptance figure (about 5 minutes): run with `pytest -m slow`."""
    assert main(["train", "--dataset", "ml-100k", "--data-dir", str(datasets_dir), "--out", str(tmp_path), "--quiet"]) == 0
    metrics = json.loads((tmp_path / "summary.json").read_text())["metrics"]
    assert metrics["ndcg@10"] >= 0.080 and metrics["hr@10"] >= 0.150


def test_held_out_users_never_train_and_are_scored(tmp_path, capsys):
    from fedrec.shared.data.pipeline import DataConfig, prepare_data
    from fedrec.simulation.protocols import split_held_out
    split = prepare_data(DataConfig(dataset="synthetic:200x150", text_encoder="none")).split
    training, held = split_held_out(split, 0.15, seed=0)
    assert len(held) == 30 and len(training) == 170
    assert not {u.user_id for u in held.users} & {u.user_id for u in training.users}
    code = main(["bench", "held-out", "--dataset", "synthetic:200x150", "--epochs", "2",
                 "--out", str(tmp_path), *FAST])
    assert code == 0
    report = json.loads((tmp_path / "held_out.json").read_text())
    assert report["held_out_users"] == 30 and report["results"][-1]["method"] == "fedrec-centralized"
    assert all(0 <= r["ndcg@10"] <= 1 for r in report["results"])
    # New devices: the same unseen users with only their first 1, 2, 5 events, scored on the next one.
    assert all({"first_1", "first_2", "first_5"} <= set(r) for r in report["results"])
    from fedrec.simulation.protocols import first_events
    two = first_events(held, 2)
    user = held.users[0]
    events = list(user.history_for_test) + [user.test]
    assert list(two.users[0].history_for_test) == events[:2] and two.users[0].test == events[2]


def test_global_temporal_split_trains_on_nothing_at_or_after_the_cutoff(tmp_path):
    from fedrec.shared.data.pipeline import DataConfig, prepare_data
    from fedrec.simulation.protocols import split_global_time
    encoded = prepare_data(DataConfig(dataset="synthetic:200x150", text_encoder="none")).encoded
    training, evaluation, cutoff = split_global_time(encoded, 0.1)
    times = {str(u): (s, t) for u, s, t in zip(encoded.user_ids, encoded.sequences, encoded.timestamps)}
    for user in training.users:                         # every training event is before the cutoff
        seq, t = times[user.user_id]
        assert (t[:len(user.train) + 2] < cutoff).all() and list(seq[:len(user.train)]) == list(user.train)
    for user in evaluation.users:                       # the target is the first event at or after it
        seq, t = times[user.user_id]
        first_after = int(np.argmax(t >= cutoff))
        assert user.test == seq[first_after] and len(user.history_for_test) == first_after
    assert len(evaluation) > 0
    assert main(["bench", "temporal", "--dataset", "synthetic:200x150", "--epochs", "2", "--out", str(tmp_path),
                 *FAST]) == 0
    assert json.loads((tmp_path / "temporal.json").read_text())["results"][-1]["method"] == "fedrec-centralized"
