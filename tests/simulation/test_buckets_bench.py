"""`fedrec bench buckets`: a real centralized run per ID-table size, and what its table says."""
from fedrec.simulation.buckets_bench import _table_facts, run_buckets_bench


def test_collisions_are_counted_only_when_the_catalog_outgrows_the_table():
    summary = {"config": {"model": {"dim": 8}}}
    fits = _table_facts(100, 128, summary)
    assert fits == {"id_rows": 100, "items_without_own_rows": 0, "id_table_bytes": 101 * 8 * 4}
    hashed = _table_facts(5_000, 64, summary)      # two hashes into 64 rows: 4,096 row pairs for 5,000 items
    assert hashed["id_rows"] == 64 and hashed["items_without_own_rows"] >= 5_000 - 64 * 64
    assert hashed["id_table_bytes"] == 65 * 8 * 4


def test_each_size_is_a_real_run_and_the_report_compares_them(tmp_path):
    report = run_buckets_bench(tmp_path, dataset="synthetic:30x40", data_dir=None, buckets=(16, 64), epochs=1)
    small, large = report["runs"]
    assert (small["id_buckets"], large["id_buckets"]) == (16, 64) and small["exit_code"] == large["exit_code"] == 0
    assert small["items_without_own_rows"] > 0 and large["items_without_own_rows"] == 0   # 40 items fit in 64 rows
    assert 0 <= small["ndcg10"] <= 1 and small["id_table_bytes"] < large["id_table_bytes"]
    table = (tmp_path / "buckets.md").read_text()
    assert "| 64 | 40 | 0 |" in table and (tmp_path / "buckets.json").exists()
