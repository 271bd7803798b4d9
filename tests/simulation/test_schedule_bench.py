"""`fedrec bench schedule` on a tiny synthetic dataset: two real runs, the table, and resuming."""
import json

from fedrec.simulation.schedule_bench import run_schedule_bench

TINY = ("--dim", "16", "--layers", "1", "--max-len", "10", "--epochs", "2", "--participations", "0.5",
        "--eval-rounds", "1")


def test_the_schedule_bench_pairs_a_federated_and_a_centralized_run_and_reads_finished_ones_back(tmp_path):
    report = run_schedule_bench(tmp_path, datasets=("synthetic:40x30",), extra=TINY)
    row = report["rows"][0]
    assert "error" not in row, row
    # 40 devices, half a turn each asked: one round of the smallest cohort the schedule picks.
    assert (row["rounds"], row["clients_per_round"]) == (1, 25) and "for each of" in row["schedule"]
    central = row["centralized_ndcg@10"]
    assert row["ndcg_ratio"] == (row["federated_ndcg@10"] / central if central else None)
    assert "| synthetic:40x30 | " in (tmp_path / "schedule.md").read_text()
    assert json.loads((tmp_path / "schedule.json").read_text())["rows"] == report["rows"]
    # A finished run is read back, not redone.
    summary = tmp_path / "synthetic-40x30" / "federated" / "summary.json"
    s = json.loads(summary.read_text())
    s["metrics"]["ndcg@10"] = 0.5
    summary.write_text(json.dumps(s))
    again = run_schedule_bench(tmp_path, datasets=("synthetic:40x30",), extra=TINY)
    assert again["rows"][0]["federated_ndcg@10"] == 0.5
