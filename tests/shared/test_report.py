"""Run outputs a person reads (issue 19): no plot of a single dot; a table instead."""
from fedrec.shared.report import plot_validation_curve


def test_one_point_is_a_table_and_two_are_a_plot(tmp_path):
    png = tmp_path / "validation_curve.png"
    written = plot_validation_curve({"federated": [{"round": 2, "ndcg@10": 0.1234}]}, png, x="round",
                                    title="demo: validation NDCG@10", points={"federated, test": (2, 0.1111)})
    assert written == tmp_path / "validation_curve.txt" and not png.exists()
    table = written.read_text().splitlines()
    assert table[0] == "demo: validation NDCG@10" and "0.1234" in table[2] and "0.1111" in table[3]
    written = plot_validation_curve({"federated": [{"round": 1, "ndcg@10": 0.1}, {"round": 2, "ndcg@10": 0.2}]},
                                    png, x="round")
    assert written == png and png.stat().st_size > 1000
    assert not (tmp_path / "validation_curve.txt").exists()   # never a stale table beside the plot
