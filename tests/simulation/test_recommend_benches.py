"""The recommendation benchmarks run end to end on small data and write what they promise."""
import json

from fedrec.cli import main

DATA = ["--dataset", "synthetic:300x200", "--text-encoder", "none"]


def test_bench_diversity_and_recommend(trained_run, tmp_path, capsys):
    assert main(["bench", "diversity", "--bundle", str(trained_run / "bundle"), *DATA, "--out", str(tmp_path)]) == 0
    diversity = json.loads((tmp_path / "diversity.json").read_text())
    levels = diversity["levels"]
    assert [r["diversity"] for r in levels][0] == 0.0
    assert levels[-1]["intra_list_diversity"] > levels[0]["intra_list_diversity"]
    summary = json.loads((trained_run / "summary.json").read_text())
    assert abs(levels[0]["ndcg@10"] - summary["metrics"]["ndcg@10"]) < 0.01   # d = 0 is the run's own ranking
    assert (tmp_path / "diversity.png").stat().st_size > 1000
    assert main(["bench", "recommend", "--bundle", str(trained_run / "bundle"), *DATA, "--users", "30",
                 "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "recommend.json").read_text())
    assert report["explanations"]["top_beats_random"] >= 0.8 and report["explanations"]["cases"] >= 200
    assert set(report["new_users"]) == {"first_0", "first_1", "first_2"}
    assert report["two_stage"]["noise_0"] == report["two_stage"]["on_device"]


def test_bench_diversity_refuses_a_bundle_of_other_data(trained_run, tmp_path, capsys):
    import pytest
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "diversity", "--bundle", str(trained_run / "bundle"), "--dataset", "synthetic:300x150",
              "--text-encoder", "none", "--out", str(tmp_path)])
    assert exit_.value.code == 2 and "not the items of synthetic:300x150" in capsys.readouterr().err


def test_bench_coldstart_writes_each_group_and_method(tmp_path):
    assert main(["bench", "coldstart", "--dataset", "synthetic:300x200", "--text-encoder", "none", "--epochs", "3",
                 "--dim", "16", "--max-len", "20", "--quiet", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "coldstart.json").read_text())
    for group in ("cold", "warm", "all"):
        assert {"ours", "warm_reference", "no_content", "content_knn", "newest_release", "most_popular", "all_items"} <= set(report[group])
        for scores in report[group].values():
            assert 0.0 <= scores["ndcg@10"] <= scores["hr@10"] <= 1.0
    assert report["cold"]["ours"]["users"] + report["warm"]["ours"]["users"] == report["all"]["ours"]["users"]
    assert report["cold"]["ours"]["users"] > 0 and report["cold_items"] == 30


def test_bench_serve_meets_its_recall_and_reports_latency(trained_run, tmp_path):
    assert main(["bench", "serve", "--bundle", str(trained_run / "bundle"), "--items", "2000", "--requests", "200",
                 "--concurrency", "4", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "serve.json").read_text())
    assert report["items"] == 2000 and report["recall@100"] == 1.0     # exact below ANN_FROM_ITEMS
    for key in ("p50_ms", "p99_ms", "qps", "bundle_load_s", "rss_mb", "concurrency"):
        assert report[key] > 0


def test_fedrec_show_prints_history_recommendations_and_the_reference(trained_run, capsys):
    assert main(["show", "--run", str(trained_run), "--users", "2", "--reference", str(trained_run / "missing"),
                 str(trained_run)]) == 0
    out = capsys.readouterr().out
    assert "centralized, ranking by" in out and "test NDCG@10" in out and "this run / reference: 1.000" in out
    from pathlib import Path
    recorded = Path(__file__).resolve().parents[2] / "docs" / "reference" / "ml-100k-centralized.json"
    assert main(["show", "--run", str(trained_run), "--users", "1", "--reference", str(recorded)]) == 0
    assert "measured on the project's 2-core machine" in capsys.readouterr().out
    assert out.count("most recent:") == 2 and out.count(" 10. ") == 2 and "because:" in out


def test_coldstart_never_ranks_an_item_before_it_existed():
    import numpy as np
    from fedrec.shared.data.pipeline import DataConfig, prepare_data
    from fedrec.simulation.coldstart import cold_split, released_ranks
    data = cold_split(prepare_data(DataConfig(dataset="synthetic:300x200", text_encoder="none")), 0.15)
    targets = np.array([u.test for u in data.split.users])

    def unreleased_first(histories):      # every item not yet out at the user's test time first, then the target
        rows = np.arange(len(histories))
        scores = np.zeros((len(histories), data.n_items + 1))
        scores[rows, targets[:len(histories)]] = 1.0
        later = data.first_seen[None, :] > data.test_times[:len(histories), None]
        return np.where(later, 2.0, scores)
    assert (data.first_seen[None, :] > data.test_times[:, None]).any()
    assert (released_ranks(unreleased_first, data, batch=10**6) == 1).all()
