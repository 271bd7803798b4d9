import numpy as np
import pytest

from fedrec.shared.evaluation.compare import compare_runs


def _ranks(rng, n, hit_rate):
    """Ranks for n users: a hit (rank 1-10) with probability hit_rate, else far down."""
    return np.where(rng.random(n) < hit_rate, rng.integers(1, 11, n), 500)


def test_same_model_gives_a_ratio_near_one_inside_its_interval():
    rng = np.random.default_rng(0)
    runs = [_ranks(rng, 2000, 0.2) for _ in range(6)]
    r = compare_runs(runs[:3], runs[3:])
    low, high = r["ratio_ci95"]
    assert low < 1 < high and abs(r["ratio"] - 1) < 0.1
    assert r["users"] == 2000 and r["baseline_runs"] == r["candidate_runs"] == 3


def test_a_real_gap_is_outside_the_interval():
    rng = np.random.default_rng(1)
    r = compare_runs([_ranks(rng, 2000, 0.2) for _ in range(3)], [_ranks(rng, 2000, 0.3) for _ in range(3)])
    assert r["ratio_ci95"][0] > 1.2


def test_runs_over_different_users_are_refused():
    with pytest.raises(ValueError, match="different numbers of users"):
        compare_runs([np.ones(5)], [np.ones(6)])


def test_cli_compare_writes_json_and_names_a_missing_file(tmp_path, capsys):
    import json

    from fedrec.cli import main
    rng = np.random.default_rng(2)
    for name in ("a1", "a2", "b1"):
        (tmp_path / name).mkdir()
        np.save(tmp_path / name / "test_ranks.npy", _ranks(rng, 300, 0.2))
    assert main(["compare", "--baseline", str(tmp_path / "a1"), str(tmp_path / "a2"),
                 "--candidate", str(tmp_path / "b1"), "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "compare.json").read_text())
    assert report["baseline_runs"] == 2 and len(report["ratio_ci95"]) == 2
    assert main(["compare", "--baseline", str(tmp_path / "a1"), "--candidate", str(tmp_path / "nope")]) == 2
    assert "nope/test_ranks.npy" in capsys.readouterr().err


def test_ranks_with_index_ties_and_rank_spans_are_not_compared():
    old = np.arange(1, 101, dtype=float)                 # before session 9: one rank per user
    new = np.stack([old, old + 1], axis=1)               # a rank span per user
    with pytest.raises(ValueError, match="session 9"):
        compare_runs([old], [new])
    assert compare_runs([new], [new])["ratio"] == pytest.approx(1.0)
